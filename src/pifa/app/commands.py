"""The implementations of the ``pifa`` subcommands (parsing lives in ``cli``).

Every command raises ``ValueError`` for bad input; ``cli.main`` turns it into one line and
exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import safetensors
import torch

from .. import distributed
from ..budget import check_density, layer_parameters
from ..checkpoint import CheckpointWriteError
from ..compress import compress, plan
from ..config import CompressionConfig
from ..data import MAX_CALIBRATION_TOKENS, calibration_batches, calibration_format, chat_documents, load_texts
from ..evaluate import encoder_fidelity, mean_pooled_embeddings, perplexity_of_text, vocabulary_size
from ..format import CONFIG_NAME, check_tensor_shapes, read_pifa_config, weight_files
from ..io import load_compressed, save_compressed
from ..model import context_limit
from ..report import speedup_summary
from ..sensitivity import SensitivityCache
from ..streaming import StreamedWeights, check_block_memory
from ..tables import format_table
from ..validate import check_positive_int, check_seed, parse_dtype
from .bench import bench_layers, bench_model_table, compile_models, random_pivot_copy, synthetic_llama
from .gguf import find_gguf
from .loading import check_local, load_dense, load_tokenizer, resolve_device
from .outputs import (
    CHECKPOINT_SUFFIX,
    LOCK_SUFFIX,
    OutputLock,
    check_json_target,
    check_no_overlap,
    companion,
    input_paths,
    write_json_file,
)
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
    """Sparse-pruned linears: the kept weights are counted in the file, not trusted from JSON.

    ``check_tensor_shapes`` has checked each tensor's shape and dtype in the header before this reads it.
    """
    kept: dict[str, int] = {}
    for file in weight_files(path):
        with safetensors.safe_open(str(file), framework="pt") as handle:
            names = set(handle.keys())
            for name in spec.get("pruned", {}):
                if f"{name}.weight" in names:
                    kept[name] = int(handle.get_tensor(f"{name}.weight").count_nonzero())
    rows = []
    for name, entry in spec.get("pruned", {}).items():
        m, n = entry["out_features"], entry["in_features"]
        rows.append({"module": name, "kind": f"sparse {entry['pattern']}", "shape": f"{m}x{n}", "rank": "-",
                     "before": m * n, "after": kept[name]})
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


def _check_flag(value: Any, flag: str, minimum: int = 1) -> None:
    check_positive_int(value, flag, minimum)


def _is_checkpoint(path: Path) -> bool:
    """Whether folder ``path`` holds nothing but what a pifa checkpoint writes."""
    return path.is_dir() and all(
        p.is_file() and (p.name.startswith("progress.json") or p.name.startswith("block_")) for p in path.iterdir())


def _check_activation_memory(model: Any, config: CompressionConfig, samples: int, seq_len: int) -> None:
    """Refuse a calibration set whose activations (kept on the CPU between blocks) exceed this machine's memory."""
    hidden = getattr(model.config, "hidden_size", None)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return
    if not isinstance(hidden, int) or total <= 0:
        return
    element = next(model.parameters()).element_size()
    need = samples * seq_len * hidden * element * (2 if config.spec.reconstruct else 1)
    if need > total:
        raise ValueError(f"--samples {samples} x --seq-len {seq_len} needs about {need / 2**30:.1f} GiB of "
                         f"calibration activations, more than this machine's {total / 2**30:.1f} GiB of memory")


def _model_and_calibration(args: argparse.Namespace, config: CompressionConfig, dtype: Any,
                           device: Any) -> tuple[Any, Any, torch.Tensor, StreamedWeights | None]:
    """The dense model (streamed: its skeleton and the streamed weights), its tokenizer and the calibration
    batches (plain text or chat format)."""
    streamed = None
    if args.stream:  # the skeleton on the meta device: blocks are read when the engine reaches them
        check_local(Path(args.model))
        streamed = StreamedWeights(args.model, None if dtype == "auto" else dtype)
        check_block_memory(streamed, config, args.samples * args.seq_len)
        model, tokenizer = streamed.model, load_tokenizer(args.model)
    else:
        model, tokenizer = load_dense(args.model, dtype, str(device))
    limit = context_limit(model)
    if limit is not None and args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context of {limit} tokens")
    _check_activation_memory(model, config, args.samples, args.seq_len)
    source = args.calib
    used = calibration_format(tokenizer, args.calib_format)
    if used == "chat":
        try:
            source = chat_documents(tokenizer, load_texts(args.calib))
        except ValueError as exc:
            if args.calib_format != "auto":
                raise
            raise ValueError(f"{exc} (--calib-format auto chose chat: the tokenizer has a chat template; pass "
                             "--calib-format text to calibrate on plain text)") from None
    return model, tokenizer, calibration_batches(tokenizer, source, args.samples, args.seq_len, args.seed), streamed


