"""Measurements of finished runs that explain a study's numbers, not just state them.

A study's table says *whether* a claim holds on its data; a measurement says *why*.
The one here, :func:`bn_variance_measurement` (``"bn_running_var"`` in
:data:`MEASUREMENTS`), is for the batch-size study (Wu & He 2018, Group
Normalization, Fig. 1): BatchNorm's error grows as the per-device batch shrinks
because the statistics BN evaluates with are gathered, during training, from
small per-device groups.  A group of G images estimates the variance of a
channel only from within those G images, so the running variance it feeds into
the moving average misses part of the variance *between* images (Hoffer et al.
2017, ghost batches; Ioffe 2017, Batch Renormalization, Sec. 1).  At evaluation,
BN then divides by too small a standard deviation and over-scales activations,
layer after layer.  On easy data the accuracy may not show it; the ratio below
does, or shows that it is absent.

:func:`bn_statistics` compares, for every BatchNorm layer of a run, the running
statistics it holds with the exact population statistics of the same layer's
input over the run's un-augmented training images, the model in eval mode (the
inputs each layer sees at evaluation).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import SpecError, choices_error
from .evaluate import _load_run, check_eval_split, split_data
from .rundir import Run, read_config, require_run_dir
from .training import resolve_device

log = logging.getLogger(__name__)

VAR_FLOOR = 1e-12  # a channel whose input varies less than this over the population is left out of the medians
BELOW = 0.9  # a layer "under-estimates" when its running variance is below this share of the population's
BATCH_NORMS = ("bn", "brn")  # norm spec names whose layers keep running statistics (BatchNorm2d and subclasses)
BN_TITLE = "BatchNorm running statistics against the population"
BN_HEADERS = ["norm", "batch_size", "runs", "layers", "median running/population var", "layers below 0.9",
              "median |mean shift| (std)"]



# --- per run --------------------------------------------------------------------------


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer of ``model`` that keeps running statistics, by module path.

    Any ``_BatchNorm`` subclass counts: ``nn.BatchNorm2d``, reslab's
    ``GhostBatchNorm2d`` (``bn:ghost=G``, ``bn:splits=K``: buffers under
    BatchNorm2d's names, updated from the groups' statistics) and
    ``BatchRenorm2d`` (``brn``).  A layer without running statistics
    (``track_running_stats=False``) normalizes by batch statistics at evaluation
    too, so it has nothing to compare and is left out.
    """
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None}


class _Moments:
    """Streaming per-channel moments of a layer's input, exact in float64.

    Sums are taken around a per-channel shift (the first batch's mean), which
    keeps ``sum(x^2)/n - mean^2`` free of cancellation when a channel's mean is
    large against its spread; the result is the same population mean and variance.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        dims = [0, *range(2, x.dim())]  # every axis but the channels: N, H, W
        if self.shift is None:
            self.shift = x.mean(dims)
            self.sum = torch.zeros_like(self.shift)
            self.sumsq = torch.zeros_like(self.shift)
        view = (1, -1) + (1,) * (x.dim() - 2)
        d = x - self.shift.view(view)
        self.sum += d.sum(dims)
        self.sumsq += (d * d).sum(dims)
        self.count += x.numel() // x.shape[1]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population mean and variance (divided by the count, not count - 1) per channel."""
        n = float(self.count)
        centered = self.sum / n
        var = (self.sumsq / n - centered * centered).clamp_min(0.0)
        return self.shift + centered, var


