"""How the report writes numbers: one rule for every section."""

from __future__ import annotations

import math


def number(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals, or ``n/a`` when missing or nan."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"
