"""Matplotlib figures reslab writes: readable PNGs, titled, labelled, with legends.

Every figure is a bare :class:`matplotlib.figure.Figure` drawn by its own Agg
canvas, so plotting works on servers and in CI without touching matplotlib's
process-wide state: importing this module or calling its functions never
selects a backend, never loads matplotlib's state-machine interface and never
registers a figure with its figure manager (an application that embeds reslab
keeps its own backend, and nothing has to be closed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .fileio import atomic_write

if TYPE_CHECKING:
    from .inits import InitReport

DPI = 120


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure no figure manager knows, drawn by its own Agg canvas (no global backend involved)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _tab10(i: int) -> tuple[float, float, float, float]:
    return matplotlib.colormaps["tab10"](i % 10)


def save_figure(fig: Figure, path: str | Path, **savefig_kw) -> Path:
    """Lay the figure out and write it as a PNG, atomically.

    The figure belongs to no figure manager, so there is nothing to close: it is
    freed with its last reference.
    """
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI, **savefig_kw))


def plot_init_report(report: InitReport, path: str | Path, title: str = "") -> Path:
    """Predicted vs measured std of every weight tensor, in layer order (log scale)."""
    rows = [r for r in report.rows if r.kind in ("conv", "linear") and r.std_measured > 0]
    if not rows:
        rows = [r for r in report.rows if r.kind in ("conv", "linear")]
    x = list(range(len(rows)))
    fig = new_figure((max(6.0, min(16.0, 0.12 * len(rows) + 4)), 4.2))
    ax = fig.subplots()
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


# --- sweep reports ------------------------------------------------------------------

_LINESTYLES = ("-", "--", ":", "-.")


def series_style(i: int) -> dict:
    """Color and line style of the i-th group: tab10 colors, a new line style every 10 groups.

    Indexed by group (not by what a plot happens to show) so a group keeps its
    color in every figure of a report.
    """
    return {"color": _tab10(i), "linestyle": _LINESTYLES[(i // 10) % len(_LINESTYLES)]}


LEGEND_INSIDE_MAX = 6  # more series than this: the legend goes outside, right of the axes


def plot_mean_curves(series: list[dict], path: str | Path, *, title: str, xlabel: str, ylabel: str,
                     legend_title: str = "", note: str = "") -> Path:
    """One line per series (mean) with a shaded ±std band; log y if the values span >2 decades.

    Each series is ``{"label", "x", "mean", "std"}`` (``std`` entries may be NaN:
    no band there, e.g. an epoch only one run reached), optionally with
    ``"style"`` (``series_style(i)``; default: by position).  ``note`` is printed under
    the axes (what is not shown and why).
    """
    import numpy as np

    many = len(series) > LEGEND_INSIDE_MAX
    fig = new_figure((10.5 if many else 8.0, 4.8))
    ax = fig.subplots()
    values = [v for s in series for v in s["mean"] if not math.isnan(v)]
    log_y = bool(values) and min(values) > 0 and max(values) / min(values) > 100
    for i, s in enumerate(series):
        style = s.get("style") or series_style(i)
        color = style["color"]
        x = np.asarray(s["x"], dtype=float)
        mean = np.asarray(s["mean"], dtype=float)
        std = np.asarray(s["std"], dtype=float)
        ax.plot(x, mean, label=s["label"], linewidth=1.8, marker="o" if len(x) <= 20 else None, markersize=3.5,
                **style)
        lo, hi = mean - std, mean + std
        if log_y:  # a band reaching 0 or below cannot be drawn on a log axis: leave that part out
            lo = np.where(lo > 0, lo, np.nan)
        ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if series and max(len(s["x"]) for s in series) <= 20:
        ax.xaxis.get_major_locator().set_params(integer=True)
    if not series:
        ax.text(0.5, 0.5, "no completed run has metrics to plot", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    elif many:
        ax.legend(title=legend_title or None, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  title_fontsize=9, frameon=False)
    else:
        ax.legend(title=legend_title or None, fontsize=9, title_fontsize=9)
    if note:
        ax.text(0.0, -0.16, note, ha="left", va="top", transform=ax.transAxes, fontsize=8, color="0.35")
    return save_figure(fig, path)


BAR_LABEL_CHARS = 24  # a long group label wraps after this many characters a line (at its ", " separators)
_LABEL_PAD_PT = 3.0  # gap between a bar's error bar and its value label


def plot_mean_bars(labels: list[str], means: list[float | None], stds: list[float | None], path: str | Path, *,
                   title: str, xlabel: str, ylabel: str, notes: list[str] | None = None,
                   ylim: tuple[float, float] | None = None) -> Path:
    """One bar per group (mean) with ±std error bars, the value written above each bar, saved as a PNG.

    See :func:`draw_mean_bars`, which draws it.
    """
    fig = draw_mean_bars(labels, means, stds, title=title, xlabel=xlabel, ylabel=ylabel, notes=notes, ylim=ylim)
    return save_figure(fig, path)


def draw_mean_bars(labels: list[str], means: list[float | None], stds: list[float | None], *, title: str,
                   xlabel: str, ylabel: str, notes: list[str] | None = None,
                   ylim: tuple[float, float] | None = None) -> Figure:
    """The figure :func:`plot_mean_bars` saves, laid out, for a caller (or a test) to inspect before saving.

    A group without a mean (no completed run) gets no bar, only its note.  ``notes``
    (one per group, may be empty) go under the value, e.g. "1 diverged".

    ``ylim`` is the range the values can take (0-100 for an accuracy in %): bars and
    error bars are clipped to it - an accuracy of 99.5 ± 3 cannot reach 102.5, so its
    bar stops at 100 while its label still says ± 3 - and the y ticks stay within it.
    Everything written stays readable: the axes get just the headroom above the
    range that the value labels need to sit inside them, a label that would run
    off the left or right edge is moved in, and long group names wrap at their
    ", " separators and turn only as far as keeps neighbours apart.
    """
    n = len(labels)
    notes = list(notes) if notes else [""] * n
    width = min(20.0, max(6.0, 0.75 * n + 2.5))
    fig = new_figure((width, 4.8))
    ax = fig.subplots()
    x = list(range(n))
    heights, below, above = [], [], []
    for m, s in zip(means, stds, strict=True):
        h = 0.0 if m is None else float(m)
        e = 0.0 if m is None or s is None or not math.isfinite(s) else abs(float(s))
        lo_err = hi_err = e
        if ylim:  # asymmetric where the range cuts the bar: never below ylim[0], never above ylim[1]
            h = min(max(h, ylim[0]), ylim[1])
            lo_err, hi_err = max(0.0, min(e, h - ylim[0])), max(0.0, min(e, ylim[1] - h))
        heights.append(h)
        below.append(lo_err)
        above.append(hi_err)
    colors = [series_style(i)["color"] for i in range(n)]
    ax.bar(x, heights, yerr=[below, above], color=colors, alpha=0.85, capsize=4,
           error_kw={"elinewidth": 1.2, "ecolor": "0.15"})
    ax.set_xlim(-0.6, n - 0.4)
    if ylim:
        ax.set_ylim(*ylim)
    low, high = ax.get_ylim()
    ax.set_yticks([t for t in ax.get_yticks() if low <= t <= high])  # fixed before the headroom is added
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)

    small = n > 10
    texts = []
    for i, (m, s, note) in enumerate(zip(means, stds, notes, strict=True)):
        note = note.replace(", ", "\n")  # one count a line keeps the label as narrow as its bar
        if m is None:
            text, y = note or "no completed run", low
        else:
            text = f"{m:.1f}" if s is None else f"{m:.1f}\n±{s:.1f}"
            text += f"\n{note}" if note else ""
            y = heights[i] + above[i]
        texts.append(ax.annotate(text, (i, y), xytext=(0.0, _LABEL_PAD_PT), textcoords="offset points",
                                 ha="center", va="bottom", fontsize=7 if small else 8.5,
                                 color="tab:red" if m is None else "0.1"))
    _group_ticks(fig, ax, labels)
    _fit_title(fig, ax)
    _keep_inside(fig, ax, texts, low, high)
    fig.draw_without_rendering()  # places what only a draw places (the axis labels), for inspection before saving
    return fig


def _wrap_label(label: str, chars: int) -> str:
    """``label`` broken into lines of at most ``chars``, at its ", " separators so no value is cut.

    A value far longer than a line (over 1.5 lines, e.g. ``kaiming_normal:mode=fan_out,nonlinearity=relu``)
    is cut after its own ``:`` / ``,`` / ``=`` separators, and one without any into line-long pieces:
    an unbroken name would force its turned label past the edge of the figure.
    """
    import re

    lines = []
    for line in label.splitlines() or [""]:
        pieces: list[tuple[str, str]] = []  # (what joins it to the piece before, the piece)
        for k, part in enumerate(line.split(", ")):
            subs = [part]
            if len(part) > 1.5 * chars:
                subs = [x for x in re.split(r"(?<=[:,=])", part) if x]
                subs = [x[i:i + chars] for x in subs for i in range(0, len(x), chars)] or [""]
            pieces += [(", " if k and i == 0 else "", sub) for i, sub in enumerate(subs)]
        current = pieces[0][1]
        for joiner, piece in pieces[1:]:
            if len(current) + len(joiner) + len(piece) <= chars:
                current += joiner + piece
            else:
                lines.append(current + joiner.rstrip())
                current = piece
        lines.append(current)
    return "\n".join(lines)


def _group_ticks(fig: Figure, ax, labels: list[str]) -> None:
    """Group names under their bars, none overlapping a neighbour or leaving the figure.

    Names that fit their bar's slot (wrapped at most to three lines) stay level.  Longer
    ones wrap at BAR_LABEL_CHARS and turn by the smallest angle of 30, 45, 60 and 90
    degrees at which neighbours clear each other: parallel labels a slot apart are
    ``slot * sin(angle)`` apart across their lines, which must exceed their height.
    The figure grows by the height turned labels take, so the axes keep theirs.
    """
    n = len(labels)
    if not n:
        ax.set_xticks([])
        return
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    slot = ax.get_window_extent(renderer).width / (n + 0.2)  # pixels per bar (xlim spans n + 0.2)
    # ~0.085 in per character of 10 pt text
    chars = max(6, int(0.9 * slot / fig.dpi / 0.085))
    level = [_wrap_label(label, chars) for label in labels]
    ax.set_xticks(range(n), level)
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
    if all(b.width <= 0.92 * slot for b in boxes) and max(t.count("\n") for t in level) < 3:
        return
    wrapped = [_wrap_label(label, BAR_LABEL_CHARS) for label in labels]
    ax.set_xticks(range(n), wrapped)
    ticks = ax.get_xticklabels()
    boxes = [t.get_window_extent(renderer) for t in ticks]  # unturned: width = length, height = thickness
    thick = max(b.height for b in boxes)
    angle = next((a for a in (30, 45, 60) if slot * math.sin(math.radians(a)) >= 1.1 * thick), 90)
    size = ticks[0].get_fontsize()
    scale = 1.0
    if angle == 90 and slot < 1.1 * thick:  # too many lines even upright: smaller type
        scale = max(5.0, size * slot / (1.1 * thick)) / size
    for t in ticks:
        t.set_fontsize(size * scale)
        t.set_rotation(angle)
        t.set_rotation_mode("anchor")
        t.set_horizontalalignment("right")
        t.set_verticalalignment("center" if angle == 90 else "top")
    rad = math.radians(angle)
    drop = max(b.width * math.sin(rad) + b.height * math.cos(rad) for b in boxes) * scale - thick
    w, h = fig.get_size_inches()
    fig.set_size_inches(w, h + max(0.0, drop) / fig.dpi)


def _fit_title(fig: Figure, ax) -> None:
    """Wrap a title wider than the figure onto more lines, so no part of it is cut off."""
    import textwrap

    renderer = fig.canvas.get_renderer()
    title = ax.title
    box = title.get_window_extent(renderer)
    room = 0.96 * fig.bbox.width
    if box.width > room and title.get_text():
        text = title.get_text()
        chars = max(20, int(len(text) * room / box.width))
        title.set_text(textwrap.fill(text, chars))


def _keep_inside(fig: Figure, ax, texts: list, low: float, high: float) -> None:
    """Raise the top of the y axis above ``high`` just enough that every value label sits
    inside the axes, then move any label that runs past the left or right edge back in.

    A label at data height y reaching ``r`` pixels above its anchor fits axes ``H``
    pixels tall when ``(y - low) / (top - low) * H + r <= H``, that is when
    ``top >= low + (y - low) * H / (H - r)``; the layout is redone after each raise
    (the axes' height moves with it), which settles in a few rounds.
    """
    top = high
    for _ in range(6):
        ax.set_ylim(low, top)
        fig.tight_layout()
        renderer = fig.canvas.get_renderer()
        box = ax.get_window_extent(renderer)
        needed = top
        for t in texts:
            y = t.xy[1]
            anchor = box.y0 + (y - low) / (top - low) * box.height
            reach = t.get_window_extent(renderer).y1 - anchor
            room = box.height * 0.98 - reach
            if room > 0:
                needed = max(needed, low + (y - low) * box.height / room)
        if needed <= top + 1e-9 * max(1.0, abs(top)):
            break
        top = needed
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    for t in texts:
        extent = t.get_window_extent(renderer)
        shift = max(0.0, box.x0 + 2 - extent.x0) - max(0.0, extent.x1 - (box.x1 - 2))
        if shift:
            t.xyann = (shift * 72.0 / fig.dpi, _LABEL_PAD_PT)


# --- signal propagation -------------------------------------------------------------

# (row attribute, panel title, y label) of the panels of plot_signal
_SIGNAL_PANELS = (
    ("act_std", "forward: activation std", "std of the activations"),
    ("act_sq_mean", "forward: channel-wise squared mean", "mean over channels of (channel mean)$^2$"),
    ("grad_std", "backward: gradient std", "std of d loss / d activation"),
)


def _undrawable(values: list[float]) -> str:
    """Why a log axis leaves some of ``values`` out ('' if it draws them all)."""
    bad = [i for i, v in enumerate(values) if not (math.isfinite(v) and v > 0)]
    if not bad:
        return ""
    zero = all(values[i] == 0 for i in bad)
    what = "0" if zero else "not finite" if all(not math.isfinite(values[i]) for i in bad) else "0 or not finite"
    if len(bad) == len(values):
        return f"{what} everywhere"
    if bad == list(range(bad[0], len(values))):
        return f"{what} from block {bad[0]}"
    return f"{what} at {len(bad)} blocks"


def plot_signal(rows, path: str | Path, *, title: str, xlabel: str = "block (0 = stem)") -> Path:
    """Signal propagation at init: activation std, channel-wise squared mean and gradient std
    against depth, log y, one curve per (norm, init); color = init, line style = norm.

    ``rows`` are :class:`reslab.diagnose.SignalRow` (anything with ``norm``, ``init``,
    ``block`` and the three panel attributes).  Values a log axis cannot show (0, inf,
    NaN) are left out of the curves and listed under the axes.
    """
    from .diagnose import signal_combos

    combos = signal_combos(rows)
    norms = list(dict.fromkeys(norm for norm, _ in combos))
    inits = list(dict.fromkeys(init for _, init in combos))
    depth = max((len(points) for points in combos.values()), default=0)

    fig = new_figure((15.5, 4.9))
    axes = fig.subplots(1, len(_SIGNAL_PANELS), sharex=True)
    notes = []
    for (norm, init), points in combos.items():
        style = {"color": _tab10(inits.index(init)),
                 "linestyle": _LINESTYLES[norms.index(norm) % len(_LINESTYLES)]}
        x = [row.block for row in points]
        missing = []
        for ax, (attr, _, _) in zip(axes, _SIGNAL_PANELS, strict=True):
            values = [float(getattr(row, attr)) for row in points]
            drawn = [v if math.isfinite(v) and v > 0 else float("nan") for v in values]
            ax.plot(x, drawn, label=f"{norm}, {init}", linewidth=1.8, marker="o" if depth <= 40 else None,
                    markersize=3, **style)
            why = _undrawable(values)
            if why:
                missing.append(f"{attr} {why}")
        if missing:
            notes.append(f"{norm}, {init}: " + "; ".join(missing))
    for ax, (_, panel_title, ylabel) in zip(axes, _SIGNAL_PANELS, strict=True):
        if any(line.get_ydata().size and (line.get_ydata() == line.get_ydata()).any() for line in ax.get_lines()):
            ax.set_yscale("log")
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.1)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="norm, init", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9,
               title_fontsize=9, frameon=False)
    fig.suptitle(title)
    if notes:
        text = "not drawn (a log axis cannot show 0, inf or NaN): " + " | ".join(notes)
        fig.text(0.01, 0.0, text, ha="left", va="top", fontsize=8, color="0.35", wrap=True)
    return save_figure(fig, path, bbox_inches="tight")
