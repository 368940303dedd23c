"""Where optional shared reference data lives (general-domain text, benchmarks, real logs).

The project never ships that data: tests and the study read it from ``../shared/data`` (or
``$GEMS_SHARED_DATA``) and fall back, saying so, where it is absent (a user's fresh machine).
"""

from __future__ import annotations

import os
from pathlib import Path

from gems.config import PROJECT_ROOT


def shared_data_dir() -> Path | None:
    """The shared data folder, or None when this machine has none."""
    env = os.environ.get("GEMS_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(PROJECT_ROOT.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def shared_file(*parts: str) -> Path | None:
    """A file under the shared data folder, or None when absent."""
    root = shared_data_dir()
    if root is None:
        return None
    p = root.joinpath(*parts)
    return p if p.exists() else None
