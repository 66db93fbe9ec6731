"""The implementations of the ``pifa`` subcommands (parsing lives in ``cli``).

Every command raises ``ValueError`` for bad input; ``cli.main`` turns it into one line and
exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import safetensors
import torch
from transformers import AutoTokenizer

from ..budget import layer_parameters
from ..compress import compress
from ..config import CompressionConfig
from ..data import calibration_batches, load_texts
from ..evaluate import encoder_fidelity, mean_pooled_embeddings, perplexity_of_text
from ..format import CONFIG_NAME, WEIGHTS_NAME, check_tensor_shapes, read_pifa_config
from ..io import load_compressed, save_compressed
from ..tables import format_table
from ..validate import parse_dtype
from .bench import bench_layers, bench_models, random_pivot_copy, synthetic_llama
from .loading import load_dense, resolve_device
from .reporting import write_report
from .zeroshot import zero_shot


def _module_rows(spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in spec["modules"].items():
        m, n, r = entry["out_features"], entry["in_features"], entry["rank"]
        after = layer_parameters(m, n, r, entry["kind"])
        rows.append({"module": name, "kind": entry["kind"], "shape": f"{m}x{n}", "rank": r,
                     "before": m * n, "after": after})
    return rows


def _pruned_rows(path: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Sparse-pruned linears: the kept weights are counted in the file, not trusted from JSON."""


    rows = []
    with safetensors.safe_open(f"{path}/{WEIGHTS_NAME}", framework="pt") as handle:
        for name, entry in spec.get("pruned", {}).items():
            key = f"{name}.weight"
            if key not in handle.keys():
                raise ValueError(f"{WEIGHTS_NAME} lacks tensor {key!r} that the 'pruned' table describes")
            kept = int(handle.get_tensor(key).count_nonzero())
            m, n = entry["out_features"], entry["in_features"]
            rows.append({"module": name, "kind": f"sparse {entry['pattern']}", "shape": f"{m}x{n}", "rank": "-",
                         "before": m * n, "after": kept})
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    spec = read_pifa_config(args.path)
    check_tensor_shapes(args.path, spec)
    rows = _module_rows(spec) + _pruned_rows(args.path, spec)
    print(f"pifa model {args.path} (format {spec['format_version']}, written by pifa {spec.get('library_version')})")
    method = spec.get("compression", {}).get("method")
    if method:
        print(f"compressed with {method}")
    print(format_table(rows))
    before, after = sum(r["before"] for r in rows), sum(r["after"] for r in rows)
    density = after / before if before else 1.0
    print(f"\n{len(rows)} compressed modules: {after:,} of {before:,} weights kept, density {density:.4f}")
    return 0


def _config_from_args(args: argparse.Namespace) -> Any:


    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(CompressionConfig) if f.name != "version"}
    return CompressionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def cmd_compress(args: argparse.Namespace) -> int:


    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"output directory {str(out)!r} already exists (pass --overwrite to replace it)")
    config = _config_from_args(args)
    device = resolve_device(args.device)
    model, tokenizer = load_dense(args.model, args.dtype, str(device))
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context of {limit} tokens")
    calib = calibration_batches(tokenizer, args.calib, args.samples, args.seq_len, args.seed)
    checkpoint = out.with_name(out.name + ".pifa-checkpoint")
    if checkpoint.exists() and not args.resume:
        shutil.rmtree(checkpoint)
    try:
        report = compress(model, config, calib, device=device, batch_size=args.batch_size,
                          checkpoint_dir=str(checkpoint))
    except ValueError:  # bad input (e.g. non-finite weights): resuming cannot help
        shutil.rmtree(checkpoint, ignore_errors=True)
        raise
    report.config["source"] = str(args.model)
    report.config["calibration"] = {"source": str(args.calib), "samples": args.samples, "seq_len": args.seq_len,
                                    "seed": args.seed}
    save_compressed(model, out, tokenizer=tokenizer, compression=config.to_dict(), overwrite=args.overwrite,
                    extra_files={"compression_report.json": report.to_json()}, report=report)
    shutil.rmtree(checkpoint, ignore_errors=True)
    print(report.table())
    print(f"saved to {out}")
    return 0


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        import json
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def cmd_bench_layer(args: argparse.Namespace) -> int:


    device = str(resolve_device(args.device))
    m, n, r = args.out_features, args.in_features, args.rank
    dtypes = [parse_dtype(d) for d in args.dtypes]
    print(f"pifa bench layer: {m} x {n}, rank {r}, device {device}, threads {torch.get_num_threads()}, "
          f"FLOP ideal lowrank/pifa {(m + n) / max(m + n - r, 1):.3f}")
    rows = [row for dtype in dtypes for row in bench_layers(m, n, r, args.tokens, dtype, device, args.rounds,
                                                                    args.repeats)]
    print(format_table(rows))
    _write_json(args.json, {"kind": "bench-layer", "device": device, "shape": [m, n], "rank": r, "rows": rows})
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:

    device = str(resolve_device(args.device))
    if args.compressed:
        if not args.dense:
            raise ValueError("--compressed needs --dense, the model it was compressed from")
        dense, _ = load_dense(args.dense, args.dtype, device)
        models = {"dense": dense, "compressed": load_compressed(args.compressed, device=device, dtype=dense.dtype)}
    else:
        dense = synthetic_llama(args.hidden, args.mlp, args.blocks, args.vocab, parse_dtype(args.dtype), device)
        models = {"dense": dense, f"pifa@{args.density}": random_pivot_copy(dense, args.density)}
    result = bench_models(models, args.batch, args.prefill, args.decode, device, args.rounds)
    print(f"pifa bench model: batch {args.batch}, prefill {args.prefill} tokens, decode {args.decode} tokens, "
          f"device {device}")
    print(format_table(result["rows"]))
    print(f"peak memory ({result['peak_memory_kind']}): {result['peak_memory_MB']} MB")
    _write_json(args.json, {"kind": "bench-model", **result})
    return 0


