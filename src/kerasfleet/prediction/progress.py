"""A progress bar (rows/s, ETA) for long calls; silent when not on a terminal."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, enabled: bool | None) -> Any:
    """A tqdm bar, or None when `enabled` is False, or None and stderr is not a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc="kerasfleet", dynamic_ncols=True, file=sys.stderr)
