"""Where files worth keeping between runs go: checkpoints the project writes, kernels it builds, quantized shards.

$FIDDLER_CACHE, else $XDG_CACHE_HOME/fiddler-moe, else ~/.cache/fiddler-moe. A cluster's sockets live elsewhere,
in a private run folder per cluster (launch/rundir.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    if os.environ.get("FIDDLER_CACHE"):
        return Path(os.environ["FIDDLER_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fiddler-moe"
