"""Matplotlib figures reslab writes: readable PNGs, titled, labelled, with legends.

Uses the non-interactive Agg backend so plotting works on servers and in CI.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .fileio import atomic_write  # noqa: E402

if TYPE_CHECKING:
    from .inits import InitReport

DPI = 120


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write a PNG atomically and close the figure."""
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    plt.close(fig)
    return out


def plot_init_report(report: InitReport, path: str | Path, title: str = "") -> Path:
    """Predicted vs measured std of every weight tensor, in layer order (log scale)."""
    rows = [r for r in report.rows if r.kind in ("conv", "linear") and r.std_measured > 0]
    if not rows:
        rows = [r for r in report.rows if r.kind in ("conv", "linear")]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.12 * len(rows) + 4)), 4.2))
    measured = [r.std_measured for r in rows]
    predicted = [r.std_predicted if r.std_predicted is not None else float("nan") for r in rows]
    ax.plot(x, predicted, "-", color="tab:blue", label="predicted by the formula", linewidth=1.5)
    ax.plot(x, measured, "o", color="tab:orange", label="measured", markersize=3.5)
    if all(v > 0 for v in measured + [p for p in predicted if p == p]):
        ax.set_yscale("log")
    ax.set_xlabel("weight tensor (forward order)")
    ax.set_ylabel("std of the initial weights")
    ax.set_title(title or "initialization: predicted vs measured std")
    if len(rows) <= 24:
        ax.set_xticks(x, [r.path.removesuffix(".weight") for r in rows], rotation=60, ha="right", fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