@torch.no_grad()
def population_statistics(
    model: nn.Module, batches: Iterable[torch.Tensor | Sequence[Any]], layers: Mapping[str, nn.Module] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel population mean and variance (float64, on the batches' device) of each layer's *input*.

    ``model`` is run over ``batches`` (tensors, or ``(x, y)`` pairs) in the mode
    it is in; forward hooks on ``layers`` (default: :func:`batchnorm_layers`)
    accumulate sums and sums of squares over N, H, W.  Returns
    ``{module path: (mean, var)}`` in the order the layers first ran; a layer the
    forward never reached is absent.
    """
    layers = batchnorm_layers(model) if layers is None else layers
    moments: dict[str, _Moments] = {}  # filled in forward order

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            moments.setdefault(name, _Moments()).add(args[0])
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in layers.items()]
    try:
        for batch in batches:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: m.mean_var() for name, m in moments.items()}


def _quantiles(values: torch.Tensor) -> tuple[float, float, float]:
    """The 10%, 50% and 90% quantiles (linear interpolation, so an even count's median is the mid-point)."""
    if values.numel() == 0:
        return math.nan, math.nan, math.nan
    q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=values.dtype, device=values.device))
    return tuple(float(v) for v in q)  # type: ignore[return-value]


def layer_row(name: str, layer: _BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> dict[str, Any]:
    """One layer's running statistics against its input's population ``mean`` and ``var`` (per channel).

    ``var_ratio`` = running_var / population var (median and 10%/90% quantiles
    over channels); ``mean_shift`` = median over channels of
    ``|running_mean - population mean| / population std``.  Channels whose
    population variance is below :data:`VAR_FLOOR` (dead after a ReLU, or
    constant) have no meaningful ratio and are left out; with none left the
    numbers are NaN.
    """
    running_var = layer.running_var.detach().to(device=var.device, dtype=torch.float64)
    running_mean = layer.running_mean.detach().to(device=var.device, dtype=torch.float64)
    keep = var >= VAR_FLOOR
    ratio = running_var[keep] / var[keep]
    shift = (running_mean[keep] - mean[keep]).abs() / var[keep].sqrt()
    q10, q50, q90 = _quantiles(ratio)
    return {"layer": name, "channels": int(var.numel()), "var_ratio": q50, "var_ratio_q10": q10,
            "var_ratio_q90": q90, "mean_shift": _quantiles(shift)[1]}


def bn_statistics(run_dir: str | Path, split: str = "train", max_images: int | None = None, *,
                  batch_size: int | None = None, device: str = "cpu") -> list[dict[str, Any]]:
    """Every BatchNorm layer of a finished run: its running statistics against its input's population ones.

    Loads the run in ``run_dir`` as :func:`reslab.evaluate.load_run` does (the
    checkpoint's weights, eval mode), runs it over ``split`` of the images it
    trained on (default ``train``: the training images un-augmented and in order,
    as ``reslab eval --split train`` reads them; the first ``max_images`` only if
    given) in batches of ``batch_size`` (default the run's eval batch size), and
    accumulates, with forward hooks, the exact per-channel mean and variance
    (float64 sums over N, H, W) of each BatchNorm layer's input.

    Returns one dict per layer, in forward order::

        {"layer": module path, "channels": C,
         "var_ratio": median over channels of running_var / population var,
         "var_ratio_q10": ..., "var_ratio_q90": ...,
         "mean_shift": median over channels of |running_mean - population mean| / population std}

    ``var_ratio`` 1 means evaluation normalizes the layer exactly as the
    population of its inputs would; below 1 the running variance, averaged from
    small groups during training, under-estimates the variance between images
    (Hoffer et al. 2017; Wu & He 2018, Sec. 3), and evaluation over-scales by
    ``1/sqrt(var_ratio)``.  A model without BatchNorm gives ``[]``.  Bad input
    (no run there, a split the run lacks, a bad ``max_images``) is a SpecError.
    """
    folder = require_run_dir(run_dir)
    cfg = read_config(folder)
    split = check_eval_split(cfg, split, folder)
    for what, value in (("max_images", max_images), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SpecError(f"{what} must be a positive integer or None, got {value!r}")
    run, run_data = _load_run(folder, cfg, resolve_device(device))
    layers = batchnorm_layers(run.model)
    if not layers:
        return []
    data = split_data(cfg, run_data, split)
    if max_images is not None:
        data = replace(data, eval_images=data.eval_images[:max_images], eval_labels=data.eval_labels[:max_images])
    run.model.eval()  # the inputs every layer sees at evaluation, earlier layers normalizing by running statistics
    batches = data.eval_batches(batch_size or cfg.eval_batch_size, channels_last=run.channels_last)
    stats = population_statistics(run.model, batches, layers)
    return [layer_row(name, layers[name], mean, var) for name, (mean, var) in stats.items()]


# --- over a study ---------------------------------------------------------------------


def is_batchnorm(norm: Any) -> bool:
    """Whether a norm spec builds BatchNorm layers with running statistics: ``bn``, ``bn:...``, ``brn``, ``brn:...``."""
    return str(norm).split(":", 1)[0].strip() in BATCH_NORMS


def _run_entry(run: Run) -> tuple[Path, Any, Any, str]:
    """``(path, norm, batch_size, status)`` of a run record."""
    return Path(run.path), run.config.norm, run.config.batch_size, run.status


def _sig(value: float | None, digits: int = 3) -> float | None:
    """``value`` to ``digits`` significant digits; None for a missing or non-finite one."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return float(statistics.median(finite))


def bn_variance_measurement(study_dir: str | Path, runs: Iterable[Any], *, max_images: int | None = None,
                            device: str = "cpu") -> dict[str, Any] | None:
    """BatchNorm's running variance against the population variance, per norm and batch size.

    ``runs``: the study's runs, :class:`reslab.rundir.Run` records; a relative path is
    taken under ``study_dir``.  Every completed run whose
    ``norm`` builds BatchNorm layers (:func:`is_batchnorm`) is measured with
    :func:`bn_statistics` on its training images; a run that cannot be read is
    skipped with a warning.  The runs are grouped by ``norm`` and ``batch_size``
    (with ``bn:splits=K`` the per-device batch is batch_size / K), and each group
    gives, over its runs and layers, the median ``var_ratio``, the share of
    layers whose ``var_ratio`` is below 0.9, and the median ``mean_shift``.

    This is the mechanism behind Wu & He 2018, Fig. 1: per-device groups of G
    samples under-estimate the variance between images (Hoffer et al. 2017), so
    evaluation, which uses the running averages, normalizes differently from
    training; Batch Renormalization (Ioffe 2017) trains against the running
    statistics to close that gap.

    Returns ``{"title", "text", "headers", "rows"}`` (rows in the order the
    groups first appear in ``runs``, numbers to 3 significant digits), or None
    when no completed run has BatchNorm layers.
    """
    root = Path(study_dir)
    groups: dict[tuple[str, Any], list[list[dict[str, Any]]]] = {}
    for entry in runs:
        path, norm, batch_size, status = _run_entry(entry)
        if status != "completed" or not is_batchnorm(norm):
            continue
        folder = path if path.is_absolute() else root / path
        try:
            rows = bn_statistics(folder, "train", max_images, device=device)
        except SpecError as exc:  # an unreadable record, a dataset that is not there: measure the rest
            log.warning("bn_running_var: skipping %s: %s", folder, exc)
            continue
        if rows:
            groups.setdefault((str(norm), batch_size), []).append(rows)
    if not groups:
        return None

    table: list[list[Any]] = []
    summaries: list[tuple[str, float | None]] = []
    below_total = layers_total = 0
    for (norm, batch_size), measured in groups.items():
        layer_rows = [row for rows in measured for row in rows]
        ratios = [row["var_ratio"] for row in layer_rows if math.isfinite(row["var_ratio"])]
        below = sum(r < BELOW for r in ratios)
        below_total += below
        layers_total += len(ratios)
        median_ratio = _median(ratios)
        table.append([norm, batch_size, len(measured), len(layer_rows), _sig(median_ratio),
                      _sig(below / len(ratios)) if ratios else None,
                      _sig(_median([row["mean_shift"] for row in layer_rows]))])
        summaries.append((f"{norm} at batch {batch_size}", median_ratio))
    return {"title": BN_TITLE, "text": _bn_text(summaries, below_total, layers_total), "headers": list(BN_HEADERS),
            "rows": table}


def _bn_text(summaries: list[tuple[str, float | None]], below: int, layers: int) -> str:
    """What var_ratio is, and what this study's numbers show."""
    meaning = ("Running/population var is the running variance BatchNorm divides by at evaluation, averaged "
               "during training from the statistics of per-device groups of G samples, over the variance the "
               "same layer's input actually has on the un-augmented training images: 1 means evaluation "
               "normalizes exactly as the population does; below 1 the small groups missed variance between "
               "images and evaluation over-scales activations by 1/sqrt(ratio).")
    known = [(label, value) for label, value in summaries if value is not None]
    if not known:
        return meaning
    low = min(known, key=lambda item: item[1])
    high = max(known, key=lambda item: item[1])
    if low is high:
        shown = f"Here the median ratio is {low[1]:.3g} ({low[0]})"
    else:
        shown = f"Here the median ratio runs from {low[1]:.3g} ({low[0]}) to {high[1]:.3g} ({high[0]})"
    return f"{meaning} {shown}, with {below} of {layers} measured layers below {BELOW:g}."


# --- registry -------------------------------------------------------------------------


MEASUREMENTS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "bn_running_var": bn_variance_measurement,
}


def run_measurements(study_dir: str | Path, names: str | Iterable[str], runs: Iterable[Any]) -> list[dict[str, Any]]:
    """Run the measurements ``names`` (keys of :data:`MEASUREMENTS`) on a study's ``runs``.

    Every name is checked before any runs: an unknown one is a SpecError naming
    it and the valid choices.  Returns the measurements that found something to
    measure (a measurement returns None when no run fits it), in ``names`` order.
    """
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in MEASUREMENTS:
            raise choices_error("measurement", name, MEASUREMENTS)
    runs = list(runs)  # each measurement reads them all
    results = []
    for name in names:
        result = MEASUREMENTS[name](study_dir, runs)
        if result is not None:
            results.append(result)
    return results
