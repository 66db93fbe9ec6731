"""The compressed-model format: file names, the module table's schema, and its validation.

A compressed model directory holds the Hugging Face ``config.json``, ``model.safetensors``
and ``pifa_config.json``::

    {"format_version": 1, "library_version": "0.1.0", "dtype": "float32",
     "modules": {"model.layers.0.self_attn.q_proj":
                 {"kind": "pivot", "in_features": 64, "out_features": 64, "rank": 16, "bias": false}},
     "pruned": {"model.layers.0.mlp.up_proj":     # optional: linears a sparse method zeroed
                {"out_features": 64, "in_features": 32, "pattern": "2:4"}},
     "compression": {...}}   # optional: how the model was compressed

When the model has compressed layers, ``config.json`` also carries the same module table as a
``quantization_config`` block (``{"quant_method": "pifa", "format_version": 1,
"library_version": ..., "modules": {...}}``), so that transformers' ``from_pretrained`` rebuilds
the compressed model through the quantizer plugin in :mod:`pifa.hf`. ``pifa_config.json`` stays
the source ``load_compressed`` reads. This module reads and checks; :mod:`pifa.io` writes and loads.

``model.safetensors`` holds, per compressed module, its factors (``down``/``up`` or ``pivot_weight``/
``coeff``/``pivot_index``, plus ``bias``) and an empty ``<module>.weight`` of shape (0,): the sentinel that
makes ``from_pretrained`` without ``import pifa`` fail (size mismatch) instead of loading random linears.
Its header metadata is exactly ``{"format": "pt"}``. Before any tensor data is read, the header is
checked against the module table: every tensor present, with its shape, factors in float32/bfloat16/
float16 (one dtype per module), ``pivot_index`` in int64.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import safetensors
from torch import nn

from ._version import __version__
from .layers import LAYER_KINDS, is_compressed, layer_kind
from .validate import first_line

FORMAT_VERSION = 1
CONFIG_NAME = "pifa_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # sharded weights (streamed compression writes one shard per block)
HF_CONFIG_NAME = "config.json"
REQUIRED_FILES = (HF_CONFIG_NAME, CONFIG_NAME)  # plus the weights: WEIGHTS_NAME, or INDEX_NAME and its shards
QUANT_METHOD = "pifa"  # the ``quant_method`` of the ``quantization_config`` block in config.json
SENTINEL = "weight"  # the empty tensor named like a dense linear's weight, see ``sentinel_tensors``
FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors name -> torch name
INDEX_DTYPE = "I64"
CUSTOM_CODE_CONFIGS = (HF_CONFIG_NAME, "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def module_spec(layer: nn.Module) -> dict[str, Any]:
    """The JSON description of one compressed layer."""
    return {
        "kind": layer_kind(layer),
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "rank": layer.rank,
        "bias": layer.bias is not None,
    }


def compressed_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Specs of every compressed layer of ``model``, by qualified name."""
    return {
        name: module_spec(module)
        for name, module in model.named_modules()
        if is_compressed(module)
    }


