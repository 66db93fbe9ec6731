"""Scale: peak memory of `pifa compress --stream` against depth, a run under a memory limit below the
checkpoint's size, and two processes (torch.distributed, gloo) against one.

    python benchmarks/bench_scale.py depth --json results/scale_depth.json
    python benchmarks/bench_scale.py limit --limit-gib 2.5 --json results/scale_limit.json
    python benchmarks/bench_scale.py distributed --model /tmp/smollm2 --json results/scale_distributed.json

``depth`` writes random Llama checkpoints of the TinyLlama-1.1B width (hidden 2048, MLP 5632, 32 heads,
4 KV heads, vocabulary 32000) with 8 and 32 blocks in bfloat16, one shard per block (written tensor by
tensor: this script never holds a whole model either), and runs ``pifa compress --stream`` on each in a
fresh process, reading its peak RSS (``ru_maxrss``). ``limit`` runs the 32-block compression inside a
cgroup (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``; needs root) whose limit is below the
checkpoint's size, and checks that its output equals the unlimited run's tensor for tensor.
``distributed`` compresses ``--model`` once in one process and once under
``torchrun --nproc-per-node 2`` and reports the largest relative difference of any tensor.
Every run uses ``--threads`` CPU threads per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
WIDTH = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def save_char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (one id per printable character) for the random checkpoints."""
    import string

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{ch: i + 1 for i, ch in enumerate(string.printable)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[UNK]",
                                         model_max_length=2048).save_pretrained(folder)


def write_random_llama(folder: Path, blocks: int, seed: int = 0) -> int:
    """A random bfloat16 Llama checkpoint with one shard per block; returns its size in bytes."""
    import transformers

    from pifa.streaming import ShardWriter

    config = transformers.LlamaConfig(**WIDTH, num_hidden_layers=blocks, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    save_char_tokenizer(folder)
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, tensor in skeleton.state_dict().items():
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = tuple(tensor.shape)
    writer = ShardWriter(folder, len(groups))
    for shapes in groups.values():
        tensors = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        writer.write(tensors)
    writer.finish()
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_measured(command: list[str], cgroup: Path | None = None) -> dict[str, Any]:
    """Run ``command`` in a fresh process (inside ``cgroup`` when given); its peak RSS and wall time."""
    wrapper = ("import os, resource, subprocess, sys, json, time\n"
               "cgroup = sys.argv[1]\n"
               "if cgroup: open(os.path.join(cgroup, 'cgroup.procs'), 'w').write(str(os.getpid()))\n"
               "start = time.perf_counter()\n"
               "code = subprocess.run(sys.argv[2:]).returncode\n"
               "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
               "print(json.dumps({'returncode': code, 'peak_rss': peak, 'seconds': time.perf_counter() - start}))\n")
    result = subprocess.run([sys.executable, "-c", wrapper, str(cgroup or ""), *command], capture_output=True,
                            text=True)
    lines = result.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"measurement failed: {result.stderr[-2000:]}")
    measured = json.loads(lines[-1])
    measured["stderr_tail"] = result.stderr.strip().splitlines()[-3:]
    return measured


def compress_command(model: Path, out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pifa", "--threads", str(args.threads), "compress", str(model), str(out),
            "--calib", args.calib, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--method", args.method, "--density", str(args.density),
            "--device", "cpu", *(["--targets", *args.targets] if args.targets else []), *extra]


def equal_outputs(a: Path, b: Path) -> dict[str, Any]:
    import pifa

    first, second = pifa.load_compressed(a).state_dict(), pifa.load_compressed(b).state_dict()
    worst = 0.0
    for name, tensor in first.items():
        if tensor.is_floating_point() and tensor.numel():
            diff = (second[name].double() - tensor.double()).norm() / tensor.double().norm().clamp_min(1e-30)
            worst = max(worst, float(diff))
    identical = first.keys() == second.keys() and all(torch.equal(second[k], v) for k, v in first.items())
    return {"identical": identical, "max_relative_difference": worst}


