"""Normalization layers by spec string.

``make_norm("gn:16", 64)`` builds a layer; ``norm_factory("gn")`` resolves a
spec once into a ``make(num_channels, act=False) -> nn.Module`` callable, which
is what models hold (timm's ``create_norm`` shape): blocks call
``norm_layer(ch)`` or ``norm_layer(ch, act=True)``.

The activation protocol: ``act=True`` tells the factory that the caller applies
an activation right after this layer, so a norm that fuses an activation
(``frn``, ``evonorm``) may take its place.  Such a layer has ``activates = True``
and the caller skips its own activation where :func:`norm_activates` says so;
built with ``act=False`` (the default) it is the normalization alone.  Every
other norm ignores ``act``.  A user's own ``num_channels -> nn.Module`` callable
has no ``act`` and is called without it.

Every layer works on NCHW tensors, has per-channel affine parameters where it
has any (weight 1, bias 0 at construction) and exposes them as ``.weight`` /
``.bias`` so init policies and ``zero_init_residual`` can find them.

| spec          | layer                                                          |
|---------------|----------------------------------------------------------------|
| ``bn``        | BatchNorm2d (``bn:momentum=0.1,eps=1e-5``)                       |
| ``gn``        | GroupNorm: at most 32 groups of at least 16 channels each      |
|               | (:func:`gn_groups`, groups per width below)                    |
| ``gn:G``      | GroupNorm with exactly G groups (``gn:groups=G``); G must      |
|               | divide every layer's channel count                             |
| ``gn:cpg=N``  | GroupNorm with exactly N channels per group (C/N groups); N    |
|               | must divide every layer's channel count; not with ``groups``   |
| ``ln``        | LayerNorm over (C, H, W) per sample = GroupNorm(1, C)           |
| ``in``        | InstanceNorm with affine = GroupNorm(C, C)                      |
| ``rms``       | RMSNorm over channels at each position, eps 1e-6 (``rms:eps=``) |
| ``brn``       | Batch Renormalization (``brn:r_max=3,d_max=5``)                 |
| ``frn``       | Filter Response Normalization, + TLU with ``act=True``          |
|               | (``frn:eps=1e-6``); batch-independent; fuses its activation    |
| ``evonorm``   | EvoNorm-S0, groups as ``gn`` (``evonorm:G``, ``evonorm:cpg=N``, |
|               | ``eps=1e-5``); batch-independent; fuses its activation         |
| ``none``      | Identity                                                       |

Groups of plain ``gn`` - the largest divisor G of C with G <= 32 and
C/G >= 16, or 1 group when C < 16 (Wu & He 2018, Table 3; see
:func:`gn_groups`):

| C    | layers                                            | groups x channels |
|------|---------------------------------------------------|-------------------|
| 16   | CIFAR ResNet stage 1                              | 1 x 16            |
| 32   | CIFAR ResNet stage 2                              | 2 x 16            |
| 64   | CIFAR stage 3; ResNet-18/50 stem and stage 1      | 4 x 16            |
| 128  | ResNet-18/50 stage 2                              | 8 x 16            |
| 256  | ResNet-18 stage 3; ResNet-50 stage 3, stage 1 out | 16 x 16           |
| 512  | ResNet-18 stage 4; ResNet-50 stage 4, stage 2 out | 32 x 16           |
| 1024 | ResNet-50 stage 3 out                             | 32 x 32           |
| 2048 | ResNet-50 stage 4 out                             | 32 x 64           |

``gn:32`` is Wu & He's fixed-G setup exactly (every ResNet-18/50 width is a
multiple of 32); ``gn:cpg=16`` is their fixed 16-channels-per-group variant.
``evonorm`` groups its channels by the same rules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpecError
from .registry import Registry, Resolved
from .specs import (
    Converter,
    Spec,
    nonnegative_float,
    positive_float,
    positive_int,
    unit_float,
)

# ``make(num_channels, act=False)``; a user's own ``num_channels -> module`` callable works too.
NormFactory = Callable[..., nn.Module]

# Plain ``gn``: at most 32 groups (Wu & He 2018's G) of at least 16 channels
# (their best fixed channels-per-group setting); see gn_groups.
DEFAULT_GROUPS = 32
MIN_CHANNELS_PER_GROUP = 16
# Filter Response Normalization's eps (Singh & Krishnan 2020, arXiv 1911.09737).
FRN_EPS = 1e-6
# RMSNorm's eps, pinned (nn.RMSNorm's eps=None depends on the input dtype and
# the torch version); 1e-6 as timm's RmsNorm / RmsNorm2d.
RMS_EPS = 1e-6


def gn_groups(num_channels: int, max_groups: int = DEFAULT_GROUPS,
              min_channels: int = MIN_CHANNELS_PER_GROUP) -> int:
    """Group count of plain ``gn``: the largest divisor G of C with G <= 32 and C/G >= 16.

    That is, at most ``max_groups`` groups, each of at least ``min_channels``
    channels; a layer narrower than ``min_channels`` gets 1 group.  For
    ResNet widths (16 * 2^k) this is G = min(32, C / 16):

    * C = 16, 32, 64 (the CIFAR ResNet stages) -> 1, 2, 4 groups of 16
      channels (so on the 16-channel stage ``gn`` equals ``ln``); C = 48 ->
      3 groups of 16; C < 16 -> 1 group.
    * C = 64, 128, 256 (the narrower ResNet-18/50 layers) -> 4, 8, 16 groups
      of 16 channels, where the paper's fixed G = 32 had 2, 4 and 8; C = 512,
      1024, 2048 -> 32 groups (of 16, 32, 64 channels).  So every C >= 512
      that 32 divides keeps the paper's G = 32 exactly.

    Why: Wu & He 2018 (arXiv 1803.08494), Table 3, evaluate GN on ResNet-50
    both with a fixed number of groups (G = 32 best: 24.1% top-1 error) and
    with a fixed number of channels per group (16 channels best: 24.2%).  The
    two rows agree within 0.1 point at ImageNet widths, where G = 32 never
    leaves fewer than 2 channels per group.  On narrow layers a fixed G = 32
    degenerates: C = 32 or 16 would get 1 channel per group, which is
    InstanceNorm, the worst entry of that table (28.4%).  Capping G at 32
    *and* keeping at least 16 channels per group takes the best setting of
    both rows and never turns GN into IN.  ``gn:32`` (fixed G) and
    ``gn:cpg=16`` (fixed channels per group) give the paper's two setups
    exactly.
    """
    if not isinstance(num_channels, int) or num_channels < 1:
        raise SpecError(f"num_channels must be a positive integer, got {num_channels!r}")
    limit = min(max_groups, num_channels // max(min_channels, 1))
    return max((d for d in range(1, limit + 1) if num_channels % d == 0), default=1)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


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

    ``y[n, :, h, w] = x[n, :, h, w] / sqrt(mean_c(x[n, :, h, w]^2) + eps) * weight``
    - no mean subtraction and no bias (Zhang & Sennrich 2019).  Computed by
    ``nn.RMSNorm`` on a channels-last view.

    ``eps`` is always a number (default :data:`RMS_EPS` = 1e-6, as timm's
    RmsNorm2d): ``nn.RMSNorm(eps=None)`` would take the machine epsilon of the
    computation dtype instead, which differs between float32 and float64 and
    between torch versions (older ones documented ``torch.finfo(x.dtype).eps``,
    7.8e-3 for a bfloat16 input under autocast).
    """

    def __init__(self, num_channels: int, eps: float = RMS_EPS):
        super().__init__()
        self.norm = nn.RMSNorm(num_channels, eps=float(eps))

    @property
    def eps(self) -> float:
        return self.norm.eps

    @property
    def weight(self) -> nn.Parameter:
        return self.norm.weight

    @property
    def bias(self) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with the batch statistics of each part of the batch (Hoffer et al. 2017).

    ``ghost=G``: in training, a batch of N = k * G samples is normalized as k separate
    batches of G: exactly what per-device BatchNorm without SyncBN computes on k devices
    holding G samples each, so one device simulates the small per-device batches of a
    data-parallel run (Wu & He 2018, Fig. 1).  A batch that G does not divide is an error.

    ``splits=K``: each training batch is cut into K parts, as a global batch is shared out
    over K devices: equal parts of N / K when K divides N, else ``torch.tensor_split``'s
    near-equal parts (the short last batch of an epoch).  With the batch size a multiple
    of K, per-device batch = batch size / K, and the grid of a study can vary the batch
    size alone.

    The running averages are updated once per batch from all parts (the mean of the
    parts' means and of their unbiased variances), and evaluation uses them exactly as
    BatchNorm2d does.  With G = N (or K = 1) it *is* BatchNorm2d, outputs and running
    statistics alike; parameters and buffers carry BatchNorm2d's names, so state dicts
    move between the two.
    """

    def __init__(self, num_features: int, ghost: int | None = None, eps: float = 1e-5,
                 momentum: float | None = 0.1, splits: int | None = None):
        super().__init__(num_features, eps=eps, momentum=momentum)
        if (ghost is None) == (splits is None):
            raise SpecError(f"ghost BatchNorm takes one of ghost=G (samples per part) or splits=K (parts per "
                            f"batch), got ghost={ghost!r}, splits={splits!r}")
        for name, value in (("ghost", ghost), ("splits", splits)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SpecError(f"bn {name} must be a positive integer, got {value!r}")
        self.ghost = ghost
        self.splits = splits

    def extra_repr(self) -> str:
        part = f"ghost={self.ghost}" if self.ghost is not None else f"splits={self.splits}"
        return f"{super().extra_repr()}, {part}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        if not self.training:
            return super().forward(x)
        n = x.shape[0]
        if self.ghost is not None:
            if n % self.ghost:
                raise SpecError(f"norm 'bn:ghost={self.ghost}' got a training batch of {n} samples, which does "
                                f"not split into groups of {self.ghost}; use a batch size (and a last batch) "
                                f"that {self.ghost} divides, or bn:splits=K")
            return self._equal_parts(x, n // self.ghost)
        if n % self.splits == 0:
            return self._equal_parts(x, self.splits)
        parts = [p for p in torch.tensor_split(x, self.splits) if p.shape[0]]
        if self.track_running_stats:
            with torch.no_grad():
                stats = [torch.var_mean(p.float(), dim=[0, *range(2, p.dim())], correction=1) for p in parts]
            self._update_running(torch.stack([m for _, m in stats]), torch.stack([v for v, _ in stats]))
        return torch.cat([F.batch_norm(p, None, None, self.weight, self.bias, training=True, momentum=0.0,
                                       eps=self.eps) for p in parts])

    def _equal_parts(self, x: torch.Tensor, k: int) -> torch.Tensor:
        n, c = x.shape[:2]
        g = n // k
        # (N, C, H, W) -> (G, k*C, H, W): channel j of part i becomes channel i*C + j, so one
        # batch_norm call computes every part's statistics over its own G samples.
        grouped = x.reshape(k, g, c, *x.shape[2:]).transpose(0, 1).reshape(g, k * c, *x.shape[2:])
        weight = self.weight.repeat(k) if self.weight is not None else None
        bias = self.bias.repeat(k) if self.bias is not None else None
        y = F.batch_norm(grouped, None, None, weight, bias, training=True, momentum=0.0, eps=self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                var, mean = torch.var_mean(grouped.float(), dim=[0, *range(2, grouped.dim())], correction=1)
            self._update_running(mean.view(k, c), var.view(k, c))
        return y.reshape(g, k, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)

    @torch.no_grad()
    def _update_running(self, means: torch.Tensor, variances: torch.Tensor) -> None:  # (parts, C) each
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
        self.running_mean.lerp_(means.mean(0).to(self.running_mean.dtype), factor)
        self.running_var.lerp_(variances.mean(0).to(self.running_var.dtype), factor)


def renorm_limits_problem(r_max: float, d_max: float) -> str | None:
    """What is wrong with Batch Renormalization's clips (``r_max >= 1``, ``d_max >= 0``), or None."""
    if not r_max >= 1.0:
        return "r_max must be at least 1 (1 = no renormalization)"
    if not d_max >= 0.0:
        return "d_max must be at least 0 (0 = no renormalization)"
    return None


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch Renormalization (Ioffe 2017, arXiv 1702.03275): BN that trains with the statistics it evaluates with.

    In training, with batch mean and std ``mu_B``, ``sigma_B`` and running ``mu``,
    ``sigma = sqrt(running_var + eps)``::

        r = stop_grad(clip(sigma_B / sigma, 1 / r_max, r_max))
        d = stop_grad(clip((mu_B - mu) / sigma, -d_max, d_max))
        y = ((x - mu_B) / sigma_B * r + d) * weight + bias

    Where the clips do not bind, this is ``(x - mu) / sigma``: the running statistics,
    as in evaluation, while gradients still flow through the batch statistics.
    ``r_max = 1, d_max = 0`` is BatchNorm2d exactly.  Running averages are updated as
    BatchNorm2d updates them (momentum, unbiased batch variance); evaluation is BatchNorm2d's.
    The paper relaxes ``r_max`` from 1 to 3 and ``d_max`` from 0 to 5 over training; here
    they are fixed by the spec (``brn:r_max=3,d_max=5``).
    """

    def __init__(self, num_features: int, r_max: float = 3.0, d_max: float = 5.0, eps: float = 1e-5,
                 momentum: float | None = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        problem = renorm_limits_problem(r_max, d_max)
        if problem:
            raise SpecError(f"norm 'brn:r_max={r_max:g},d_max={d_max:g}': {problem}")
        self.r_max, self.d_max = float(r_max), float(d_max)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max:g}, d_max={self.d_max:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        if not self.training:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        std = (var + self.eps).sqrt()
        with torch.no_grad():
            running_std = (self.running_var + self.eps).sqrt().to(std.dtype)
            r = (std / running_std).clamp(1.0 / self.r_max, self.r_max)
            d = ((mean - self.running_mean.to(mean.dtype)) / running_std).clamp(-self.d_max, self.d_max)
            self._update_running(mean, var * (x.numel() / x.shape[1]) / max(x.numel() / x.shape[1] - 1, 1))
        y = (x - mean.view(shape)) / std.view(shape) * r.view(shape) + d.view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def norm_activates(module: nn.Module) -> bool:
    """True for a norm layer that applies its activation itself (``frn`` / ``evonorm`` built with ``act=True``).

    A caller that asked for ``act=True`` skips its own activation after such a layer.
    """
    return bool(getattr(module, "activates", False))


class _FusedActivationNorm(nn.Module):
    """A norm that may fuse the activation after it; ``ACTIVATION`` names it (``TLU``, ``sigmoid gate``).

    Holds what FRN and EvoNorm-S0 share: the channel count, ``eps``, ``activates`` and the
    per-channel affine ``weight`` (1) and ``bias`` (0); subclasses add their activation's parameter.
    """

    ACTIVATION = ""

    def __init__(self, num_channels: int, eps: float, act: bool):
        super().__init__()
        self.num_channels = num_channels
        self.eps = float(eps)
        self.activates = bool(act)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    @property
    def fused_activation(self) -> str | None:
        """The activation the layer applies itself, or None (built with ``act=False``)."""
        return self.ACTIVATION if self.activates else None


class FilterResponseNorm2d(_FusedActivationNorm):
    """Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan 2020, arXiv 1911.09737).

    Per sample and channel, with ``nu2 = mean(x^2)`` over the positions (H, W)::

        y = weight * x / sqrt(nu2 + eps) + bias
        z = max(y, tau)                      # TLU, only with act=True

    No mean subtraction and no batch statistics: every sample is normalized on its
    own, in training and evaluation alike.  ``weight`` 1, ``bias`` 0 and ``tau`` 0
    are per channel; ``tau`` exists only with ``act=True`` (``activates``), where
    the layer replaces the ReLU that would follow it.  ``eps`` is fixed (the paper's
    learnable-eps variant for 1x1 inputs is not implemented).  Takes (N, C, *) with
    at least one position dimension.
    """

    ACTIVATION = "TLU"

    def __init__(self, num_channels: int, eps: float = FRN_EPS, act: bool = True):
        if not eps > 0:
            raise SpecError(f"norm 'frn:eps={eps:g}': eps must be positive")
        super().__init__(num_channels, eps, act)
        self.tau = nn.Parameter(torch.zeros(num_channels)) if self.activates else None

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps:g}, act={self.fused_activation}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        if x.dim() < 3:
            raise ValueError(f"FilterResponseNorm2d takes (N, C, *) input with positions to average over, "
                             f"got shape {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        nu2 = x.square().mean(dim=tuple(range(2, x.dim())), keepdim=True)  # (N, C, 1, 1)
        y = x * torch.rsqrt(nu2 + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        return torch.maximum(y, self.tau.view(shape)) if self.tau is not None else y


class EvoNorm2dS0(_FusedActivationNorm):
    """EvoNorm-S0 (Liu et al. 2020, arXiv 2004.02967): a sigmoid-gated, group-normalized activation.

    With ``group_std(x) = sqrt(var(x) + eps)``, the population variance over each
    sample's group of C/G channels and all positions (GroupNorm's groups)::

        y = x * sigmoid(v * x) / group_std(x) * weight + bias     # act=True
        y = x / group_std(x) * weight + bias                      # act=False

    Batch-independent; ``weight`` 1, ``bias`` 0, ``v`` 1 per channel.  The gate
    ``x * sigmoid(v * x)`` is the layer's nonlinearity, so with ``act=True``
    (``activates``) it replaces the ReLU after it.  With ``act=False`` (no
    activation follows, e.g. before a residual sum) the gate is dropped and ``v``
    not created: the layer is GroupNorm without mean subtraction, a plain norm.
    Takes any (N, C, *).
    """

    ACTIVATION = "sigmoid gate"

    def __init__(self, num_channels: int, groups: int, eps: float = 1e-5, act: bool = True):
        if num_channels % groups != 0:
            raise SpecError(f"EvoNorm2dS0: {groups} groups do not divide {num_channels} channels "
                            f"(valid: {_divisors(num_channels)})")
        super().__init__(num_channels, eps, act)
        self.groups = groups
        self.v = nn.Parameter(torch.ones(num_channels)) if self.activates else None

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, groups={self.groups}, eps={self.eps:g}, "
                f"act={self.fused_activation}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        n = x.shape[0]
        var = x.reshape(n, self.groups, -1).var(dim=-1, correction=0, keepdim=True)  # (N, G, 1)
        y = x * torch.sigmoid(self.v.view(shape) * x) if self.v is not None else x
        y = (y.reshape(n, self.groups, -1) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        return y * self.weight.view(shape) + self.bias.view(shape)


@dataclass(frozen=True)
class NormEntry:
    name: str
    description: str
    params: dict[str, tuple[Converter, Any]]  # argument -> (converter, default): the one place defaults live
    build: Callable[..., nn.Module]  # (num_channels, **every argument) -> module
    # the arguments together, once, before any layer is built: a problem (conflicting arguments) or None
    check: Callable[..., str | None] | None = None
    # build takes ``act``: the layer may fuse the activation that follows it (see norm_activates)
    fuses_activation: bool = False


def _groups_check(name: str) -> Callable[..., str | None]:
    """The check of a grouped norm spec (``gn``, ``evonorm``): groups or cpg, not both."""

    def check(groups: int | None = None, cpg: int | None = None, **_: Any) -> str | None:
        if groups is not None and cpg is not None:
            return (f"sets both groups={groups} and cpg={cpg}; give one: {name}:groups=G (G groups) or "
                    f"{name}:cpg=N (N channels per group), or plain {name}")
        return None

    return check


def resolve_groups(num_channels: int, groups: int | None = None, cpg: int | None = None, name: str = "gn") -> int:
    """Group count of a grouped norm spec ``name`` (``gn``, ``evonorm``) on ``num_channels`` channels.

    ``groups`` G exactly, ``cpg`` = C/N groups of N channels, neither = :func:`gn_groups`.  A count
    that does not divide the channels is a one-line SpecError naming the spec and the valid divisors.
    """
    problem = _groups_check(name)(groups, cpg)
    if problem:
        raise SpecError(f"norm {name!r} {problem}")
    if cpg is not None:
        if num_channels % cpg != 0:
            raise SpecError(
                f"norm '{name}:cpg={cpg}' cannot split a layer of {num_channels} channels into groups of "
                f"{cpg} channels: cpg must divide the channel count (valid for {num_channels} channels: "
                f"{_divisors(num_channels)}); or use plain '{name}'"
            )
        return num_channels // cpg
    if groups is None:
        return gn_groups(num_channels)
    if num_channels % groups != 0:
        raise SpecError(
            f"norm '{name}:{groups}' cannot split a layer of {num_channels} channels into {groups} groups: "
            f"groups must divide the channel count (valid for {num_channels} channels: "
            f"{_divisors(num_channels)}); or use plain '{name}'"
        )
    return groups


def _build_gn(num_channels: int, *, groups: int | None, cpg: int | None, eps: float) -> nn.Module:
    return nn.GroupNorm(resolve_groups(num_channels, groups, cpg, "gn"), num_channels, eps=eps)


def _build_evonorm(num_channels: int, *, groups: int | None, cpg: int | None, eps: float, act: bool) -> nn.Module:
    return EvoNorm2dS0(num_channels, resolve_groups(num_channels, groups, cpg, "evonorm"), eps=eps, act=act)


def _bn_check(ghost: int | None, splits: int | None, **_: Any) -> str | None:
    if ghost is not None and splits is not None:
        return (f"sets both ghost={ghost} and splits={splits}; give one: bn:ghost=G (G samples per part) or "
                "bn:splits=K (K parts per batch), or plain bn")
    return None


def _build_bn(num_channels: int, *, momentum: float, eps: float, ghost: int | None, splits: int | None) -> nn.Module:
    if ghost is None and splits is None:
        return nn.BatchNorm2d(num_channels, eps=eps, momentum=momentum)
    return GhostBatchNorm2d(num_channels, ghost, eps=eps, momentum=momentum, splits=splits)


_REGISTRY: Registry[NormEntry] = Registry("norm")


def register_norm(entry: NormEntry) -> NormEntry:
    return _REGISTRY.register(entry.name, entry)


# The arguments several norms share, with their defaults (torch's BatchNorm2d / GroupNorm ones).
_EPS = {"eps": (positive_float, 1e-5)}
_BN_STATS = {"momentum": (unit_float, 0.1), **_EPS}
_GROUPS = {"groups": (positive_int, None), "cpg": (positive_int, None), **_EPS}

register_norm(NormEntry(
    "bn", "BatchNorm2d: batch statistics in training, running averages in eval; bn:ghost=G = statistics "
          "per group of G samples, as per-device BN on G-sample devices (Hoffer et al. 2017); bn:splits=K = "
          "statistics per part of the batch cut in K, as per-device BN on K devices",
    {**_BN_STATS, "ghost": (positive_int, None), "splits": (positive_int, None)},
    _build_bn, _bn_check,
))
register_norm(NormEntry(
    "gn", "GroupNorm: plain gn = the most groups, up to 32, of at least 16 channels each (1 group below 16 "
          "channels; ResNet widths 16/32/64 -> 1/2/4 groups, 512 and up -> 32; Wu & He Table 3); gn:G = G groups; "
          "gn:cpg=N = N channels per group",
    _GROUPS, _build_gn, _groups_check("gn"),
))
register_norm(NormEntry(
    "ln", "LayerNorm over (C,H,W) of each sample, per-channel affine = GroupNorm(1, C)",
    _EPS, lambda c, *, eps: LayerNorm2d(c, eps=eps),
))
register_norm(NormEntry(
    "in", "InstanceNorm with per-channel affine = GroupNorm(C, C)",
    _EPS, lambda c, *, eps: InstanceNorm2dAffine(c, eps=eps),
))
register_norm(NormEntry(
    "rms", "RMSNorm over channels at each position (nn.RMSNorm), scale only, no mean subtraction",
    {"eps": (positive_float, RMS_EPS)}, lambda c, *, eps: RMSNorm2d(c, eps=eps),
))
register_norm(NormEntry(
    "brn", "Batch Renormalization (Ioffe 2017): BN whose training output uses the running statistics through "
           "clipped r, d corrections; r_max=1,d_max=0 is bn",
    {"r_max": (positive_float, 3.0), "d_max": (nonnegative_float, 5.0), **_BN_STATS},
    lambda c, *, r_max, d_max, momentum, eps: BatchRenorm2d(c, r_max, d_max, eps=eps, momentum=momentum),
    lambda r_max, d_max, **_: renorm_limits_problem(r_max, d_max),
))
register_norm(NormEntry(
    "frn", "Filter Response Normalization (Singh & Krishnan 2020): x / sqrt(mean_HW(x^2) + eps) per sample and "
           "channel, affine, then TLU max(y, tau) where it replaces the ReLU after it; batch-independent",
    {"eps": (positive_float, FRN_EPS)},
    lambda c, *, eps, act: FilterResponseNorm2d(c, eps=eps, act=act),
    fuses_activation=True,
))
register_norm(NormEntry(
    "evonorm", "EvoNorm-S0 (Liu et al. 2020): x * sigmoid(v*x) / group std, affine, in place of norm + ReLU "
               "(the gate dropped where no activation follows); batch-independent; groups as gn: "
               "evonorm:G, evonorm:cpg=N",
    _GROUPS, _build_evonorm, _groups_check("evonorm"), fuses_activation=True,
))
register_norm(NormEntry(
    "none", "no normalization (Identity)",
    {}, lambda c: nn.Identity(),
))


class _NormMaker:
    """The factory of one resolved spec: ``make(num_channels, act=False)``."""

    def __init__(self, resolved: Resolved[NormEntry]):
        self.entry, self.args, self.text = resolved.entry, resolved.args, resolved.text

    def __call__(self, num_channels: int, act: bool = False) -> nn.Module:
        if self.entry.fuses_activation:
            return self.entry.build(num_channels, act=bool(act), **self.args)
        return self.entry.build(num_channels, **self.args)

    def __repr__(self) -> str:
        return f"norm_factory({self.text!r})"


def norm_factory(spec: str | Spec) -> NormFactory:
    """Resolve a norm spec once into a ``make(num_channels, act=False) -> nn.Module`` factory.

    ``act=True``: an activation follows the layer, which a norm that fuses one may replace
    (check the built layer with :func:`norm_activates`); other norms ignore it.
    """
    return _NormMaker(_REGISTRY.resolve(spec))


def factory_takes_act(factory: Callable) -> bool:
    """Whether a norm factory takes ``act=`` (``norm_factory``'s do; a user's own callable may not)."""
    try:
        return "act" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def build_norm(factory: Callable, num_channels: int, act: bool = False) -> nn.Module:
    """``factory(num_channels, act=act)``, or ``factory(num_channels)`` for a callable without ``act``."""
    return factory(num_channels, act=act) if factory_takes_act(factory) else factory(num_channels)


def make_norm(spec: str, num_channels: int, act: bool = False) -> nn.Module:
    """Build the norm layer ``spec`` for ``num_channels`` channels (``act``: see :func:`norm_factory`)."""
    if not isinstance(num_channels, int) or num_channels < 1:
        raise SpecError(f"num_channels must be a positive integer, got {num_channels!r}")
    return norm_factory(spec)(num_channels, act=act)


def list_norms() -> dict[str, str]:
    """Every norm name with a one-line description and its arguments' defaults."""
    return _REGISTRY.describe()


