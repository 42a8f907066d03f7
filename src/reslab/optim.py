"""Optimizers and learning-rate schedules by name, each a :class:`reslab.registry.Registry`.

Every schedule is a multiplier of the peak lr as a function of training
progress in epochs (fractional: it is evaluated every step), wrapped in one
``torch.optim.lr_scheduler.LambdaLR``.  That keeps the scheduler's state a
single step counter, so a resumed run continues on exactly the same curve.

| spec | multiplier at epoch e of E (after warmup) |
|---|---|
| ``constant`` | 1 |
| ``step:every=20,gamma=0.3333`` | gamma ** floor(e / every): the seeds' "divide by 3 every 20 epochs" |
| ``multistep:milestones=0.5/0.75,gamma=0.1`` | x gamma at each milestone (fractions of E, or epochs >= 1); |
| | He et al. 2015 |
| ``cosine:final=0`` | cosine from 1 down to ``final`` (Loshchilov & Hutter 2017) |
| ``onecycle:peak_at=0.3,div=25,final_div=1e4`` | linear up from 1/div to 1, cosine down to 1/(div*final_div) |
| | (Smith 2018) |

``--warmup-epochs W`` multiplies any schedule by a linear ramp over the first W epochs.

Optimizers (``sgd``, ``adam``, ``adamw``) take no spec arguments: their lr, momentum
(Adam's beta1), Nesterov flag and weight decay are fields of the training config.
torch is imported on first use, so the config can read :func:`optimizer_names` without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import SpecError
from .registry import Registry
from .specs import Converter, positive_float, to_float, unit_float

if TYPE_CHECKING:
    import torch
    from torch import nn

Multiplier = Callable[[float, float], float]  # (epoch, total_epochs) -> lr multiplier


@dataclass(frozen=True)
class Milestones:
    """``multistep``'s milestones, written as in a spec: ``0.5/0.75`` (fractions of the run) or ``82/123`` (epochs)."""

    values: tuple[float, ...]

    def __iter__(self) -> Iterator[float]:
        return iter(self.values)

    def __str__(self) -> str:
        return "/".join(f"{v:g}" for v in self.values)


def _milestones(value: str) -> Milestones:
    items = tuple(to_float(v) for v in value.split("/") if v.strip())
    if not items or any(v <= 0 for v in items):
        raise ValueError("expected positive numbers separated by '/', e.g. 0.5/0.75 or 82/123")
    return Milestones(tuple(sorted(items)))


def _constant() -> Multiplier:
    return lambda epoch, total: 1.0


def _step(*, every: float, gamma: float) -> Multiplier:
    return lambda epoch, total: gamma ** math.floor(epoch / every + 1e-9)


def _multistep(*, milestones: Milestones, gamma: float) -> Multiplier:
    def multiplier(epoch: float, total: float) -> float:
        at = [m * total if m < 1 else m for m in milestones]
        return gamma ** sum(epoch + 1e-9 >= m for m in at)

    return multiplier


def _cosine(*, final: float) -> Multiplier:
    def multiplier(epoch: float, total: float) -> float:
        p = min(epoch / total, 1.0)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))

    return multiplier


def _onecycle(*, peak_at: float, div: float, final_div: float) -> Multiplier:
    low, final = 1 / div, 1 / (div * final_div)

    def multiplier(epoch: float, total: float) -> float:
        p = min(epoch / total, 1.0)
        if p < peak_at:
            return low + (1 - low) * p / peak_at
        q = (p - peak_at) / max(1 - peak_at, 1e-12)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * q))

    return multiplier


@dataclass(frozen=True)
class ScheduleEntry:
    name: str
    description: str
    params: dict[str, tuple[Converter, Any]]  # argument -> (converter, default)
    build: Callable[..., Multiplier]  # (**every argument) -> multiplier
    check: Callable[..., str | None] | None = None
    # (**every argument) -> whether the multiplier at each epoch is the same whatever the run's total epochs
    ignores_total: Callable[..., bool] = field(default=lambda **_: False)


def _epoch_milestones(*, milestones: Milestones, **_: Any) -> bool:
    return all(m >= 1 for m in milestones)  # epoch numbers, not fractions of the run


