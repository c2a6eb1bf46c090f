"""Numbers read back from a sweep record: a record is input, never trusted."""

from __future__ import annotations

import math
from typing import Any, Optional


def number(value: Any) -> Optional[float]:
    """``value`` when it is a finite real number, else None."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if real and math.isfinite(value) else None
