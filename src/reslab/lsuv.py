"""LSUV: Layer-Sequential Unit-Variance initialization (Mishkin & Matas 2016, arXiv 1511.06422).

The paper's Algorithm 1: give every conv and linear weight an orthogonal
matrix (Saxe et al. 2013), then, layer by layer in the order the forward pass
reaches them, divide the weight by the square root of the variance of the
layer's output on one batch until that variance is within ``tol`` of 1 or
``max_iter`` rescalings are spent.  Each layer sees the already rescaled
earlier layers, and rescaling a later layer leaves earlier outputs alone, so
every layer ends within ``tol``.

Decisions worth knowing:

* The passes run the net as training does (BN on the batch's statistics) but
  with every dropout off, so each measurement is deterministic; every module's
  train/eval flag and every buffer (BN running stats, ``num_batches_tracked``)
  are restored afterwards: LSUV changes conv/linear weights (and, with
  ``orthogonal``, zeroes their biases) and nothing else.
* Variances are population variances over every element of the output, in
  float64.  A module reached more than once in a forward pass is measured at
  its first call; a weight shared by several modules is rescaled once, at the
  module that reaches it first.  Layers the forward pass never reaches are
  skipped.
* Only the weight is divided, as in the paper (the bias is zero after the
  orthogonal step).  A layer whose output variance is 0 (a zero weight, dead
  inputs) cannot be rescaled: it is reported with ``converged=False``.  A
  non-finite output is a SpecError naming the layer.
* Each step stops the forward pass as soon as the current layer's output is
  captured, so it costs only the net up to that layer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .convs import CONV_TYPES
from .errors import SpecError

DEFAULT_TOL = 0.1      # the paper's Tol_var
DEFAULT_MAX_ITER = 10  # the paper's T_max

LAYER_TYPES = (*CONV_TYPES, nn.Linear)


@dataclass(frozen=True)
class LsuvLayer:
    """What LSUV did to one layer."""

    path: str            # module path in the model, e.g. "layer1.0.conv1"
    variance: float      # output variance on the batch after LSUV (the final one)
    iterations: int      # rescaling steps taken
    converged: bool      # |variance - 1| <= tol


class _Captured(Exception):
    """Raised by a hook to end a forward pass once the wanted output is measured."""


def check_lsuv_args(tol: float, max_iter: int) -> None:
    """SpecError unless ``0 < tol < 1`` and ``max_iter`` is an integer >= 1."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0.0 < tol < 1.0:
        raise SpecError(f"LSUV tol must be a number in (0, 1), got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise SpecError(f"LSUV max_iter must be an integer >= 1, got {max_iter!r}")


def _check_batch(batch: torch.Tensor) -> None:
    if not isinstance(batch, torch.Tensor):
        raise SpecError(f"LSUV batch must be a tensor, got {type(batch).__name__}")
    if batch.dim() == 0 or batch.shape[0] < 1:
        raise SpecError(f"LSUV batch must hold at least one sample, got shape {tuple(batch.shape)}")


def _to_model(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``batch`` on the model's device, and in its dtype if both are floating point."""
    param = next(model.parameters(), None)
    if param is None:
        return batch
    dtype = param.dtype if batch.is_floating_point() and param.is_floating_point() else batch.dtype
    return batch.to(device=param.device, dtype=dtype)


def _layers(model: nn.Module) -> dict[nn.Module, str]:
    """Every conv/linear module and its path (the model's own class name if it is one)."""
    return {m: name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}


def _variance(output: torch.Tensor) -> float:
    return float(output.detach().to(torch.float64).var(correction=0)) if output.numel() else float("nan")


@contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """Training mode with dropout off, under no_grad; modes and buffers restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes:
            m.training = training


def _forward_order(model: nn.Module, batch: torch.Tensor, layers: dict[nn.Module, str]) -> list[nn.Module]:
    """The conv/linear modules in the order one forward pass first reaches them."""
    order: dict[nn.Module, None] = {}

    def hook(module: nn.Module, _inputs, _output) -> None:
        order.setdefault(module, None)

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return list(order)


def _measure(model: nn.Module, batch: torch.Tensor, layer: nn.Module, path: str) -> float:
    """Output variance of ``layer`` (first call), running the model only up to it."""
    found: list[float] = []

    def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
        if not torch.isfinite(output).all():
            raise SpecError(f"LSUV: layer {path!r} gives non-finite outputs on the batch")
        found.append(_variance(output))
        raise _Captured

    handle = layer.register_forward_hook(hook)
    try:
        model(batch)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not found:
        raise SpecError(f"LSUV: the forward pass no longer reaches layer {path!r}")
    return found[0]


def lsuv_variances(model: nn.Module, batch: torch.Tensor) -> dict[str, float]:
    """Each reached conv/linear layer's output variance on ``batch``, in forward order.

    One forward pass under the same conditions as :func:`lsuv_init` (training
    mode, dropout off, buffers restored); the model is left unchanged.
    """
    _check_batch(batch)
    batch = _to_model(model, batch)
    layers = _layers(model)
    variances: dict[str, float] = {}

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        variances.setdefault(layers[module], _variance(output))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with _measuring(model):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return variances


def lsuv_init(model: nn.Module, batch: torch.Tensor, *, tol: float = DEFAULT_TOL,
              max_iter: int = DEFAULT_MAX_ITER, orthogonal: bool = True) -> list[LsuvLayer]:
    """LSUV-initialize ``model`` on ``batch`` (Mishkin & Matas 2016, arXiv 1511.06422, Algorithm 1).

    With ``orthogonal`` every conv/linear weight first gets ``nn.init.orthogonal_``
    (a conv weight as its ``(out, in*k*k)`` matrix) and its bias zeros; without it
    the caller's weights are the starting point.  Then each layer, in forward order,
    is divided by the square root of its output variance until that is within
    ``tol`` of 1 or ``max_iter`` rescalings are done.  Returns one row per layer
    reached, in forward order.  The batch is moved to the model's device (and
    floating dtype); the model is not moved.
    """
    check_lsuv_args(tol, max_iter)
    _check_batch(batch)
    batch = _to_model(model, batch)
    layers = _layers(model)
    with _measuring(model):
        order = _forward_order(model, batch, layers)  # also materializes lazy layers
        if not order:
            raise SpecError(f"LSUV: the forward pass of {type(model).__name__} reaches no conv or linear layer")
        if orthogonal:
            seen: set[int] = set()
            for m in layers:
                if id(m.weight) not in seen:
                    seen.add(id(m.weight))
                    nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        results = []
        rescaled: set[int] = set()
        for layer in order:
            if id(layer.weight) in rescaled:
                continue
            rescaled.add(id(layer.weight))
            path = layers[layer]
            steps = 0
            variance = _measure(model, batch, layer, path)
            while abs(variance - 1.0) > tol and steps < max_iter and variance > 0.0:
                layer.weight.div_(math.sqrt(variance))
                steps += 1
                variance = _measure(model, batch, layer, path)
            results.append(LsuvLayer(path, variance, steps, abs(variance - 1.0) <= tol))
    return results


__all__ = ["DEFAULT_MAX_ITER", "DEFAULT_TOL", "LsuvLayer", "check_lsuv_args", "lsuv_init", "lsuv_variances"]