SCHEDULES: Registry[ScheduleEntry] = Registry("schedule")
for _entry in (
    ScheduleEntry("constant", "the peak lr throughout", {}, _constant, ignores_total=lambda **_: True),
    ScheduleEntry("step", "x gamma every `every` epochs",
                  {"every": (positive_float, 30.0), "gamma": (positive_float, 0.1)}, _step,
                  ignores_total=lambda **_: True),
    ScheduleEntry("multistep", "x gamma at each milestone: a fraction of the run (< 1) or an epoch (>= 1), "
                               "'/'-separated (He et al. 2015)",
                  {"milestones": (_milestones, Milestones((0.5, 0.75))), "gamma": (positive_float, 0.1)},
                  _multistep, ignores_total=_epoch_milestones),
    ScheduleEntry("cosine", "cosine decay from the peak to final x peak at the end of the run (Loshchilov & Hutter "
                            "2017)", {"final": (unit_float, 0.0)}, _cosine),
    ScheduleEntry("onecycle", "linear up from peak/div to the peak at peak_at of the run, then cosine down to "
                              "peak/(div*final_div) (Smith 2018)",
                  {"peak_at": (unit_float, 0.3), "div": (positive_float, 25.0), "final_div": (positive_float, 1e4)},
                  _onecycle),
):
    SCHEDULES.register(_entry.name, _entry)


def parse_schedule(spec: str) -> Multiplier:
    """Resolve a schedule spec into its multiplier; SpecError for unknown names or arguments."""
    resolved = SCHEDULES.resolve(spec)
    return resolved.entry.build(**resolved.args)


def schedule_ignores_total(spec: str) -> bool:
    """Whether the lr curve of ``spec`` up to any epoch is the same whatever the run's total epochs
    (``constant``, ``step``, ``multistep`` with epoch-number milestones), so a resume may add epochs."""
    resolved = SCHEDULES.resolve(spec)
    return resolved.entry.ignores_total(**resolved.args)


def list_schedules() -> dict[str, str]:
    """Every schedule name with a one-line description and its arguments' defaults."""
    return SCHEDULES.describe()


def schedule_names() -> list[str]:
    return list(SCHEDULES)


def make_scheduler(
    optimizer: torch.optim.Optimizer, spec: str, *, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following ``spec`` with an optional linear warmup."""
    import torch

    multiplier = parse_schedule(spec)
    warmup_steps = warmup_epochs * steps_per_epoch

    def at_step(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return scale * multiplier(step / steps_per_epoch, float(epochs))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, at_step)


# --- optimizers ------------------------------------------------------------------------


def _sgd(groups: list[dict], *, lr: float, momentum: float, nesterov: bool) -> torch.optim.Optimizer:
    import torch

    if nesterov and momentum == 0:
        raise SpecError("--nesterov needs --momentum > 0")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def _adam(groups: list[dict], *, lr: float, momentum: float, nesterov: bool) -> torch.optim.Optimizer:
    import torch

    return torch.optim.Adam(groups, lr=lr, betas=(momentum, 0.999))


def _adamw(groups: list[dict], *, lr: float, momentum: float, nesterov: bool) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    description: str
    # (param groups, lr=, momentum=, nesterov=) -> optimizer; weight decay is set per group
    build: Callable[..., torch.optim.Optimizer]
    params: dict[str, tuple[Converter, Any]] = field(default_factory=dict)  # none: the config sets them all
    check: Callable[..., str | None] | None = None


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer")
for _entry in (
    OptimizerEntry("sgd", "SGD with momentum (--momentum), Nesterov's with --nesterov; weight decay added to the "
                          "gradient", _sgd),
    OptimizerEntry("adam", "Adam (Kingma & Ba 2015): beta1 = --momentum, beta2 = 0.999; weight decay added to the "
                           "gradient (L2)", _adam),
    OptimizerEntry("adamw", "AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay; beta1 = --momentum, "
                            "beta2 = 0.999", _adamw),
):
    OPTIMIZERS.register(_entry.name, _entry)
del _entry


def optimizer_names() -> tuple[str, ...]:
    """Every optimizer name, in registration order: the choices of the config's ``optimizer`` field."""
    return tuple(OPTIMIZERS)


def list_optimizers() -> dict[str, str]:
    """Every optimizer name with a one-line description."""
    return OPTIMIZERS.describe()


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    # Norm scales/shifts and biases are 1-D; decaying them only fights the
    # normalization (Goyal et al. 2017 §5.1; the timm/torchvision convention).
    return param.ndim <= 1


def make_optimizer(
    model: nn.Module, name: str, *, lr: float, momentum: float, weight_decay: float,
    nesterov: bool = False, decay_norm_and_bias: bool = True,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` (``sgd``, ``adam``, ``adamw``) over the model's trainable parameters."""
    entry = OPTIMIZERS.resolve(name).entry
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_norm_and_bias or weight_decay == 0:
        groups = [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    else:
        groups = [
            {"params": [p for n, p in params if not _is_no_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if _is_no_decay(n, p)], "weight_decay": 0.0},
        ]
    return entry.build(groups, lr=lr, momentum=momentum, nesterov=nesterov)
