"""pifa: post-training low-rank compression of transformer models (MPIFA, SVD-LLM, SVD).

Public API::

    pifa.compress(model, pifa.CompressionConfig(density=0.5), calib) -> CompressionReport
    pifa.LowRankLinear, pifa.PivotLinear          # compressed layers
    pifa.rank_for_density(out, in, density, kind)  # rank maths
    pifa.save_compressed(model, path), pifa.load_compressed(path)
    pifa.fuse_siblings(model), pifa.unfuse_siblings(model)  # one first GEMM for q/k/v, gate/up (eager inference)
    pifa.SensitivityCache()                        # reuse sensitivity measurements across a density sweep

``import pifa`` registers the ``"pifa"`` quantization method with transformers (the one visible
call at the end of this file), so that ``AutoModel*.from_pretrained`` loads pifa checkpoints.
It writes no environment variable and installs no import hook. For bit-identical runs across
machine load, set ``MKL_DYNAMIC=FALSE`` before the first torch call (the ``pifa`` CLI does).
"""

from . import hf
from ._version import __version__
from .budget import rank_for_density
from .compress import compress
from .config import METHODS, CompressionConfig
from .fused import fuse_siblings, fused_groups, unfuse_siblings
from .io import load_compressed, save_compressed
from .layers import LowRankLinear, PivotLinear
from .pivot import select_pivots
from .report import CompressionReport
from .sensitivity import SensitivityCache

__all__ = [
    "METHODS",
    "CompressionConfig",
    "CompressionReport",
    "LowRankLinear",
    "PivotLinear",
    "SensitivityCache",
    "__version__",
    "compress",
    "fuse_siblings",
    "fused_groups",
    "load_compressed",
    "rank_for_density",
    "save_compressed",
    "select_pivots",
    "unfuse_siblings",
]

hf.register()