def _format_note(tokenizer: Any, requested: str) -> str:
    """The line that says which calibration format a run used, and why."""
    used = calibration_format(tokenizer, requested)
    reason = {"auto": f"auto: the tokenizer has {'a' if used == 'chat' else 'no'} chat template",
              "chat": "--calib-format chat", "text": "--calib-format text"}[requested]
    return f"calibration format: {used} ({reason})"


def _sensitivity_cache(path: str | None, config: CompressionConfig, inputs: dict[str, Path],
                       out: Path) -> SensitivityCache | None:
    """``--sensitivity-cache``: checked and read before anything is loaded (a bad file: one line)."""
    if path is None:
        return None
    if config.allocation != "sensitivity":
        raise ValueError(f"--sensitivity-cache keeps the measurements of --allocation sensitivity, not "
                         f"{config.allocation!r}")
    check_no_overlap(path, {**inputs, "output": out}, "--sensitivity-cache")
    return SensitivityCache(path)


def _print_plan(model: Any, config: CompressionConfig, calib: torch.Tensor, device: Any, batch_size: int,
                weights: StreamedWeights | None, cache: SensitivityCache | None = None) -> int:
    """``--dry-run``: per-linear ranks (or densities) and the achieved density, without compressing
    (a ``--sensitivity-cache`` is the one file it writes, when the user asks for it)."""
    chosen, shapes = plan(model, config, calib, device=device, batch_size=batch_size, weights=weights,
                          sensitivity_cache=cache)
    rows = []
    for name, (m, n) in shapes.items():
        if chosen.ranks:
            rank = chosen.ranks[name]
            after = layer_parameters(m, n, rank, config.layer_kind)
        else:
            rank, after = "-", round(chosen.densities[name] * m * n)
        score = chosen.scores.get(name)
        rows.append({"module": name, "shape": f"{m}x{n}", "rank": rank, "density": round(after / (m * n), 4),
                     "score": "-" if score is None else f"{score:.4g}", "before": m * n, "after": after})
    before, after = sum(r["before"] for r in rows), sum(r["after"] for r in rows)
    print(format_table(rows))
    print(f"\nplan ({config.method}, allocation {config.allocation}): {len(rows)} linears, {after:,} of "
          f"{before:,} weights kept, density {after / before:.4f} (target {chosen.density or config.density}); "
          "nothing written")
    if chosen.speedup:
        dense = sum(1 for r in rows if r["density"] == 1.0)
        print(f"{speedup_summary(chosen.speedup)} (latency table {config.latency_table}); {dense} linears stay "
              "dense (no PIFA rank of theirs is faster)")
        if "decode_model" in chosen.speedup:
            print("the whole model's dense decode step was timed here; what is not a targeted linear costs the "
                  "same after")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """Check every argument, lock OUT, load, calibrate, compress (resumably), save; see the README's safety section."""
    out = Path(args.out)
    config = _config_from_args(args)
    dtype = parse_dtype(args.dtype, allow_auto=True)
    device = resolve_device(args.device)
    checkpoint, cache = _check_compress_paths(args, config, out)
    distributed.init_from_environment(device)  # under torchrun: join the other ranks (no-op otherwise)
    device = distributed.local_device(device)
    distributed.check_same_everywhere({k: v for k, v in vars(args).items() if k != "func"}, "arguments")
    if args.dry_run:  # the plan only: nothing is written
        model, tokenizer, calib, streamed = _model_and_calibration(args, config, dtype, device)
        code = _print_plan(model, config, calib, device, args.batch_size, streamed, cache)
        if distributed.is_main():
            print(_format_note(tokenizer, args.calib_format))
        return code
    main = distributed.is_main()  # rank 0 (or the only process) locks, writes and prints
    with OutputLock(out) if main else contextlib.nullcontext():
        model, tokenizer, calib, streamed = _model_and_calibration(args, config, dtype, device)
        earlier = checkpoint.exists() and args.resume
        if checkpoint.exists() and not args.resume and main:
            print("pifa compress: discarding the checkpoint of an earlier run; pass --resume to continue it",
                  file=sys.stderr)
            shutil.rmtree(checkpoint)
        distributed.barrier()  # no rank reads the checkpoint before rank 0 has decided its fate
        extra = {"source": str(args.model), "calibration": {"source": str(args.calib), "samples": args.samples,
                                                            "seq_len": args.seq_len, "seed": args.seed,
                                                            "format": calibration_format(tokenizer, args.calib_format),
                                                            "format_requested": args.calib_format}}
        report = _compress_resumably(args, model, tokenizer, config, calib, device, streamed, cache, checkpoint,
                                     earlier, extra)
        report.config.update(extra)
        if main and not args.stream:
            _save(model, out, tokenizer, config, report, args.overwrite, checkpoint)
        if main:
            shutil.rmtree(checkpoint, ignore_errors=True)
    distributed.barrier()
    if main:
        print(report.table())
        print(_format_note(tokenizer, args.calib_format))
        print(f"saved to {out}")
    return 0


