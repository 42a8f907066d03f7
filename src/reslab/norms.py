"""Normalization layers by spec string.

``make_norm("gn:16", 64)`` builds a layer; ``norm_factory("gn")`` resolves a
spec once into a ``num_channels -> nn.Module`` callable, which is what models
hold (timm's ``create_norm`` shape): blocks only ever call ``norm_layer(ch)``.

Every layer works on NCHW tensors, has per-channel affine parameters where it
has any (weight 1, bias 0 at construction) and exposes them as ``.weight`` /
``.bias`` so init policies and ``zero_init_residual`` can find them.

| spec       | layer                                                    |
|------------|----------------------------------------------------------|
| ``bn``     | BatchNorm2d (``bn:momentum=0.1,eps=1e-5``)                 |
| ``gn``     | GroupNorm, 32 groups (Wu & He 2018), see :func:`gn_groups` |
| ``gn:G``   | GroupNorm with exactly G groups; G must divide C          |
| ``ln``     | LayerNorm over (C, H, W) per sample = GroupNorm(1, C)     |
| ``in``     | InstanceNorm with affine = GroupNorm(C, C)                |
| ``rms``    | RMSNorm over channels at each position (``nn.RMSNorm``)   |
| ``none``   | Identity                                                 |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .errors import SpecError
from .registry import Registry
from .specs import (
    Converter,
    Spec,
    bind,
    parse_spec,
    positive_float,
    positive_int,
    unit_float,
)

NormFactory = Callable[[int], nn.Module]

# Wu & He 2018 (arXiv 1803.08494) use G = 32 groups throughout.
DEFAULT_GROUPS = 32


def gn_groups(num_channels: int, groups: int = DEFAULT_GROUPS) -> int:
    """Group count for plain ``gn``: 32 where it divides C, else the fallback.

    The fallback keeps Wu & He's spirit (groups of C/32 channels, never more
    than 32 groups) for narrow or oddly sized layers such as the 16-channel
    stages of CIFAR ResNets: it takes the largest divisor of C that is at most
    ``groups``.  So C=16 gets 16 groups (one channel each), C=48 gets 24,
    C=3 gets 3.
    """
    if num_channels % groups == 0:
        return groups
    return max(d for d in range(1, min(groups, num_channels) + 1) if num_channels % d == 0)


class LayerNorm2d(nn.GroupNorm):
    """LayerNorm over (C, H, W) of each sample with a per-channel affine.

    Equals ``GroupNorm(1, C)``: mean and variance over every value of a sample,
    scale and shift per channel (not per element as ``nn.LayerNorm([C,H,W])``
    would, which ties the layer to one input size).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)


class InstanceNorm2dAffine(nn.GroupNorm):
    """InstanceNorm with a per-channel affine: equals ``GroupNorm(C, C)``.

    Built on GroupNorm rather than ``nn.InstanceNorm2d`` because the latter
    switches to running statistics in some configurations and warns on 1x1
    inputs; GroupNorm(C, C) is exactly per-sample, per-channel normalization.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(num_channels, num_channels, eps=eps)


class RMSNorm2d(nn.Module):
    """RMSNorm over the channels at each spatial position of an NCHW tensor.

    ``y[n, :, h, w] = x[n, :, h, w] / rms(x[n, :, h, w]) * weight`` - no mean
    subtraction and no bias (Zhang & Sennrich 2019).  Computed by
    ``nn.RMSNorm`` on a channels-last view.
    """

    def __init__(self, num_channels: int, eps: float | None = None):
        super().__init__()
        self.norm = nn.RMSNorm(num_channels, eps=eps)

    @property
    def weight(self) -> nn.Parameter:
        return self.norm.weight

    @property
    def bias(self) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class NormEntry:
    name: str
    description: str
    params: dict[str, Converter]
    build: Callable[..., nn.Module]  # (num_channels, **bound args) -> module


def _build_gn(num_channels: int, groups: int | None = None, eps: float = 1e-5) -> nn.Module:
    if groups is None:
        return nn.GroupNorm(gn_groups(num_channels), num_channels, eps=eps)
    if num_channels % groups != 0:
        raise SpecError(
            f"norm 'gn:{groups}' cannot split a layer of {num_channels} channels into {groups} groups: "
            f"groups must divide the channel count (divisors of {num_channels} up to 32: "
            f"{', '.join(str(d) for d in range(1, min(32, num_channels) + 1) if num_channels % d == 0)}); "
            "or use plain 'gn' for the automatic fallback"
        )
    return nn.GroupNorm(groups, num_channels, eps=eps)


_REGISTRY: Registry[NormEntry] = Registry("norm")


def register_norm(entry: NormEntry) -> NormEntry:
    return _REGISTRY.register(entry.name, entry)


register_norm(NormEntry(
    "bn", "BatchNorm2d: batch statistics in training, running averages in eval",
    {"momentum": unit_float, "eps": positive_float},
    lambda c, momentum=0.1, eps=1e-5: nn.BatchNorm2d(c, eps=eps, momentum=momentum),
))
register_norm(NormEntry(
    "gn", "GroupNorm, gn:G for G groups; plain gn = 32 groups, or the largest divisor of C below 32",
    {"groups": positive_int, "eps": positive_float},
    _build_gn,
))
register_norm(NormEntry(
    "ln", "LayerNorm over (C,H,W) of each sample, per-channel affine = GroupNorm(1, C)",
    {"eps": positive_float},
    lambda c, eps=1e-5: LayerNorm2d(c, eps=eps),
))
register_norm(NormEntry(
    "in", "InstanceNorm with per-channel affine = GroupNorm(C, C)",
    {"eps": positive_float},
    lambda c, eps=1e-5: InstanceNorm2dAffine(c, eps=eps),
))
register_norm(NormEntry(
    "rms", "RMSNorm over channels at each position (nn.RMSNorm), scale only",
    {"eps": positive_float},
    lambda c, eps=None: RMSNorm2d(c, eps=eps),
))
register_norm(NormEntry(
    "none", "no normalization (Identity)",
    {},
    lambda c: nn.Identity(),
))


def _resolve(spec: str | Spec) -> tuple[NormEntry, dict]:
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec, "norm spec")
    entry = _REGISTRY.lookup(parsed.name, parsed.text or parsed.name)
    return entry, bind(parsed, entry.params, "norm")


def norm_factory(spec: str | Spec) -> NormFactory:
    """Resolve a norm spec once into a ``num_channels -> nn.Module`` factory."""
    entry, kwargs = _resolve(spec)
    return partial(entry.build, **kwargs)


def make_norm(spec: str, num_channels: int) -> nn.Module:
    """Build the norm layer ``spec`` for ``num_channels`` channels."""
    if not isinstance(num_channels, int) or num_channels < 1:
        raise SpecError(f"num_channels must be a positive integer, got {num_channels!r}")
    return norm_factory(spec)(num_channels)


def list_norms() -> dict[str, str]:
    """Every norm name with a one-line description."""
    return {name: entry.description for name, entry in _REGISTRY.items()}


def norm_names() -> list[str]:
    return list(_REGISTRY)


def has_affine_weight(module: nn.Module) -> bool:
    """True for a norm layer with a learnable per-channel scale."""
    return isinstance(getattr(module, "weight", None), torch.Tensor)


__all__ = [
    "DEFAULT_GROUPS", "NormFactory", "RMSNorm2d", "LayerNorm2d", "InstanceNorm2dAffine",
    "gn_groups", "make_norm", "norm_factory", "list_norms", "norm_names", "register_norm",
]
