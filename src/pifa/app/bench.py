"""Speed measurement: layers (dense vs low-rank vs PIFA) and whole models (prefill, decode).

Everything is timed side by side in one process (interleaved rounds, medians), and
reported as milliseconds or tokens/s plus ratios, the only numbers worth comparing on a
shared machine.
"""

from __future__ import annotations

import logging
import resource
import statistics
import time
from typing import Any

import torch
from torch import nn

from ..budget import rank_for_density
from ..layers import LowRankLinear, PivotLinear
from ..model import find_blocks, is_linear, kv_cache_name, linear_shape, set_module
from .timing import interleaved_medians, sync

logger = logging.getLogger(__name__)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} {value!r} must be a positive integer")


def _semi_structured(dense: nn.Linear) -> nn.Module | None:
    """A 2:4 sparse copy of ``dense`` on CUDA with semi-structured support, else None."""
    if dense.weight.device.type != "cuda":
        return None
    try:
        from torch.sparse import to_sparse_semi_structured

        weight = dense.weight.detach().clone()
        mask = torch.zeros_like(weight, dtype=torch.bool).view(-1, 4)
        mask[:, :2] = True
        weight = weight * mask.view_as(weight)
        sparse = nn.Linear(dense.in_features, dense.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        sparse.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
        return sparse
    except (RuntimeError, ImportError, ValueError) as exc:  # unsupported GPU, dtype or shape
        logger.info("2:4 semi-structured sparsity unavailable: %s", exc)
        return None


def layer_set(m: int, n: int, rank: int, dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    """Dense, low-rank and PIFA layers of one shape with random weights (and 2:4 on CUDA)."""
    _check_positive(out_features=m, in_features=n, rank=rank)
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(m, rank, generator=g) / rank**0.5, torch.randn(rank, n, generator=g) / n**0.5
    low = LowRankLinear.from_factors(up, down)
    dense = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(m, n, generator=g) / n**0.5)
    layers = {"dense": dense, "lowrank": low, "pifa": PivotLinear.from_low_rank(low)}
    layers = {k: v.to(device=device, dtype=dtype).eval() for k, v in layers.items()}
    sparse = _semi_structured(layers["dense"])
    if sparse is not None:
        layers["sparse24"] = sparse
    return layers


def bench_layers(m: int, n: int, rank: int, tokens: list[int], dtype: torch.dtype, device: str,
                 rounds: int = 7, repeats: int = 1) -> list[dict[str, Any]]:
    """Milliseconds per forward of each layer kind at each token count, and ratios to PIFA.

    Each of ``repeats`` measurements builds fresh layers (new allocations: on a CPU a
    GEMM's speed depends on where its operands landed) and times them side by side; the
    row gives the median over repeats of the milliseconds and of each repeat's ratios (each
    ratio comes from one side-by-side measurement), and the range of low-rank / PIFA.
    """
    _check_positive(rounds=rounds, repeats=repeats, **{f"tokens[{i}]": t for i, t in enumerate(tokens)})
    runs: list[dict[int, dict[str, float]]] = []
    for _ in range(repeats):
        layers = layer_set(m, n, rank, dtype, device)
        run = {}
        for t in tokens:
            x = torch.randn(t, n, device=device, dtype=dtype)
            with torch.inference_mode():
                run[t] = interleaved_medians({k: (lambda f=f: f(x)) for k, f in layers.items()},  # noqa: B023
                                             rounds=rounds, device=device)
        runs.append(run)
        del layers
    return [_layer_row(dtype, t, [run[t] for run in runs]) for t in tokens]


def _layer_row(dtype: torch.dtype, tokens: int, runs: list[dict[str, float]]) -> dict[str, Any]:
    """One table row from the per-repeat medians of one token count."""
    ms = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens}
    row.update({f"{k}_ms": round(v, 3) for k, v in ms.items()})
    for k in ms:
        if k != "pifa":
            row[f"{k}/pifa"] = round(statistics.median(run[k] / run["pifa"] for run in runs), 3)
    if len(runs) > 1:
        ratios = [run["lowrank"] / run["pifa"] for run in runs]
        row["lowrank/pifa range"] = f"{min(ratios):.3f}-{max(ratios):.3f}"
    return row


def synthetic_llama(hidden: int, mlp: int, blocks: int, vocab: int, dtype: torch.dtype, device: str) -> nn.Module:
    """A Llama-shaped causal LM with random weights (built on meta, then filled: fast)."""
    import transformers

    _check_positive(hidden=hidden, mlp=mlp, blocks=blocks, vocab=vocab)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks, vocab_size=vocab,
        num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g) if p.dim() > 1 else p.fill_(1.0)
        for module in model.modules():
            if module._non_persistent_buffers_set:
                model._init_weights(module)
    return model.to(dtype).eval()


