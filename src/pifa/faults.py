"""Named crash points for crash-safety tests.

When the environment variable ``PIFA_CRASH_AT`` equals a point's name, the process kills
itself there with SIGKILL (no cleanup, no ``finally``: a real crash). Points:
``capture`` (after the first calibration batch reached block 0), ``block:N:group`` (inside
block N, after its first group was solved), ``save`` (weights written, directory not yet
renamed). ``NAME@R`` crashes only the process of torch.distributed rank R (environment ``RANK``).
Unset, each point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "PIFA_CRASH_AT"


def crash_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if wanted and (wanted == name or wanted == f"{name}@{os.environ.get('RANK', '0')}"):
        os.kill(os.getpid(), signal.SIGKILL)
