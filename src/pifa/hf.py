"""Load pifa checkpoints with plain ``transformers.AutoModel*.from_pretrained``.

``save_compressed`` writes, next to ``pifa_config.json``, a ``quantization_config`` block into
``config.json``::

    "quantization_config": {"quant_method": "pifa", "format_version": 1, "library_version": "0.1.0",
                            "modules": {"model.layers.0.self_attn.q_proj":
                                        {"kind": "pivot", "in_features": 64, "out_features": 64,
                                         "rank": 16, "bias": false}, ...}}

This module defines the quantization method ``"pifa"`` for transformers' public plugin API
(``register_quantization_config`` / ``register_quantizer``): the quantizer swaps the listed
linears for empty :class:`~pifa.PivotLinear` / :class:`~pifa.LowRankLinear` on the meta device
before transformers loads the safetensors weights, and rebuilds ``PivotLinear``'s derived index
buffers afterwards. No ``trust_remote_code``, no pickle. Before any weight is read, the checkpoint's
safetensors headers are checked against the module table (every tensor present, right shape, fitting
dtype) and against the model (no uncompressed tensor of another shape or dtype kind); after loading, every
tensor, compressed or not, must have come from the checkpoint (transformers' loading report, see
:mod:`pifa.inputs`). Any failure is a one-line ``ValueError``: no layer is left with uninitialised weights.

transformers has no entry-point discovery for quantizers: :func:`register` adds pifa's, and
``import pifa`` calls it (a plain, visible call; importing this module alone changes nothing).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ._version import __version__
from .format import (
    FORMAT_VERSION,
    HF_CONFIG_NAME,
    QUANT_METHOD,
    SENTINEL,
    WEIGHTS_NAME,
    check_entry,
    check_header,
    compressed_modules,
    read_header,
    sentinel_tensors,
    weight_files,
)
from .inputs import check_declared_sizes, check_header_fits, check_loading_info
from .io import replace_with_compressed_layers
from .layers import PivotLinear, is_compressed

logger = logging.getLogger(__name__)

_SOURCE = f"{HF_CONFIG_NAME} quantization_config"
_CHECKPOINT = "the pifa checkpoint"
__all__ = ["PifaHfQuantizer", "PifaQuantizationConfig", "register"]


class PifaQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a pifa checkpoint: which linears are compressed, and how.

    ``modules`` maps qualified module names to ``{"kind": "pivot"|"lowrank", "in_features",
    "out_features", "rank", "bias"}``, exactly as in ``pifa_config.json``.
    """

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        library_version: str | None = None,
        **kwargs: Any,  # quant_method, and fields a newer pifa may add
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.library_version = library_version or __version__
        self.modules = dict(modules or {})
        self.post_init()

    def post_init(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"unknown pifa {_SOURCE} format_version {self.format_version!r} "
                f"(this pifa reads {FORMAT_VERSION})"
            )
        for name, entry in self.modules.items():
            check_entry(name, entry, _SOURCE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "library_version": self.library_version,
            "modules": {name: dict(entry) for name, entry in self.modules.items()},
        }

class PifaHfQuantizer(HfQuantizer):
    """Builds the compressed layers of a pifa checkpoint inside ``from_pretrained``.

    Nothing is quantized on the fly: the checkpoint must come from ``pifa.save_compressed``
    (``requires_calibration``). The layers hold ordinary float parameters (plus the int64
    ``pivot_index`` buffer), so the model can be fine-tuned, compiled and saved again.
    """

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update_attn_implementation(self, config: Any) -> Any:
        """The last hook before transformers builds the model: a local checkpoint's declared sizes (layer count,
        hidden size, ...) are checked against its safetensors headers here (see
        :func:`pifa.inputs.check_declared_sizes`), so that a config.json declaring 100,000 layers is refused at
        once instead of after minutes of building them."""
        folder = Path(str(getattr(config, "_name_or_path", "") or ""))
        if str(folder) and folder.is_dir():
            try:
                files = weight_files(folder)
            except ValueError:
                files = []  # transformers reports a folder without weights itself
            if files:
                check_declared_sizes(config, read_header(files), _CHECKPOINT)
        return super().update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        # Before any data is read: every tensor the table implies is in the checkpoint, with its shape
        # and a fitting dtype (transformers would otherwise leave a missing one uninitialised, and
        # cast an integer coeff to garbage).
        modules = self.quantization_config.modules
        header = None
        if checkpoint_files:
            unsafe = [f for f in checkpoint_files if not str(f).endswith(".safetensors")]
            if unsafe:
                raise ValueError(f"pifa checkpoints are safetensors only; refusing {Path(unsafe[0]).name!r}")
            header = read_header(checkpoint_files)
            check_header(header, modules, WEIGHTS_NAME, _SOURCE)
        # The model is on the meta device, built in the load dtype: each compressed layer
        # takes the dtype and device of the linear it replaces.
        self.replaced = replace_with_compressed_layers(model, modules, source=_SOURCE)
        if header is not None:  # the uncompressed tensors too: their shapes, no integer data read as float weights
            check_header_fits(header, model, _CHECKPOINT)
        _ignore_sentinels(model, [*modules, *self.replaced])
        _tolerate_compressed_children(model)
        _record_loading_info(model)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # transformers 5 sets the loaded tensors directly (no _load_from_state_dict) and leaves
        # the non-persistent buffers uninitialised: rebuild them from the loaded pivot_index.
        _restore_init_weights(model)
        info = vars(model).pop("_pifa_loading_info", None)
        vars(model).pop("_adjust_missing_and_unexpected_keys", None)
        if info is not None:  # every tensor, compressed or not (embeddings, head, norms), came from the checkpoint
            check_loading_info(info, _CHECKPOINT)
        with torch.no_grad():
            for name, module in model.named_modules():
                if is_compressed(module):
                    module.relayout_()
                if not isinstance(module, PivotLinear):
                    continue
                if module.pivot_index.device.type == "meta":  # offloaded to disk with offload_buffers=True
                    raise ValueError(
                        f"pifa: the pivot_index buffer of {name!r} was offloaded to disk; its derived "
                        "index buffers cannot be rebuilt. Load with offload_buffers=False (the default)."
                    )
                module._refresh_index()
        _check_all_loaded(model, getattr(self, "replaced", []))
        return model

    def get_state_dict_and_metadata(self, model: nn.Module, *args: Any, **kwargs: Any) -> tuple[dict | None, dict]:
        # save_pretrained: describe the layers the model has now (it may have changed since loading), and
        # write their sentinels (see pifa.format.sentinel_tensors) as save_compressed does.
        modules = compressed_modules(model)
        self.quantization_config.modules = modules
        self.quantization_config.library_version = __version__
        model.config.quantization_config = self.quantization_config
        if not modules:
            return None, {}
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return {**model.state_dict(), **sentinel_tensors(modules, dtype)}, {}

    def _dequantize(self, model: nn.Module, dtype: Any = None) -> nn.Module:
        """Replace every compressed layer by the equivalent dense ``nn.Linear``."""
        for name, module in list(model.named_modules()):
            if is_compressed(module):
                linear = module.to_linear()
                if isinstance(dtype, torch.dtype):
                    linear = linear.to(dtype)
                model.set_submodule(name, linear)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True  # the compressed factors are plain parameters: training needs no adapter

    @property
    def is_compileable(self) -> bool:
        return True