def random_pivot_copy(model: nn.Module, density: float) -> nn.Module:
    """``model`` with every block linear replaced by a PIFA layer of random values at ``density``.

    For speed measurement only: the layers have the shapes and ranks of real PIFA layers.
    """
    import copy

    compressed = copy.deepcopy(model)
    _, blocks = find_blocks(compressed)
    g = torch.Generator().manual_seed(1)
    for block in blocks:
        for local, module in list(block.named_modules()):
            if not is_linear(module):
                continue
            m, n = linear_shape(module)
            rank = rank_for_density(m, n, density, "pifa")
            layer = PivotLinear(n, m, rank, bias=module.bias is not None, device=module.weight.device,
                                dtype=module.weight.dtype)
            with torch.no_grad():
                for p in layer.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                layer.pivot_index.copy_(torch.randperm(m, generator=g)[:rank].sort().values)
            layer._refresh_index()
            set_module(block, local, layer)
    return compressed


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _decode_seconds(model: nn.Module, prompt: torch.Tensor, steps: int, device: str) -> float:
    """Seconds for ``steps`` greedy single-token forwards with the KV cache (the prompt is not timed)."""
    name = kv_cache_name(model)
    out = model(input_ids=prompt, use_cache=True)
    past, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **{name: past})
        past, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - start


def _decode_medians(models: dict[str, nn.Module], prompt: torch.Tensor, steps: int, device: str,
                    rounds: int) -> dict[str, float]:
    """Median decode milliseconds per model, rounds interleaved across models, after a warm-up."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(rounds + 1):
        for name, model in models.items():
            seconds = _decode_seconds(model, prompt, steps, device)
            if round_:  # round 0 warms up
                samples[name].append(seconds * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_models(models: dict[str, nn.Module], batch: int, prefill: int, decode: int, device: str,
                 rounds: int = 3) -> dict[str, Any]:
    """Prefill tokens/s (batch x prefill tokens, one forward) and decode tokens/s (KV cache)."""
    _check_positive(batch=batch, prefill=prefill, decode=decode, rounds=rounds)
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (batch, prefill), generator=torch.Generator().manual_seed(0)).to(device)
    prompt = ids[:, :16]
    with torch.inference_mode():
        pre = interleaved_medians({k: (lambda m=m: m(input_ids=ids, use_cache=False)) for k, m in models.items()},
                                  rounds=rounds, min_seconds=0.0, device=device)
        dec = _decode_medians(models, prompt, decode, device, rounds)
    rows = []
    for name, model in models.items():
        decode_ms = dec[name]
        rows.append({"model": name, "weight_MB": round(weight_bytes(model) / 2**20, 1),
                     "prefill_tok_s": round(batch * prefill / pre[name] * 1e3, 1),
                     "decode_tok_s": round(batch * decode / decode_ms * 1e3, 2)})
    base = rows[0]
    for row in rows:
        row["prefill_x"] = round(row["prefill_tok_s"] / base["prefill_tok_s"], 3)
        row["decode_x"] = round(row["decode_tok_s"] / base["decode_tok_s"], 3)
    peak = (torch.cuda.max_memory_allocated() if str(device).startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"rows": rows, "batch": batch, "prefill": prefill, "decode": decode, "device": str(device),
            "peak_memory_MB": round(peak / 2**20, 1),
            "peak_memory_kind": "cuda max allocated" if str(device).startswith("cuda") else "process peak RSS"}


def compile_models(models: dict[str, nn.Module], batch: int, prefill: int, decode: int,
                   device: str, backend: str = "inductor") -> dict[str, float]:
    """``torch.compile`` every model's forward (``backend``, default mode) and warm it up on this run's shapes
    (one prefill, one short decode); returns the seconds each warm-up took: the compile time, timed apart.

    The models share their forward's code object, whose compiled versions dynamo caps at
    ``recompile_limit`` (8) before falling back to eager without a word: the cap is raised to 16 per model."""
    import torch._dynamo.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16 * len(models))
    seconds = {}
    for name, model in models.items():
        model.forward = torch.compile(model.forward, backend=backend)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch, prefill), generator=torch.Generator().manual_seed(0)).to(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
            _decode_seconds(model, ids[:, :16], min(decode, 3), device)
        sync(device)
        seconds[name] = round(time.perf_counter() - start, 2)
    return seconds


def bench_model_table(models: dict[str, nn.Module], batches: list[int], prefill: int, decode: int, device: str,
                      rounds: int = 3, compile_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """``bench_models`` at every batch size; one row per (batch, model) with weight bytes and their ratio to the
    first (dense) model, and the compile seconds when the models were compiled."""
    dense_bytes = weight_bytes(next(iter(models.values())))
    rows, peaks = [], []
    for batch in batches:
        result = bench_models(models, batch, prefill, decode, device, rounds)
        peaks.append(result["peak_memory_MB"])
        for row, (name, model) in zip(result["rows"], models.items()):
            size = weight_bytes(model)
            extra = {} if compile_seconds is None else {"compile_s": compile_seconds[name]}
            rows.append({"batch": batch, **row, "weight_bytes": size, "weight_x": round(size / dense_bytes, 3),
                         **extra})
    return {"rows": rows, "batches": batches, "prefill": prefill, "decode": decode, "device": str(device),
            "compiled": compile_seconds is not None, "peak_memory_MB": max(peaks),
            "peak_memory_kind": "cuda max allocated" if str(device).startswith("cuda") else "process peak RSS"}