def _check_compress_paths(args: argparse.Namespace, config: CompressionConfig, out: Path
                          ) -> tuple[Path, SensitivityCache | None]:
    """Every check that needs no model: calibration sizes, the output, checkpoint, lock and cache paths.
    Returns the checkpoint folder and the sensitivity cache (or ``None``)."""
    # named as in the Python API (calibration_batches, compress), like the errors raised further in
    for value, name in ((args.samples, "num_samples"), (args.seq_len, "seq_len"), (args.batch_size, "batch_size")):
        _check_flag(value, name)
    check_seed(args.seed, "--seed")
    if args.samples * args.seq_len > MAX_CALIBRATION_TOKENS:
        raise ValueError(f"--samples {args.samples} x --seq-len {args.seq_len} is more than the "
                         f"{MAX_CALIBRATION_TOKENS:,} calibration tokens pifa accepts")
    inputs = input_paths(args.model, args.calib)
    checkpoint, lock = companion(out, CHECKPOINT_SUFFIX), companion(out, LOCK_SUFFIX)
    for path, what in ((out, "output"), (checkpoint, "checkpoint"), (lock, "lock file")):
        check_no_overlap(path, inputs, what)
    cache = _sensitivity_cache(args.sensitivity_cache, config, inputs, out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a directory")
    if out.exists() and not args.overwrite:
        raise ValueError(f"output directory {str(out)!r} already exists (pass --overwrite to replace it)")
    if checkpoint.exists() and not _is_checkpoint(checkpoint):
        raise ValueError(f"{str(checkpoint)!r} exists but is not a pifa checkpoint; move it away")
    if args.stream and (not Path(args.model).is_dir() or find_gguf(Path(args.model)) is not None):
        raise ValueError(f"--stream reads a local model folder with safetensors weights; {args.model!r} is not one")
    return checkpoint, cache


def _compress_resumably(args: argparse.Namespace, model: Any, tokenizer: Any, config: CompressionConfig,
                        calib: torch.Tensor,
                        device: Any, streamed: StreamedWeights | None, cache: SensitivityCache | None,
                        checkpoint: Path, earlier: bool, extra: dict[str, Any]) -> Any:
    """Compress in memory or streamed, checkpointing each block; on bad input, this run's own checkpoint goes
    (``earlier``: it continues an earlier run's, which stays)."""
    main = distributed.is_main()
    try:
        if streamed is not None:
            return streamed.compress(Path(args.out), config, calib, device=device, batch_size=args.batch_size,
                                     checkpoint_dir=str(checkpoint), tokenizer=tokenizer,
                                     overwrite=args.overwrite, report_extra=extra, progress=main)
        return compress(model, config, calib, device=device, batch_size=args.batch_size,
                        checkpoint_dir=str(checkpoint), progress=main, sensitivity_cache=cache)
    except CheckpointWriteError:  # the disk filled while a block was saved: the checkpoint keeps the others
        raise
    except ValueError as exc:  # bad input (e.g. non-finite weights): this run's own checkpoint cannot help
        if not earlier and main:
            shutil.rmtree(checkpoint, ignore_errors=True)
        if args.stream and checkpoint.exists():
            raise ValueError(f"{exc}; the finished blocks are kept in {str(checkpoint)!r}: fix it and rerun "
                             "with --resume") from None
        raise


def _save(model: Any, out: Path, tokenizer: Any, config: CompressionConfig, report: Any, overwrite: bool,
          checkpoint: Path) -> None:
    if out.exists() and not overwrite:
        raise ValueError(f"output directory {str(out)!r} appeared during the run (pass --overwrite to replace "
                         f"it; --resume then reuses the finished blocks in {str(checkpoint)!r})")
    try:
        save_compressed(model, out, tokenizer=tokenizer, compression=config.to_dict(), overwrite=overwrite,
                        extra_files={"compression_report.json": report.to_json()}, report=report)
    except ValueError as exc:
        raise ValueError(f"{exc}; the finished blocks are kept in {str(checkpoint)!r}: fix it and rerun "
                         "with --resume") from None


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        write_json_file(path, json.dumps(payload, indent=2) + "\n")


def cmd_bench_layer(args: argparse.Namespace) -> int:


    device = str(resolve_device(args.device))
    m, n, r = args.out_features, args.in_features, args.rank
    dtypes = [parse_dtype(d) for d in args.dtypes]
    for value, flag in ((args.rounds, "--rounds"), (args.repeats, "--repeats")):
        _check_flag(value, flag)
    check_json_target(args.json, {})
    print(f"pifa bench layer: {m} x {n}, rank {r}, device {device}, threads {torch.get_num_threads()}, "
          f"FLOP ideal lowrank/pifa {(m + n) / max(m + n - r, 1):.3f}")
    rows = [row for dtype in dtypes for row in bench_layers(m, n, r, args.tokens, dtype, device, args.rounds,
                                                                    args.repeats)]
    print(format_table(rows))
    _write_json(args.json, {"kind": "bench-layer", "device": device, "shape": [m, n], "rank": r, "rows": rows})
    return 0


def _batch_sizes(args: argparse.Namespace) -> list[int]:
    """--batch-sizes "1,4" (several batch sizes in one run), else --batch."""
    if args.batch_sizes is None:
        _check_flag(args.batch, "--batch")
        return [args.batch]
    sizes = []
    for part in str(args.batch_sizes).split(","):
        try:
            sizes.append(int(part))
        except ValueError:
            raise ValueError(f"--batch-sizes {args.batch_sizes!r} must be positive integers separated by commas"
                             ) from None
        _check_flag(sizes[-1], "--batch-sizes")
    return sizes


def _compressed_models(args: argparse.Namespace, device: str, dtype: Any) -> dict[str, Any]:
    """The dense model (HF folder or GGUF) and every --compressed folder, by row name."""
    if not args.dense:
        raise ValueError("--compressed needs --dense, the model it was compressed from")
    for folder in args.compressed:
        read_pifa_config(folder)  # a wrong --compressed fails before the dense model loads
    dense, _ = load_dense(args.dense, dtype, device)
    models = {"dense": dense}
    for i, folder in enumerate(args.compressed):
        compressed = load_compressed(folder, device=device, dtype=dense.dtype)
        if vocabulary_size(compressed) != vocabulary_size(dense):
            raise ValueError(f"--compressed {folder} has a vocabulary of {vocabulary_size(compressed)}, --dense one "
                             f"of {vocabulary_size(dense)}: not the model it was compressed from")
        name = f"compressed:{Path(folder).name}"
        models[name if name not in models else f"{name}#{i}"] = compressed
    return models


def _with_fused(models: dict[str, Any], fuse: str) -> dict[str, Any]:
    """--fuse on: the compressed models with fused siblings; both: each unfused and fused (a copy)."""
    import copy

    from ..fused import fuse_siblings

    if fuse == "off":
        return models
    out = {}
    for name, model in models.items():
        if name == "dense":
            out[name] = model
            continue
        if fuse == "both":
            out[name] = model
            model = copy.deepcopy(model)
        fuse_siblings(model)
        out[f"{name}+fused"] = model
    return out


def cmd_bench_model(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))
    dtype = parse_dtype(args.dtype)
    for value, flag in ((args.prefill, "--prefill"), (args.decode, "--decode"), (args.rounds, "--rounds")):
        _check_flag(value, flag)
    batches = _batch_sizes(args)
    check_density(args.density, "--density")
    inputs = {f"--{k}": Path(v) for k, v in (("dense", args.dense), *(("compressed", c) for c in args.compressed))
              if v and Path(v).exists()}
    check_json_target(args.json, inputs)
    if args.compressed:
        models = _compressed_models(args, device, dtype)
    else:
        dense = synthetic_llama(args.hidden, args.mlp, args.blocks, args.vocab, dtype, device)
        models = {"dense": dense, f"pifa@{args.density}": random_pivot_copy(dense, args.density)}
    models = _with_fused(models, args.fuse)
    seconds = (compile_models(models, max(batches), args.prefill, args.decode, device, args.compile_backend)
               if args.compile else None)
    result = bench_model_table(models, batches, args.prefill, args.decode, device, args.rounds, seconds)
    print(f"pifa bench model: batch sizes {','.join(map(str, batches))}, prefill {args.prefill} tokens, decode "
          f"{args.decode} tokens, device {device}, threads {torch.get_num_threads()}"
          f"{f', compiled ({args.compile_backend})' if args.compile else ', eager'}")
    print(format_table(result["rows"]))
    print(f"peak memory ({result['peak_memory_kind']}): {result['peak_memory_MB']} MB")
    _write_json(args.json, {"kind": "bench-model", **result})
    return 0