class _TolerantInit:
    """A model's ``_init_weights`` that lets a module with compressed children go.

    transformers runs ``_init_weights`` on every module after loading (the loaded tensors are
    guarded); some models reach into children there, e.g. GPT-2's ``module.c_proj.weight``,
    which a compressed layer does not have. Those children were loaded from the checkpoint.
    """

    def __init__(self, init_weights: Any) -> None:
        self.init_weights = init_weights

    def __call__(self, module: nn.Module) -> None:
        try:
            self.init_weights(module)
        except AttributeError:
            if not any(is_compressed(child) for child in module.children()):
                raise
            logger.debug("skipped the rest of _init_weights on %s (compressed children)", type(module).__name__)


def _tolerate_compressed_children(model: nn.Module) -> None:
    for module in model.modules():  # the model and every sub-model (each has its own _init_weights)
        if hasattr(module, "_initialize_weights") and "_init_weights" not in vars(module):
            module._init_weights = _TolerantInit(module._init_weights)


def _restore_init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(vars(module).get("_init_weights"), _TolerantInit):
            del module._init_weights


def _ignore_sentinels(model: nn.Module, names: list[str]) -> None:
    """The compressed modules' empty ``weight`` markers are expected in the checkpoint: not reported as unexpected."""
    patterns = {rf"(^|\.){re.escape(name)}\.{SENTINEL}$" for name in names}
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns


def _record_loading_info(model: nn.Module) -> None:
    """Keep transformers' loading report (missing and mismatched keys, after its own exceptions) on the model for
    ``_process_model_after_weight_loading``: the quantizer is not handed it, and a tensor missing from the
    checkpoint would otherwise be filled with random values. transformers calls
    ``model._adjust_missing_and_unexpected_keys(info)`` once, after loading; this wraps it for that call."""
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is None:  # another transformers: the compressed tensors are still checked (_check_all_loaded)
        return

    def record(info: Any) -> None:
        adjust(info)
        model.__dict__["_pifa_loading_info"] = info

    model.__dict__["_adjust_missing_and_unexpected_keys"] = record


def _check_all_loaded(model: nn.Module, replaced: list[str]) -> None:
    """After loading: every compressed layer's parameters and ``pivot_index`` came from the checkpoint.

    transformers flags what it loaded (``_is_hf_initialized``) and fills the rest with fresh values;
    for a compressed layer that would be garbage, so a tensor without the flag is an error (checked
    only when the flag is in use, i.e. some compressed tensor carries it; tensors offloaded to disk are skipped).
    """
    tensors = {}
    for name in replaced:
        layer = model.get_submodule(name)
        tensors.update({f"{name}.{key}": t for key, t in layer.named_parameters()})
        if isinstance(layer, PivotLinear):
            tensors[f"{name}.pivot_index"] = layer.pivot_index
    flags = {key: getattr(t, "_is_hf_initialized", None) for key, t in tensors.items()
             if t.device.type != "meta"}  # offloaded to disk: accelerate loads those when they are used
    if any(flags.values()):
        missing = sorted(key for key, flag in flags.items() if not flag)
        if missing:
            raise ValueError(f"pifa: the checkpoint did not provide {missing[0]!r}"
                             + (f" and {len(missing) - 1} more compressed tensors" if len(missing) > 1 else ""))


def register() -> None:
    """Register the ``"pifa"`` quantization method with transformers (idempotent)."""
    for mapping, cls, registrar in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, PifaQuantizationConfig, auto.register_quantization_config),
        (auto.AUTO_QUANTIZER_MAPPING, PifaHfQuantizer, auto.register_quantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is not None and getattr(existing, "__module__", None) != __name__:
            raise RuntimeError(f"transformers already has a quantization method {QUANT_METHOD!r}: {existing!r}")
        mapping.pop(QUANT_METHOD, None)  # ours from an earlier (reloaded) copy of this module
        registrar(QUANT_METHOD)(cls)
