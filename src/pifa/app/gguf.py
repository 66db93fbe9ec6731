"""GGUF model input: find a ``.gguf`` file and load it, dequantized, as an ordinary transformers model.

A GGUF file (llama.cpp's format) holds the weights, often block-quantized, the model's hyper-parameters
and its tokenizer (vocabulary, merges, special tokens, chat template). transformers reads all of it with
``from_pretrained(folder, gguf_file=name)``; this module finds the file, asks transformers for a *dense*
model in the requested dtype, and removes every trace of the GGUF quantization, so that the model
saves, compresses and reloads like one read from safetensors.

Needs the optional packages ``gguf`` and ``accelerate`` (``pip install gguf accelerate``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from ..data import MAX_CHAT_TEMPLATE
from ..inputs import check_loading_info, quiet_load_report
from ..validate import first_line

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
# metadata value types of fixed size -> bytes (u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64); 8 string, 9 array
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INTEGER_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_MAX_STRING = 1 << 26  # a longer metadata string means a corrupt length field
# model attributes transformers sets on a quantized model; none of them may survive a dequantized load
_QUANT_ATTRIBUTES = ("hf_quantizer", "quantization_method")


def find_gguf(path: str | Path) -> tuple[Path, str] | None:
    """Where the GGUF input named by ``path`` is, as ``(folder, file name)``; ``None`` when it is not GGUF input.

    A ``.gguf`` file is itself; a folder holding exactly one ``.gguf`` file (and no ``config.json`` with
    safetensors weights, which make it an ordinary model folder) is that file. A folder holding several
    ``.gguf`` files is ambiguous: ``ValueError``. Anything else (a model folder, a missing path, a hub id)
    gives ``None``, so the caller goes on with its own loading and its own errors.
    """
    path = Path(path)
    if path.is_file():
        return (path.parent, path.name) if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir():
        return None
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return None
    names = sorted(p.name for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(names) > 1:
        raise ValueError(
            f"model folder {str(path)!r} holds {len(names)} GGUF files ({', '.join(names)}); name one of them")
    return (path, names[0]) if names else None




class _HeaderReader:
    """Reads a GGUF header, checking every length and count against the bytes left in the file before it reads
    or allocates anything: a count of 2^40 or 2^62 elements is refused in one line, never multiplied out."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self.stream, self.size = stream, size

    def left(self) -> int:
        return self.size - self.stream.tell()

    def exact(self, size: int) -> bytes:
        if size > self.left():
            raise EOFError(f"the header claims {size:,} bytes where {self.left():,} are left in the file")
        data = self.stream.read(size)
        if len(data) != size:
            raise EOFError("file ends inside the GGUF header")
        return data

    def skip(self, size: int) -> None:
        if size > self.left():
            raise EOFError(f"the header claims {size:,} bytes where {self.left():,} are left in the file")
        self.stream.seek(size, 1)

    def count(self, what: str, count: int, each: int) -> int:
        """``count`` items of at least ``each`` bytes must fit in what is left of the file."""
        if count * each > self.left():
            raise EOFError(f"{what} count {count:,} needs at least {count * each:,} bytes, {self.left():,} are left "
                           "in the file")
        return count

    def string_length(self) -> int:
        (length,) = struct.unpack("<Q", self.exact(8))
        if length > min(_MAX_STRING, self.left()):
            raise EOFError(f"metadata string of {length:,} bytes")
        return length

    def string(self) -> str:
        return self.exact(self.string_length()).decode("utf-8")

    def skip_value(self, value_type: int) -> None:
        """Move past one metadata value of ``value_type`` without decoding it."""
        if value_type in _SCALAR_BYTES:
            self.skip(_SCALAR_BYTES[value_type])
        elif value_type == 8:
            self.skip(self.string_length())
        elif value_type == 9:
            element_type, count = struct.unpack("<IQ", self.exact(12))
            if element_type in _SCALAR_BYTES:
                self.skip(self.count("array", count, _SCALAR_BYTES[element_type]) * _SCALAR_BYTES[element_type])
            elif element_type in (8, 9):
                for _ in range(self.count("array", count, 8 if element_type == 8 else 12)):
                    self.skip_value(element_type)
            else:
                raise EOFError(f"unknown metadata array element type {element_type}")
        else:
            raise EOFError(f"unknown metadata value type {value_type}")


