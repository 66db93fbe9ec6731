"""Layer speed: dense vs low-rank (U V) vs PIFA at the same rank, timed side by side.

    python benchmarks/bench_layer.py                      # 4096 x 4096, rank 2048, fp32 + bf16
    python benchmarks/bench_layer.py --device cuda        # on a GPU (adds 2:4 sparse where supported)

The same measurement as `pifa bench layer` (this script only forwards its arguments).
The FLOP ideal of low-rank / PIFA is (m + n) / (m + n - r) = 1.33 at r = n / 2.
"""

import sys

from pifa.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "layer", *sys.argv[1:]]))