def make_cgroup(limit: int) -> Path:
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists():
        group = v1 / f"pifa-bench-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        return group
    v2 = Path("/sys/fs/cgroup")
    group = v2 / f"pifa-bench-{os.getpid()}"
    group.mkdir()
    (group / "memory.max").write_text(str(limit))
    (group / "memory.swap.max").write_text("0")
    return group


def bench_depth(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows = []
    for blocks in args.blocks:
        model = work / f"llama-{blocks}"
        size = write_random_llama(model, blocks)
        out = work / f"out-{blocks}"
        measured = run_measured(compress_command(model, out, args, "--stream"))
        if measured["returncode"] != 0:
            raise SystemExit(f"{blocks} blocks: pifa compress failed: {measured['stderr_tail']}")
        rows.append({"blocks": blocks, "checkpoint_bytes": size, "peak_rss_bytes": measured["peak_rss"],
                     "seconds": round(measured["seconds"], 1)})
        print(f"{blocks} blocks: checkpoint {size / 2**30:.2f} GiB, peak RSS {measured['peak_rss'] / 2**30:.2f} GiB, "
              f"{measured['seconds']:.0f} s", flush=True)
    return {"rows": rows}


def bench_limit(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    blocks = max(args.blocks)
    model, free = work / f"llama-{blocks}", work / f"out-{blocks}"
    size = write_random_llama(model, blocks) if not model.exists() else sum(
        p.stat().st_size for p in model.glob("*.safetensors"))
    if not free.exists():
        unlimited = run_measured(compress_command(model, free, args, "--stream"))
        if unlimited["returncode"] != 0:
            raise SystemExit(f"unlimited run failed: {unlimited['stderr_tail']}")
    limit = int(args.limit_gib * 2**30)
    if limit >= size:
        raise SystemExit(f"--limit-gib {args.limit_gib} is not below the checkpoint's {size / 2**30:.2f} GiB")
    group = make_cgroup(limit)
    try:
        limited = run_measured(compress_command(model, work / "out-limited", args, "--stream"), group)
    finally:
        group.rmdir()
    row = {"blocks": blocks, "checkpoint_bytes": size, "limit_bytes": limit, "returncode": limited["returncode"],
           "peak_rss_bytes": limited["peak_rss"], "seconds": round(limited["seconds"], 1)}
    if limited["returncode"] == 0:
        row.update(equal_outputs(free, work / "out-limited"))
    else:
        row["stderr_tail"] = limited["stderr_tail"]
    print(json.dumps(row), flush=True)
    return {"rows": [row]}


def bench_distributed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    one, two = work / "one", work / "two"
    extra = ("--stream",) if args.stream else ()
    single = run_measured(compress_command(Path(args.model), one, args, *extra))
    command = compress_command(Path(args.model), two, args, *extra)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", *command[2:]]
    double = run_measured(launcher)
    for name, run in (("one process", single), ("two processes", double)):
        if run["returncode"] != 0:
            raise SystemExit(f"{name} failed: {run['stderr_tail']}")
    row = {"model": args.model, "one_process_seconds": round(single["seconds"], 1),
           "two_processes_seconds": round(double["seconds"], 1), **equal_outputs(one, two)}
    print(json.dumps(row), flush=True)
    return {"rows": [row]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("depth", "limit", "distributed"))
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--limit-gib", type=float, default=2.5)
    parser.add_argument("--model", help="distributed: a model folder (safetensors)")
    parser.add_argument("--stream", action="store_true", help="distributed: with --stream")
    parser.add_argument("--method", default="mpifa")
    parser.add_argument("--targets", nargs="+", help="fnmatch patterns of the linears to compress (default: all)")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"))
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary folder)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="pifa-scale-"))
    result = {"bench_depth": bench_depth, "bench_limit": bench_limit,
              "bench_distributed": bench_distributed}[f"bench_{args.what}"](args, work)
    payload = {"kind": f"scale-{args.what}", "machine": platform.machine(), "cpus": os.cpu_count(),
               "threads_per_process": args.threads, "torch": torch.__version__, "arguments": vars(args), **result}
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