def scan_gguf_header(file: str | Path) -> dict[str, Any]:
    """Walk the whole GGUF header before anything else reads it: every metadata count and length against the
    bytes left in the file, every tensor's dimensions and data against the file's size, the chat template's
    length against ``MAX_CHAT_TEMPLATE``. Returns ``{"architecture": ..., "tensors": ..., "chat_template_chars":
    ...}``; a file that is not GGUF, or whose header is garbled, cut short or claims more than the file holds,
    is a one-line ``ValueError``. Seeks past values instead of reading them: cheap on any size of model."""
    file = Path(file)
    found: dict[str, Any] = {"architecture": None, "tensors": 0, "chat_template_chars": 0}
    try:
        with file.open("rb") as stream:
            if stream.read(4) != GGUF_MAGIC:
                raise ValueError(f"{str(file)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")
            header = _HeaderReader(stream, file.stat().st_size)
            version, tensor_count, kv_count = struct.unpack("<IQQ", header.exact(20))
            if version not in _GGUF_VERSIONS:
                raise ValueError(f"{str(file)!r} is GGUF version {version}; only versions 2 and 3 can be read")
            header.count("metadata key", kv_count, 8 + 8 + 4 + 1)
            header.count("tensor", tensor_count, 8 + 4 + 8 + 4 + 8)
            for _ in range(kv_count):
                key = header.string()
                (value_type,) = struct.unpack("<I", header.exact(4))
                if key == "general.architecture" and value_type == 8 and found["architecture"] is None:
                    found["architecture"] = header.string()
                elif key.endswith((".block_count", ".embedding_length")) and value_type in _INTEGER_FORMATS:
                    (found[key.rsplit(".", 1)[1]],) = struct.unpack(_INTEGER_FORMATS[value_type],
                                                                    header.exact(_SCALAR_BYTES[value_type]))
                elif key == "tokenizer.chat_template" and value_type == 8:
                    length = header.string_length()
                    if length > MAX_CHAT_TEMPLATE * 4:  # UTF-8: at most 4 bytes a character
                        raise ValueError(f"GGUF file {str(file)!r} has a chat template of {length:,} bytes, more than "
                                         f"the {MAX_CHAT_TEMPLATE:,} characters pifa accepts")
                    found["chat_template_chars"] = chars = len(header.exact(length).decode("utf-8"))
                    if chars > MAX_CHAT_TEMPLATE:
                        raise ValueError(f"GGUF file {str(file)!r} has a chat template of {chars:,} characters, more "
                                         f"than the {MAX_CHAT_TEMPLATE:,} pifa accepts")
                else:
                    header.skip_value(value_type)
            data_bytes = []
            for _ in range(tensor_count):
                name = header.string()
                (dims,) = struct.unpack("<I", header.exact(4))
                if not 1 <= dims <= 8:
                    raise EOFError(f"tensor {name!r} has {dims} dimensions")
                shape = struct.unpack(f"<{dims}Q", header.exact(8 * dims))
                tensor_type, offset = struct.unpack("<IQ", header.exact(12))
                data_bytes.append((name, shape, tensor_type, offset))
            found["tensors"] = tensor_count
            _check_declared(file, found, data_bytes)
            _check_tensor_data(file, data_bytes, stream.tell(), header.size)
    except (EOFError, struct.error, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"GGUF file {str(file)!r} is corrupt or unreadable ({exc})") from None
    if found["architecture"] is None:
        raise ValueError(f"GGUF file {str(file)!r} declares no general.architecture")
    return found


def _check_declared(file: Path, found: dict[str, Any], tensors: list[tuple[str, tuple[int, ...], int, int]]) -> None:
    """The block count and embedding length the header declares against its tensors (``blk.N.*``, their
    dimensions): transformers builds the model from the declared sizes before it reads a tensor."""
    blocks = len({name.split(".")[1] for name, *_ in tensors if name.startswith("blk.") and name.count(".") >= 2})
    declared = found.get("block_count")
    if tensors and isinstance(declared, int) and declared > blocks:
        raise ValueError(f"GGUF file {str(file)!r} declares {declared:,} blocks (block_count) but holds tensors of "
                         f"{blocks}: refused before building the model")
    width = found.get("embedding_length")
    dims = {dim for _, shape, *_ in tensors for dim in shape}
    if tensors and isinstance(width, int) and width not in dims:
        raise ValueError(f"GGUF file {str(file)!r} declares embedding_length {width:,}, but no tensor has that "
                         "dimension: refused before building the model")