def _load_any(path: str, device: str, dtype: str) -> tuple[Any, Any]:
    """A pifa output directory (load_compressed) or a dense model, with its tokenizer."""


    if (Path(path) / CONFIG_NAME).is_file():

        dtype_value = parse_dtype(dtype, allow_auto=True)
        model = load_compressed(path, device=device, dtype=None if dtype_value == "auto" else dtype_value)
        return model, AutoTokenizer.from_pretrained(path)
    return load_dense(path, dtype, device)


def _is_causal_lm(model: Any) -> bool:
    return getattr(model, "get_output_embeddings", lambda: None)() is not None


def _perplexities(model: Any, tokenizer: Any, args: argparse.Namespace) -> list[dict[str, Any]]:

    if not _is_causal_lm(model):
        raise ValueError(f"--ppl needs a causal language model; {type(model).__name__} is an encoder")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context of {limit} tokens")
    results = []
    for source in args.ppl:
        text = "\n\n".join(load_texts(source, evaluation=True))
        result = perplexity_of_text(model, tokenizer, text, args.seq_len, args.batch_size, args.max_windows)
        results.append({"source": source, **result})
    return results


def _fidelity(model: Any, tokenizer: Any, args: argparse.Namespace, device: str) -> dict[str, Any]:


    dense_path = args.dense
    report = Path(args.model) / "compression_report.json"
    if dense_path is None and report.is_file():
        dense_path = json.loads(report.read_text()).get("config", {}).get("source")
    if dense_path is None:
        raise ValueError("encoder fidelity needs --dense, the model to compare with")
    if args.sentences is None or not Path(args.sentences).is_file():
        raise ValueError(f"encoder fidelity needs --sentences, a text file with one sentence per line (got {args.sentences!r})")
    sentences = [s.strip() for s in Path(args.sentences).read_text().splitlines() if s.strip()][: args.max_sentences]
    dense, _ = load_dense(dense_path, "auto", device)
    emb = mean_pooled_embeddings(model, tokenizer, sentences, args.batch_size)
    return {"dense": str(dense_path), "sentences": len(sentences), "pooling": "mean, L2-normalised",
            **encoder_fidelity(mean_pooled_embeddings(dense, tokenizer, sentences, args.batch_size), emb)}


def cmd_eval(args: argparse.Namespace) -> int:

    device = str(resolve_device(args.device))
    if not args.ppl and not args.tasks and args.sentences is None:
        raise ValueError("nothing to evaluate: give --ppl, --tasks or --sentences")
    model, tokenizer = _load_any(args.model, device, args.dtype)
    result: dict[str, Any] = {"kind": "eval", "model": args.model, "device": device}
    if args.ppl:
        result["perplexity"] = _perplexities(model, tokenizer, args)
        print(format_table([{k: r[k] for k in ("source", "ppl", "seq_len", "windows", "tokens", "dtype", "bos_handling")}
                            for r in result["perplexity"]]))
    if args.tasks:

        tasks = [t for t in args.tasks.split(",") if t]
        result["zero_shot"] = zero_shot(model, tokenizer, tasks, args.batch_size, args.limit, args.include_path)
        print(format_table([{"task": t, **m} for t, m in result["zero_shot"].items()]))
    if args.sentences is not None:
        result["fidelity"] = _fidelity(model, tokenizer, args, device)
        print(format_table([result["fidelity"]]))
    _write_json(args.json, result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    path = write_report(args.results, args.out)
    print(path.read_text())
    print(f"wrote {path} and {len(list(path.parent.glob('*.png')))} plots")
    return 0
