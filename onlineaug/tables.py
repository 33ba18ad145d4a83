"""Plain-text tables for the command line (``python -m onlineaug plan``) and the benchmarks."""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def format_value(value, digits: int = 3) -> str:
    """A table cell: None -> "n/a", floats to ``digits`` significant digits, the rest as str."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def text_table(columns: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A plain aligned table for the terminal."""
    body = [[v if isinstance(v, str) else format_value(v) for v in row] for row in rows]
    widths = [max(len(str(c)), *(len(r[i]) for r in body)) if body else len(str(c)) for i, c in enumerate(columns)]
    line = "  ".join(str(c).ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in body]
    return "\n".join(out)