def _check_tensor_data(file: Path, tensors: list[tuple[str, tuple[int, ...], int, int]], end: int, size: int) -> None:
    """Each tensor's data (its element count in its type's blocks) lies inside the file, before any is read."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:  # the loader reports the missing package
        return
    start = end  # the data section starts at the end of the header or after it (aligned): a lower bound
    for name, shape, tensor_type, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
        except (ValueError, KeyError):
            raise EOFError(f"tensor {name!r} has unknown type {tensor_type}") from None
        elements = 1
        for dim in shape:
            elements *= dim
        nbytes = elements // block * type_size
        if elements % block or start + offset + nbytes > size:
            raise EOFError(f"tensor {name!r} of shape {tuple(reversed(shape))} claims {nbytes:,} bytes at offset "
                           f"{offset:,}, beyond the end of the file")


def gguf_architecture(file: str | Path) -> str:
    """The ``general.architecture`` a GGUF file declares (e.g. ``"llama"``), after :func:`scan_gguf_header` has
    checked the whole header against the file's size. A file that is not GGUF, or whose header is cut short,
    garbled or claims more than the file holds, is a one-line ``ValueError``."""
    return scan_gguf_header(file)["architecture"]


def require_gguf_support() -> None:
    """One-line ``ValueError`` unless the optional packages transformers needs for GGUF are installed."""
    for package in ("gguf", "accelerate"):
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # a None entry in sys.modules, or a broken install
            found = False
        if not found:
            raise ValueError(f"reading GGUF files needs the {package!r} package: pip install {package}")


def _resolve(dtype: torch.dtype | str | None, device: torch.device | str | None) -> tuple[torch.dtype, torch.device]:
    """The load dtype ("auto" -> float32: a GGUF's blocks have no native torch dtype) and device."""
    if dtype in (None, "auto"):
        dtype = torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError("unknown dtype; use auto, float32, bfloat16 or float16")
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return dtype, torch.device(device)


def strip_gguf_traces(model: nn.Module, gguf_file: str | Path) -> None:
    """Make a dense model read from a GGUF indistinguishable from one read from safetensors.

    Drops the GGUF ``quantization_config``, the quantizer transformers attached, the quantized flags,
    the GGUF ``general.name`` (stored as a stray ``_model_name_or_path`` config key) and the GGUF weight
    conversions; records the file as ``config.name_or_path`` (never written to ``config.json``).
    """
    for attribute in _QUANT_ATTRIBUTES:
        if attribute in vars(model):
            delattr(model, attribute)
    if vars(model).get("is_quantized"):
        model.is_quantized = False
    if getattr(model, "_weight_conversions", None) is not None:
        model._weight_conversions = None
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            continue
        for key in ("quantization_config", "_model_name_or_path"):
            if key in config.__dict__:
                delattr(config, key)
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
    model.config.name_or_path = str(gguf_file)


def _tokenizer_without_gguf(tokenizer: Any, gguf_file: str | Path) -> Any:
    """Forget the GGUF file in the tokenizer's init kwargs, so ``save_pretrained`` does not write it;
    name the file as ``name_or_path`` (as the model's config does)."""
    for key in ("gguf_file", "vocab_file"):
        value = tokenizer.init_kwargs.get(key)
        if isinstance(value, str) and value.lower().endswith(GGUF_SUFFIX):
            del tokenizer.init_kwargs[key]
    tokenizer.name_or_path = str(gguf_file)
    return tokenizer


@contextlib.contextmanager
def _memoized_tensor_name_map() -> Iterator[None]:
    """Build gguf's GGUF -> HF tensor-name table once per load instead of once per submodule.

    transformers' GGUF reader (``get_gguf_hf_weights_map``) rebuilds the same table for each of the
    model's submodules: about 400 times, over half the load time of a 30-layer model. The table only
    depends on (architecture, block count) and is only read, so a cache is exact. A no-op when the
    ``gguf`` package has no such function.
    """
    import gguf

    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def load_gguf(path: str | Path, dtype: torch.dtype | str | None = "auto",
              device: torch.device | str | None = "cpu") -> tuple[nn.Module, Any]:
    """A dense causal LM and its tokenizer (chat template included) from a GGUF file or a folder holding one.

    Every quantized tensor is dequantized to ``dtype`` ("auto" -> float32); the model is in eval mode on
    ``device`` and carries no GGUF trace (see ``strip_gguf_traces``). Remote code is never run. Errors
    (not GGUF input, ``gguf`` missing, an architecture transformers cannot read, a corrupt file) are
    one-line ``ValueError``.
    """
    import transformers

    located = find_gguf(path)
    if located is None:
        raise ValueError(f"{str(path)!r} is not a GGUF file nor a folder holding one")
    folder, name = located
    file = folder / name
    dtype, device = _resolve(dtype, device)
    architecture = gguf_architecture(file)  # the whole header checked against the file's size first
    require_gguf_support()
    # transformers >= 5 may keep the blocks packed (GgufLinear); ask for plain dense weights. Older
    # versions have no GgufConfig and always dequantize.
    gguf_config = getattr(transformers, "GgufConfig", None)
    dense = {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}
    try:
        with _memoized_tensor_name_map(), quiet_load_report():  # its facts are checked below, in one line
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), gguf_file=name, dtype=dtype, trust_remote_code=False, output_loading_info=True, **dense)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 -- a corrupt file fails deep inside numpy/struct in many ways
        message = first_line(exc)
        if not isinstance(exc, (ValueError, OSError)):
            message = f"{'struct.error' if isinstance(exc, struct.error) else type(exc).__name__}: {message}"
        if isinstance(exc, NotImplementedError) or "not supported" in message or "Unrecognized config" in message:
            raise ValueError(
                f"transformers {transformers.__version__} cannot read GGUF architecture {architecture!r} "
                f"({str(file)!r}): {message}") from None
        raise ValueError(f"could not load GGUF file {str(file)!r} (architecture {architecture!r}; truncated or "
                         f"corrupt?): {message}") from None
    check_loading_info(info, f"GGUF file {str(file)!r}")
    strip_gguf_traces(model, file)
    return model.to(device=device, dtype=dtype).eval(), _tokenizer_without_gguf(tokenizer, file)