def _load_any(path: str, device: str, dtype: str) -> tuple[Any, Any]:
    """A pifa output directory (load_compressed) or a dense model (folder, GGUF, hub id), with its tokenizer."""
    if (Path(path) / CONFIG_NAME).is_file():
        dtype_value = parse_dtype(dtype, allow_auto=True)
        model = load_compressed(path, device=device, dtype=None if dtype_value == "auto" else dtype_value)
        return model, load_tokenizer(path)
    return load_dense(path, dtype, device)


def _is_causal_lm(model: Any) -> bool:
    return getattr(model, "get_output_embeddings", lambda: None)() is not None


def _perplexities(model: Any, tokenizer: Any, args: argparse.Namespace) -> list[dict[str, Any]]:

    if not _is_causal_lm(model):
        raise ValueError(f"--ppl needs a causal language model; {type(model).__name__} is an encoder")
    limit = context_limit(model)
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
        try:
            recorded = json.loads(report.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{str(report)!r} is not valid JSON ({exc}); pass --dense") from None
        config = recorded.get("config") if isinstance(recorded, dict) else None
        dense_path = config.get("source") if isinstance(config, dict) else None
        if dense_path is not None and not isinstance(dense_path, str):
            raise ValueError(f"{str(report)!r} records no usable source model; pass --dense")
    if dense_path is None:
        raise ValueError("encoder fidelity needs --dense, the model to compare with")
    text = Path(args.sentences).read_text(encoding="utf-8", errors="replace")
    sentences = [s.strip() for s in text.splitlines() if s.strip()][: args.max_sentences]
    dense, _ = load_dense(dense_path, "auto", device)
    emb = mean_pooled_embeddings(model, tokenizer, sentences, args.batch_size)
    return {"dense": str(dense_path), "sentences": len(sentences), "pooling": "mean, L2-normalised",
            **encoder_fidelity(mean_pooled_embeddings(dense, tokenizer, sentences, args.batch_size), emb)}


def cmd_eval(args: argparse.Namespace) -> int:

    device = str(resolve_device(args.device))
    parse_dtype(args.dtype, allow_auto=True)
    if not args.ppl and not args.tasks and args.sentences is None:
        raise ValueError("nothing to evaluate: give --ppl, --tasks or --sentences")
    _check_flag(args.batch_size, "--batch-size")
    if args.ppl:
        _check_flag(args.seq_len, "--seq-len", minimum=2)
    _check_flag(args.max_sentences, "--max-sentences")
    for value, flag in ((args.max_windows, "--max-windows"), (args.limit, "--limit")):
        if value is not None:
            _check_flag(value, flag)
    if args.sentences is not None and not Path(args.sentences).is_file():
        raise ValueError(f"--sentences file {args.sentences!r} does not exist (or is not a file)")
    inputs = {"the model": Path(args.model)} if Path(args.model).exists() else {}
    for source in [*(args.ppl or []), *(s for s in (args.sentences, args.dense) if s)]:
        if Path(source).exists():
            inputs[f"the input {source!r}"] = Path(source)
    check_json_target(args.json, inputs)
    model, tokenizer = _load_any(args.model, device, args.dtype)
    result: dict[str, Any] = {"kind": "eval", "model": args.model, "device": device}
    if args.ppl:
        result["perplexity"] = _perplexities(model, tokenizer, args)
        keys = ("source", "ppl", "seq_len", "windows", "tokens", "dtype", "bos_handling")
        print(format_table([{k: r[k] for k in keys}
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