def norm_names() -> list[str]:
    return list(_REGISTRY)


def has_affine_weight(module: nn.Module) -> bool:
    """True for a norm layer with a learnable per-channel scale."""
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def describe_norm_layers(model: nn.Module) -> list[str]:
    """One line per distinct norm layer of ``model``, in module order, with how many there are.

    GroupNorms show their groups (``GroupNorm C=16: 1 group x 16 ch (x7 layers)``);
    LayerNorm2d and InstanceNorm2dAffine, GroupNorms underneath, are named as
    what they are; a norm that fuses its activation says so (``FilterResponseNorm2d C=64 +TLU``).
    Empty for a model without norm layers.
    """
    counts: dict[str, int] = {}
    inner: set[int] = set()
    for module in model.modules():
        if id(module) in inner:
            continue
        if isinstance(module, _FusedActivationNorm):
            fused = f" +{module.fused_activation}" if module.fused_activation else ""
            if isinstance(module, EvoNorm2dS0):
                g, c = module.groups, module.num_channels
                key = f"EvoNorm2dS0 C={c}: {g} group{'s' if g != 1 else ''} x {c // g} ch{fused}"
            else:
                key = f"{type(module).__name__} C={module.num_channels}{fused}"
        elif isinstance(module, RMSNorm2d):
            inner.add(id(module.norm))
            key = f"RMSNorm2d C={module.weight.numel()}, eps={module.eps:g}"
        elif isinstance(module, (LayerNorm2d, InstanceNorm2dAffine)):
            key = f"{type(module).__name__} C={module.num_channels}"
        elif isinstance(module, nn.GroupNorm):
            g, c = module.num_groups, module.num_channels
            key = f"GroupNorm C={c}: {g} group{'s' if g != 1 else ''} x {c // g} ch"
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            key = f"{type(module).__name__} C={module.num_features}"
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            key = f"{type(module).__name__} {tuple(module.normalized_shape)}"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return [f"{key} (x{n} layer{'s' if n != 1 else ''})" for key, n in counts.items()]


# Every norm layer reslab builds or converts: BatchNorm*/InstanceNorm*/SyncBatchNorm share
# _NormBase; reslab's LayerNorm2d and InstanceNorm2dAffine are GroupNorms and its RMSNorm2d
# holds an nn.RMSNorm.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, FilterResponseNorm2d,
              EvoNorm2dS0)


__all__ = [
    "NORM_TYPES",
    "DEFAULT_GROUPS", "MIN_CHANNELS_PER_GROUP", "RMS_EPS", "FRN_EPS", "NormFactory", "RMSNorm2d", "LayerNorm2d",
    "InstanceNorm2dAffine", "FilterResponseNorm2d", "EvoNorm2dS0", "build_norm", "describe_norm_layers",
    "factory_takes_act", "gn_groups", "make_norm", "norm_activates", "norm_factory", "list_norms", "norm_names",
    "register_norm", "resolve_groups",
]
