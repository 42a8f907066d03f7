"""Plain-text tables for terminal output (one place that knows column alignment)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_value(value: Any, digits: int = 4) -> str:
    """Numbers to ``digits`` significant figures, None to '-', the rest to str."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """Align ``rows`` under ``headers``; numbers right-aligned, text left-aligned."""
    cells = [[format_value(v, digits) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)
