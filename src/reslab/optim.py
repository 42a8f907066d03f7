"""Optimizers and learning-rate schedules by name.

Every schedule is a multiplier of the peak lr as a function of training
progress in epochs (fractional: it is evaluated every step), wrapped in one
``torch.optim.lr_scheduler.LambdaLR``.  That keeps the scheduler's state a
single step counter, so a resumed run continues on exactly the same curve.

| spec | multiplier at epoch e of E (after warmup) |
|---|---|
| ``constant`` | 1 |
| ``step:every=20,gamma=0.3333`` | gamma ** floor(e / every) — the seeds' "divide by 3 every 20 epochs" |
| ``multistep:milestones=0.5/0.75,gamma=0.1`` | x gamma at each milestone (fractions of E, or epoch numbers >= 1) — He et al. 2015 |
| ``cosine:final=0`` | cosine from 1 down to ``final`` (Loshchilov & Hutter 2017) |
| ``onecycle:peak_at=0.3,div=25,final_div=1e4`` | linear up from 1/div to 1, cosine down to 1/(div*final_div) (Smith 2018) |

``--warmup-epochs W`` multiplies any schedule by a linear ramp over the first W epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import SpecError, choices_error
from .specs import Converter, bind, parse_spec, positive_float, to_float, unit_float

Multiplier = Callable[[float, float], float]  # (epoch, total_epochs) -> lr multiplier


def _milestones(value: str) -> tuple[float, ...]:
    items = tuple(to_float(v) for v in value.split("/") if v.strip())
    if not items or any(v <= 0 for v in items):
        raise ValueError("expected positive numbers separated by '/', e.g. 0.5/0.75 or 82/123")
    return tuple(sorted(items))


def _constant() -> Multiplier:
    return lambda epoch, total: 1.0


def _step(every: float = 30.0, gamma: float = 0.1) -> Multiplier:
    return lambda epoch, total: gamma ** math.floor(epoch / every + 1e-9)


def _multistep(milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> Multiplier:
    def multiplier(epoch: float, total: float) -> float:
        at = [m * total if m < 1 else m for m in milestones]
        return gamma ** sum(epoch + 1e-9 >= m for m in at)

    return multiplier


def _cosine(final: float = 0.0) -> Multiplier:
    def multiplier(epoch: float, total: float) -> float:
        p = min(epoch / total, 1.0)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))

    return multiplier


def _onecycle(peak_at: float = 0.3, div: float = 25.0, final_div: float = 1e4) -> Multiplier:
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
    description: str
    params: dict[str, Converter]
    build: Callable[..., Multiplier]


SCHEDULES: dict[str, ScheduleEntry] = {
    "constant": ScheduleEntry("the peak lr throughout", {}, _constant),
    "step": ScheduleEntry("x gamma every `every` epochs", {"every": positive_float, "gamma": positive_float}, _step),
    "multistep": ScheduleEntry(
        "x gamma at each milestone (fractions of the run, or epochs)",
        {"milestones": _milestones, "gamma": positive_float}, _multistep,
    ),
    "cosine": ScheduleEntry("cosine decay to final x peak", {"final": unit_float}, _cosine),
    "onecycle": ScheduleEntry(
        "linear up to the peak, cosine down (Smith 2018)",
        {"peak_at": unit_float, "div": positive_float, "final_div": positive_float}, _onecycle,
    ),
}


def parse_schedule(spec: str) -> Multiplier:
    """Resolve a schedule spec into its multiplier; SpecError for unknown names or arguments."""
    parsed = parse_spec(spec, "schedule spec")
    entry = SCHEDULES.get(parsed.name)
    if entry is None:
        raise choices_error("schedule", parsed.text, SCHEDULES)
    return entry.build(**bind(parsed, entry.params, "schedule"))


def make_scheduler(
    optimizer: torch.optim.Optimizer, spec: str, *, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following ``spec`` with an optional linear warmup."""
    multiplier = parse_schedule(spec)
    warmup_steps = warmup_epochs * steps_per_epoch

    def at_step(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return scale * multiplier(step / steps_per_epoch, float(epochs))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, at_step)


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    # Norm scales/shifts and biases are 1-D; decaying them only fights the
    # normalization (Goyal et al. 2017 §5.1; the timm/torchvision convention).
    return param.ndim <= 1


def make_optimizer(
    model: nn.Module, name: str, *, lr: float, momentum: float, weight_decay: float,
    nesterov: bool = False, decay_norm_and_bias: bool = True,
) -> torch.optim.Optimizer:
    """Build sgd / adam / adamw over the model's parameters."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_norm_and_bias or weight_decay == 0:
        groups = [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    else:
        groups = [
            {"params": [p for n, p in params if not _is_no_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if _is_no_decay(n, p)], "weight_decay": 0.0},
        ]
    if name == "sgd":
        if nesterov and momentum == 0:
            raise SpecError("--nesterov needs --momentum > 0")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(momentum, 0.999))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise choices_error("optimizer", name, ("sgd", "adam", "adamw"))
