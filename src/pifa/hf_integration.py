"""Load pifa checkpoints with plain ``transformers.AutoModel*.from_pretrained``.

``save_compressed`` writes, next to ``pifa_config.json``, a ``quantization_config`` block into
``config.json``::

    "quantization_config": {"quant_method": "pifa", "format_version": 1, "library_version": "0.1.0",
                            "modules": {"model.layers.0.self_attn.q_proj":
                                        {"kind": "pivot", "in_features": 64, "out_features": 64,
                                         "rank": 16, "bias": false}, ...}}

This module registers the quantization method ``"pifa"`` with transformers' public plugin API
(``register_quantization_config`` / ``register_quantizer``): the quantizer swaps the listed
linears for empty :class:`~pifa.PivotLinear` / :class:`~pifa.LowRankLinear` on the meta device
before transformers loads the safetensors weights, and rebuilds ``PivotLinear``'s derived index
buffers afterwards. No ``trust_remote_code``, no pickle.

transformers has no entry-point discovery for quantizers, so ``import pifa`` is needed before
``from_pretrained``. ``import pifa`` does not import transformers (it stays fast): it installs
an import hook that registers the quantizer the moment ``transformers.quantizers.auto`` is
imported (at once if it already is). :func:`register` does it explicitly.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import logging
import sys
from typing import Any

from torch import nn

from ._version import __version__
from .layers import PivotLinear
from .serialization import (
    FORMAT_VERSION,
    HF_CONFIG_NAME,
    LAYER_KINDS,
    QUANT_METHOD,
    _check_entry,
    compressed_modules,
    replace_with_compressed_layers,
)

logger = logging.getLogger(__name__)

_AUTO_MODULE = "transformers.quantizers.auto"
_SOURCE = f"{HF_CONFIG_NAME} quantization_config"
__all__ = ["PifaHfQuantizer", "PifaQuantizationConfig", "register"]


@functools.cache
def _classes() -> tuple[type, type]:
    """Define the transformers subclasses (imports transformers, hence done on first use)."""
    import torch

    quantizers_base = importlib.import_module("transformers.quantizers.base")
    quantization_config = importlib.import_module("transformers.utils.quantization_config")

    class PifaQuantizationConfig(quantization_config.QuantizationConfigMixin):
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
                _check_entry(name, entry, _SOURCE)

        def to_dict(self) -> dict[str, Any]:
            return {
                "quant_method": QUANT_METHOD,
                "format_version": self.format_version,
                "library_version": self.library_version,
                "modules": {name: dict(entry) for name, entry in self.modules.items()},
            }

    class PifaHfQuantizer(quantizers_base.HfQuantizer):
        """Builds the compressed layers of a pifa checkpoint inside ``from_pretrained``.

        Nothing is quantized on the fly: the checkpoint must come from ``pifa.save_compressed``
        (``requires_calibration``). The layers hold ordinary float parameters (plus the int64
        ``pivot_index`` buffer), so the model can be fine-tuned, compiled and saved again.
        """

        requires_calibration = True

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            return None

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            # The model is on the meta device, built in the load dtype: each compressed layer
            # takes the dtype and device of the linear it replaces.
            self.replaced = replace_with_compressed_layers(model, self.quantization_config.modules, source=_SOURCE)
            _tolerate_compressed_children(model)
            return model

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            # transformers 5 sets the loaded tensors directly (no _load_from_state_dict) and leaves
            # the non-persistent buffers uninitialised: rebuild them from the loaded pivot_index.
            _restore_init_weights(model)
            with torch.no_grad():
                for name, module in model.named_modules():
                    if not isinstance(module, PivotLinear):
                        continue
                    if module.pivot_index.device.type == "meta":  # offloaded to disk with offload_buffers=True
                        raise ValueError(
                            f"pifa: the pivot_index buffer of {name!r} was offloaded to disk; its derived "
                            "index buffers cannot be rebuilt. Load with offload_buffers=False (the default)."
                        )
                    module._refresh_index()
            return model

        def get_state_dict_and_metadata(self, model: nn.Module, *args: Any, **kwargs: Any) -> tuple[None, dict]:
            # save_pretrained: describe the layers the model has now (it may have changed since loading).
            self.quantization_config.modules = compressed_modules(model)
            self.quantization_config.library_version = __version__
            model.config.quantization_config = self.quantization_config
            return None, {}

        def _dequantize(self, model: nn.Module, dtype: Any = None) -> nn.Module:
            """Replace every compressed layer by the equivalent dense ``nn.Linear``."""
            for name, module in list(model.named_modules()):
                if isinstance(module, tuple(LAYER_KINDS.values())):
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

    for cls in (PifaQuantizationConfig, PifaHfQuantizer):
        cls.__module__ = __name__
    return PifaQuantizationConfig, PifaHfQuantizer


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
            if not any(isinstance(child, tuple(LAYER_KINDS.values())) for child in module.children()):
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


def __getattr__(name: str) -> Any:
    if name == "PifaQuantizationConfig":
        return _classes()[0]
    if name == "PifaHfQuantizer":
        return _classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the ``"pifa"`` quantization method with transformers (idempotent)."""
    auto = importlib.import_module(_AUTO_MODULE)  # also while it is being imported (the hook)
    config_cls, quantizer_cls = _classes()
    for mapping, cls, registrar in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, config_cls, auto.register_quantization_config),
        (auto.AUTO_QUANTIZER_MAPPING, quantizer_cls, auto.register_quantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is not None and getattr(existing, "__module__", None) != __name__:
            raise RuntimeError(f"transformers already has a quantization method {QUANT_METHOD!r}: {existing!r}")
        mapping.pop(QUANT_METHOD, None)  # ours from an earlier (reloaded) copy of this module
        registrar(QUANT_METHOD)(cls)


def _register_quietly() -> None:
    try:
        register()
    except Exception as exc:  # never break `import transformers` over it
        logger.warning("pifa could not register its quantizer with transformers: %s", exc)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``transformers.quantizers.auto``, then registers pifa."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _remove_hook()
        _register_quietly()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers.quantizers.auto`` so that pifa registers right after it runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _AUTO_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterOnImport)]


def install() -> None:
    """Register now if transformers' quantizers are imported, else as soon as they are."""
    if _AUTO_MODULE in sys.modules:
        _register_quietly()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


install()