def quantization_config_dict(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` for a model with these compressed modules."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "modules": copy.deepcopy(modules),
    }


def quant_method_of(quantization_config: Any) -> Any:
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    return getattr(method, "value", method)


def is_pifa_quantization_config(quantization_config: Any) -> bool:
    """Whether a config's ``quantization_config`` (a dict or a config object) is pifa's."""
    return quantization_config is not None and quant_method_of(quantization_config) == QUANT_METHOD


def read_pifa_config(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a compressed model directory and return its ``pifa_config.json``."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a directory")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise ValueError(f"{str(path)!r} is missing {name}")
    weight_files(path)
    try:
        spec = json.loads((path / CONFIG_NAME).read_text())
    except RecursionError:
        raise ValueError(f"{CONFIG_NAME} in {str(path)!r} nests its JSON too deeply to be a pifa config") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer beyond Python's 4300 digits
        first = first_line(exc, 200)
        raise ValueError(f"{CONFIG_NAME} in {str(path)!r} is not valid JSON: {first}") from None
    version = spec.get("format_version") if isinstance(spec, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown {CONFIG_NAME} format_version {version!r} (this pifa reads {FORMAT_VERSION})")
    modules = spec.get("modules")
    if not isinstance(modules, dict):
        raise ValueError(f"{CONFIG_NAME} has no 'modules' table")
    for name, entry in modules.items():
        check_entry(name, entry)
    pruned = spec.get("pruned", {})
    if not isinstance(pruned, dict):
        raise ValueError(f"{CONFIG_NAME}: 'pruned' must map module names to out_features, in_features and pattern")
    for name, entry in pruned.items():
        check_pruned_entry(name, entry)
    dtype = spec.get("dtype", "float32")
    if dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"{CONFIG_NAME}: dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES.values())}")
    if not isinstance(spec.get("compression", {}), dict):
        raise ValueError(f"{CONFIG_NAME}: 'compression' must be a JSON object")
    return spec


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_entry(name: str, entry: Any, source: str = CONFIG_NAME) -> None:
    """One module's table entry: a known ``kind``, positive integer shapes, a rank in range, a bool ``bias``."""
    keys = ("kind", "in_features", "out_features", "rank", "bias")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: module names must be non-empty strings, got {name!r}")
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise ValueError(f"{source}: module {name!r} needs the fields {keys}")
    kind = entry["kind"]
    if not isinstance(kind, str) or kind not in LAYER_KINDS:
        raise ValueError(f"{source}: module {name!r} has unknown kind {kind!r}; "
                         f"expected one of {', '.join(LAYER_KINDS)}")
    for key in ("in_features", "out_features", "rank"):
        if not _is_int(entry[key]) or entry[key] < 1:
            raise ValueError(f"{source}: module {name!r} has {key} {entry[key]!r}; expected a positive integer")
    if entry["rank"] > min(entry["in_features"], entry["out_features"]):
        raise ValueError(f"{source}: module {name!r} has rank {entry['rank']} above min(in_features, out_features) = "
                         f"{min(entry['in_features'], entry['out_features'])}")
    if not isinstance(entry["bias"], bool):
        raise ValueError(f"{source}: module {name!r} has bias {entry['bias']!r}; expected true or false")


def check_pruned_entry(name: str, entry: Any) -> None:
    """One entry of the optional ``pruned`` table: positive integer shapes and a pattern string."""
    if not isinstance(entry, dict) or not {"out_features", "in_features", "pattern"} <= entry.keys():
        raise ValueError(f"{CONFIG_NAME}: 'pruned' must map module names to out_features, in_features and pattern")
    for key in ("out_features", "in_features"):
        if not _is_int(entry[key]) or entry[key] < 1:
            raise ValueError(f"{CONFIG_NAME}: pruned module {name!r} has {key} {entry[key]!r}; "
                             "expected a positive integer")
    if not isinstance(entry["pattern"], str):
        raise ValueError(f"{CONFIG_NAME}: pruned module {name!r} has pattern {entry['pattern']!r}; expected a string")


def expected_shapes(name: str, entry: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes that ``pifa_config.json`` implies for one compressed module."""
    m, n, r = entry["out_features"], entry["in_features"], entry["rank"]
    if entry["kind"] == "lowrank":
        shapes = {"down": (r, n), "up": (m, r)}
    else:
        shapes = {"pivot_weight": (r, n), "coeff": (m - r, r), "pivot_index": (r,)}
    if entry["bias"]:
        shapes["bias"] = (m,)
    return {f"{name}.{key}": shape for key, shape in shapes.items()}


def read_header(files: list[str | os.PathLike]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{tensor name: (shape, safetensors dtype such as "F32")}`` from the headers of ``files`` (no tensor data)."""
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safetensors.safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    header[key] = (tuple(piece.get_shape()), piece.get_dtype())
        except Exception as exc:  # safetensors raises its own error types (SafetensorError) for corrupt files
            first = first_line(exc)
            raise ValueError(f"{str(file)!r} is not a readable safetensors file: {first}") from None
    return header


def check_header(header: dict[str, tuple[tuple[int, ...], str]], modules: dict[str, dict[str, Any]],
                 weights: str = WEIGHTS_NAME, source: str = CONFIG_NAME) -> None:
    """Every tensor the module table implies is in ``header``, with its shape and a dtype that fits.

    The factors and the bias must be float32, bfloat16 or float16 (one dtype per module); ``pivot_index``
    int64. A module's optional sentinel (``<name>.weight`` of shape (0,), see :func:`sentinel_tensors`)
    must have exactly that shape.
    """
    for name, entry in modules.items():
        float_dtypes = set()
        for key, shape in expected_shapes(name, entry).items():
            if key not in header:
                raise ValueError(f"{weights} lacks tensor {key!r} that {source} describes")
            stored_shape, dtype = header[key]
            if stored_shape != shape:
                raise ValueError(f"tensor {key!r} has shape {stored_shape} in {weights} but {source} implies {shape}")
            if key.endswith(".pivot_index"):
                if dtype != INDEX_DTYPE:
                    raise ValueError(f"tensor {key!r} is {dtype} in {weights}; pivot indices must be {INDEX_DTYPE}")
            elif dtype not in FLOAT_DTYPES:
                raise ValueError(f"tensor {key!r} is {dtype} in {weights}; compressed weights must be one of "
                                 f"{', '.join(FLOAT_DTYPES)}")
            else:
                float_dtypes.add(dtype)
        if len(float_dtypes) > 1:
            raise ValueError(f"the tensors of module {name!r} mix dtypes {sorted(float_dtypes)} in {weights}")
        sentinel = f"{name}.{SENTINEL}"
        if sentinel in header and header[sentinel][0] != (0,):
            raise ValueError(f"tensor {sentinel!r} has shape {header[sentinel][0]} in {weights}; a compressed "
                             f"module's {SENTINEL!r} must be the empty marker of shape (0,)")


def check_pruned_header(header: dict[str, tuple[tuple[int, ...], str]], pruned: dict[str, dict[str, Any]]) -> None:
    """Every pruned linear's weight is in ``header`` with its (out, in) or Conv1D (in, out) shape and a float dtype."""
    for name, entry in pruned.items():
        key = f"{name}.weight"
        if key not in header:
            raise ValueError(f"{WEIGHTS_NAME} lacks tensor {key!r} that the 'pruned' table describes")
        shape, dtype = header[key]
        m, n = entry["out_features"], entry["in_features"]
        if shape not in ((m, n), (n, m)):
            raise ValueError(f"tensor {key!r} has shape {shape} in {WEIGHTS_NAME} "
                             f"but the 'pruned' table gives {m} x {n}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"tensor {key!r} is {dtype} in {WEIGHTS_NAME}; expected one of {', '.join(FLOAT_DTYPES)}")


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder: ``model.safetensors``, or the shards its index names.

    An index, wherever there is one (beside ``model.safetensors`` too: it is input like any other file), must
    be a JSON object whose ``weight_map`` maps tensor names to plain file names inside the folder (no paths),
    and be the folder's own: a symbolic link is followed only to a file inside the folder (or, in a Hugging
    Face hub cache, to the repository's ``blobs``). A malformed or foreign index is refused, never guessed
    around. Without ``model.safetensors`` each shard it names must exist.
    """
    path = Path(path)
    index_file = path / INDEX_NAME
    shards = read_index(path) if index_file.is_file() or index_file.is_symlink() else None
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    if shards is None:
        raise ValueError(f"{str(path)!r} is missing {WEIGHTS_NAME} (or {INDEX_NAME})")
    for name in shards:
        if not (path / name).is_file():
            raise ValueError(f"{str(path)!r} is missing shard {name} that {INDEX_NAME} names")
    return [path / name for name in shards]


MAX_INDEX_BYTES = 64 * 2**20  # an index names tensors and files: a bigger one is not an index


def _inside(target: Path, folder: Path) -> bool:
    return target == folder or folder in target.parents


def read_index(path: str | os.PathLike) -> list[str]:
    """The shard file names ``model.safetensors.index.json`` of folder ``path`` names (validated, see
    :func:`weight_files`); one-line ``ValueError`` for an index that is malformed or not the folder's own."""
    path = Path(path)
    index_file = path / INDEX_NAME
    where = f"{INDEX_NAME} in {str(path)!r}"
    if index_file.is_symlink():
        folder, target = path.resolve(), index_file.resolve()
        hub_blobs = folder.parent.parent / "blobs" if folder.parent.name == "snapshots" else None
        if not (_inside(target, folder) or (hub_blobs is not None and _inside(target, hub_blobs))):
            raise ValueError(f"{where} is a symbolic link to {str(target)!r}, outside the model folder: refused "
                             "(an index must be the folder's own)")
    if not index_file.is_file():
        raise ValueError(f"{where} is not a regular file")
    try:
        if index_file.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError(f"{where} is {index_file.stat().st_size:,} bytes, too large for an index")
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            first_line(exc))
        raise ValueError(f"{where} is not valid JSON ({detail}): refused rather than guessed around") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{where} has no 'weight_map' of tensor names to files")
    shards = []
    for key, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise ValueError(f"{where} maps {key!r} to {name!r}; shards must be .safetensors files in the same folder")
        shards.append(name)
    return list(dict.fromkeys(shards))


def check_tensor_shapes(path: str | os.PathLike, spec: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Compare the weights' headers with the shapes and dtypes ``spec`` implies (reads no tensor data);
    returns the header (see :func:`read_header`)."""
    header = read_header(weight_files(path))
    check_header(header, spec["modules"])
    check_pruned_header(header, spec.get("pruned", {}))
    return header


def sentinel_tensors(modules: dict[str, dict[str, Any]], dtype: Any) -> dict[str, Any]:
    """An empty ``<name>.weight`` tensor (shape (0,)) per compressed module, written beside its factors.

    With pifa imported they are ignored. Without it, transformers does not know the ``"pifa"``
    quantization, skips it and would build plain linears with random weights (only a warning); the
    empty ``weight`` then has the wrong size for those linears, and ``from_pretrained`` fails instead.
    """
    import torch

    return {f"{name}.{SENTINEL}": torch.empty(0, dtype=dtype) for name in modules}


def is_sentinel(key: str, modules: dict[str, dict[str, Any]]) -> bool:
    """Whether ``key`` names the sentinel of one of ``modules`` (see :func:`sentinel_tensors`)."""
    name, _, leaf = key.rpartition(".")
    return leaf == SENTINEL and name in modules


def custom_code_marker(path: str | os.PathLike) -> str | None:
    """The file of folder ``path`` that asks for custom code (an ``auto_map``), or ``None``.

    transformers runs Python files shipped in a model folder when a config names them in ``auto_map``
    (with ``trust_remote_code``, or after asking on a terminal); pifa never does, and refuses such folders.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    names = dict.fromkeys([*CUSTOM_CODE_CONFIGS, *sorted(p.name for p in path.glob("*config*.json"))])
    for name in names:
        file = path / name
        try:
            if not file.is_file() or file.stat().st_size > 16 * 2**20:
                continue
            data = json.loads(file.read_text(encoding="utf-8", errors="replace"))
        except RecursionError:  # cannot be read as data here, and transformers would fail on it too: refused
            raise ValueError(f"{name} of model folder {str(path)!r} nests its JSON too deeply") from None
        except (OSError, ValueError):
            continue  # unreadable or not JSON: the loader reports it
        if isinstance(data, dict) and ("auto_map" in data or "custom_pipelines" in data):
            return name
    return None


def check_no_custom_code(path: str | os.PathLike) -> None:
    """One-line ``ValueError`` when folder ``path`` carries custom code (see :func:`custom_code_marker`)."""
    marker = custom_code_marker(path)
    if marker is not None:
        raise ValueError(f"model folder {str(path)!r} carries custom code ('auto_map' in {marker}); "
                         "pifa never runs code from a model folder")
