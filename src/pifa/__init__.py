"""pifa: post-training low-rank compression of transformer models (MPIFA, SVD-LLM, SVD).

Public API::

    pifa.LowRankLinear, pifa.PivotLinear          # compressed layers
    pifa.rank_for_density(out, in, density, kind)  # rank maths
    pifa.save_compressed(model, path), pifa.load_compressed(path)
"""

import os as _os

# Determinism: MKL may otherwise change its thread count with the machine's load, and with it
# the rounding of every GEMM, so that a resumed run would not reproduce an uninterrupted one
# bit for bit. Only a default: a value the user set wins. Must precede the first MKL call.
_os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from ._version import __version__  # noqa: E402
from .layers import LowRankLinear, PivotLinear
from .pivot import select_pivots
from .ranks import rank_for_density
from .serialization import load_compressed, save_compressed
from . import hf_integration  # noqa: E402,F401  registers the "pifa" quantizer: transformers' from_pretrained loads save_compressed dirs

__all__ = [
    "__version__",
    "LowRankLinear",
    "PivotLinear",
    "load_compressed",
    "rank_for_density",
    "save_compressed",
    "select_pivots",
]

from .config import CompressionConfig  # noqa: E402
from .engine import compress  # noqa: E402
from .report import CompressionReport  # noqa: E402

__all__ += ["CompressionConfig", "CompressionReport", "compress"]
