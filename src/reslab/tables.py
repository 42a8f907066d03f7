"""Tables as text: one place that knows how a cell is written and which columns align right.

:func:`format_table` writes a table for the terminal; :func:`table_cells` gives the
same cells and alignment to the report's markdown and HTML tables, so a number reads
the same wherever it is shown.
"""

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


def numeric_columns(width: int, rows: Sequence[Sequence[Any]]) -> list[bool]:
    """Which of ``width`` columns hold only numbers (or None): those align right."""
    return [bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
            for i in range(width)]


def table_cells(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4,
                right: Sequence[bool] | None = None) -> tuple[list[list[str]], list[bool]]:
    """Each cell's text (:func:`format_value`) and, per column, whether it aligns right.

    ``right`` sets the alignment of each column; by default a column of numbers
    aligns right and any other column left.
    """
    cells = [[format_value(v, digits) for v in row] for row in rows]
    aligned = list(right) if right is not None else numeric_columns(len(headers), rows)
    if len(aligned) != len(headers):
        raise ValueError(f"{len(aligned)} alignments for {len(headers)} columns")
    return cells, aligned


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4,
                 right: Sequence[bool] | None = None) -> str:
    """``rows`` aligned under ``headers`` and a rule; see :func:`table_cells` for cells and alignment."""
    cells, aligned = table_cells(headers, rows, digits, right)
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, aligned, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)
