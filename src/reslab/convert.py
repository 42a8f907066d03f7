"""Swap every normalization layer of any model for the one a norm spec names.

``convert_norms(torchvision.models.resnet50(), "gn")`` turns each BatchNorm of
a model reslab did not build into the GroupNorm that ``reslab.build_model``
would have used, in place, and reports what it changed::

    model, report = reslab.convert_norms(model, "gn:32")
    print(report.format_table())

Layers found (and not looked inside): ``nn.BatchNorm1d/2d/3d``,
``nn.SyncBatchNorm``, ``nn.GroupNorm`` (with reslab's ``LayerNorm2d`` and
``InstanceNorm2dAffine``), ``nn.InstanceNorm1d/2d/3d``, torchvision's
``FrozenBatchNorm2d``, reslab's ``GhostBatchNorm2d``, ``BatchRenorm2d``,
``RMSNorm2d``, ``FilterResponseNorm2d`` and ``EvoNorm2dS0`` (those two only
without their fused activation), and ``nn.LayerNorm`` / ``nn.RMSNorm`` over
the channels alone (a ``normalized_shape`` of length 1).  A LayerNorm over
several dimensions is not a per-channel norm: it is left as it is and listed
in ``report.skipped``.  A subclass of these with a ``forward`` of its own is
refused.  ``frn`` and ``evonorm`` are put in without their fused activation,
since the model applies its own.

reslab's norms are built for (N, C, H, W) input; the replacement for a layer
that takes another rank keeps working on that rank (see :func:`convert_norms`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import SpecError
from .norms import (
    BatchRenorm2d,
    EvoNorm2dS0,
    FilterResponseNorm2d,
    GhostBatchNorm2d,
    InstanceNorm2dAffine,
    LayerNorm2d,
    RMSNorm2d,
    norm_activates,
    norm_factory,
)
from .specs import Spec
from .swap import find_layers, put_in, raise_failures
from .tables import format_table

# Tensors carried from the old layer to the new one, where both have them with the same shape.
AFFINE = ("weight", "bias")
STATS = ("running_mean", "running_var", "num_batches_tracked")

# Input layouts: "1d" (N, C) or (N, C, L); "2d" (N, C, H, W); "3d" (N, C, D, H, W);
# "any" (N, C, *); "last" (*, C), the channels last (nn.LayerNorm / nn.RMSNorm over C).
_RANKED = ((nn.BatchNorm1d, "1d"), (nn.InstanceNorm1d, "1d"), (nn.BatchNorm3d, "3d"), (nn.InstanceNorm3d, "3d"),
           (nn.BatchNorm2d, "2d"), (nn.InstanceNorm2d, "2d"), (RMSNorm2d, "2d"))


class BatchNormNd(nn.BatchNorm2d):
    """BatchNorm2d that takes any (N, C, *) input, as SyncBatchNorm and GroupNorm do.

    What ``bn`` becomes in place of a layer of unknown rank; its state dict is BatchNorm2d's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, *) input, got {input.dim()}D")


class GhostBatchNormNd(GhostBatchNorm2d):
    """GhostBatchNorm2d that takes any (N, C, *) input: ``bn:ghost=G`` / ``bn:splits=K`` off (N, C, H, W)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, *) input, got {input.dim()}D")


class RMSNormNd(RMSNorm2d):
    """RMSNorm2d over the channels (dim 1) at each position of any (N, C, *) input, (N, C) included."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ChannelsLast(nn.Module):
    """Runs a channels-first norm on (*, C) input: what replaces a LayerNorm over the last dimension.

    ``y = norm(x.movedim(-1, 1)).movedim(1, -1)``: an (N, L, C) input is normalized as the
    (N, C, L) tensor it is a view of, the positions taking the place of H and W.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    @property
    def weight(self) -> torch.Tensor | None:
        return getattr(self.norm, "weight", None)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.norm, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(-1, 1)).movedim(1, -1)


def _frozen_bn_type() -> type | None:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # torchvision is a dependency, but the conversion does not need it
        return None
    return FrozenBatchNorm2d


@functools.cache
def _known_forwards(frozen: type | None) -> frozenset:
    """The forward functions of the layers convert_norms knows to be a plain per-channel norm."""
    classes = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LayerNorm, nn.RMSNorm, GhostBatchNorm2d, BatchRenorm2d, RMSNorm2d, RMSNormNd,
               FilterResponseNorm2d, EvoNorm2dS0, frozen)
    return frozenset(cls.forward for cls in classes if cls is not None)


def _layout(module: nn.Module, frozen: type | None) -> str | None:
    """The input layout of a norm layer convert_norms replaces; None for any other module.

    "skip" marks a LayerNorm / RMSNorm over more than the channels, "unknown" a subclass of a
    norm with a forward of its own (an activation fused in, a permute), "fused" an FRN or
    EvoNorm that applies its activation itself (``norm_activates``): none is replaced.
    """
    if isinstance(module, (FilterResponseNorm2d, EvoNorm2dS0)):
        if type(module).forward in _known_forwards(frozen) and norm_activates(module):
            return "fused"
        layout = "any"
    elif isinstance(module, (BatchNormNd, GhostBatchNormNd, RMSNormNd, nn.SyncBatchNorm, nn.GroupNorm)):
        layout = "any"
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        if len(module.normalized_shape) != 1:
            return "skip"
        layout = "last"
        if type(module).__name__ == "LayerNorm2d" and type(module).forward is not nn.LayerNorm.forward:
            return "2d"  # torchvision's and timm's: NCHW in, permuted to channels last inside
    elif frozen is not None and isinstance(module, frozen):
        layout = "2d"
    else:
        layout = next((layout for cls, layout in _RANKED if isinstance(module, cls)), None)
        if layout is None and isinstance(module, nn.modules.batchnorm._NormBase):  # lazy and other BatchNorms
            layout = "any"
    if layout is None:
        return None
    return layout if type(module).forward in _known_forwards(frozen) else "unknown"


def _channels(module: nn.Module) -> int:
    for name in ("num_features", "num_channels"):
        if isinstance(getattr(module, name, None), int):
            return getattr(module, name)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return int(module.normalized_shape[0])
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 1 else 0


def describe(module: nn.Module) -> str:
    """A short description of a norm layer: class and channels, e.g. ``BatchNorm2d(64)``,
    ``GroupNorm(64, groups=4)``."""
    if isinstance(module, ChannelsLast):
        return f"ChannelsLast({describe(module.norm)})"
    if isinstance(module, nn.Identity):
        return "Identity"
    name, c = type(module).__name__, _channels(module)
    if isinstance(module, nn.GroupNorm) and not isinstance(module, (LayerNorm2d, InstanceNorm2dAffine)):
        return f"{name}({c}, groups={module.num_groups})"
    if isinstance(module, GhostBatchNorm2d):
        part = f"ghost={module.ghost}" if module.ghost is not None else f"splits={module.splits}"
        return f"{name}({c}, {part})"
    if isinstance(module, (EvoNorm2dS0, FilterResponseNorm2d)):
        parts = [str(c)] + ([f"groups={module.groups}"] if isinstance(module, EvoNorm2dS0) else [])
        parts += [f"+{module.fused_activation}"] if module.fused_activation else []
        return f"{name}({', '.join(parts)})"
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and len(module.normalized_shape) != 1:
        return f"{name}({tuple(module.normalized_shape)})"
    return f"{name}({c})"


def _adapt(built: nn.Module, layout: str, channels: int) -> nn.Module:
    """The spec's layer ``built`` (made for (N, C, H, W)) made to take the input of a ``layout`` layer."""
    if layout == "2d" or isinstance(built, nn.Identity):
        return built
    if isinstance(built, GhostBatchNorm2d):
        new: nn.Module = GhostBatchNormNd(channels, built.ghost, eps=built.eps, momentum=built.momentum,
                                          splits=built.splits)
    elif isinstance(built, nn.BatchNorm2d):
        cls = {"1d": nn.BatchNorm1d, "3d": nn.BatchNorm3d}.get(layout, BatchNormNd)
        new = cls(channels, eps=built.eps, momentum=built.momentum)
    elif isinstance(built, RMSNorm2d):
        if layout == "last":
            return nn.RMSNorm(channels, eps=built.eps)
        new = RMSNormNd(channels, eps=built.eps)
    else:  # GroupNorm and its subclasses, FilterResponseNorm2d and EvoNorm2dS0 take (N, C, *) as they are
        new = built
    return ChannelsLast(new) if layout == "last" else new


def _placement(module: nn.Module, model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of ``module``'s tensors; the model's where it has none."""
    for owner in (module, model):
        tensors = [*owner.parameters(), *owner.buffers()]
        floating = [t for t in tensors if t.is_floating_point()]
        if tensors:
            return tensors[0].device, floating[0].dtype if floating else None
    return None, None


def _copy_state(old: nn.Module, new: nn.Module) -> tuple[str, ...]:
    """Copy the per-channel affine and running statistics of ``old`` into ``new`` where shapes match; names copied."""
    target = new.norm if isinstance(new, ChannelsLast) else new
    copied = []
    with torch.no_grad():
        for name in (*AFFINE, *STATS):
            src, dst = getattr(old, name, None), getattr(target, name, None)
            if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor) or src.shape != dst.shape:
                continue
            dst.copy_(src)
            if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
                dst.requires_grad_(src.requires_grad)
            copied.append(name)
    return tuple(copied)


@dataclass(frozen=True)
class ConvertRow:
    path: str                  # module path in the model (the first one, for a layer held twice)
    old_class: str             # e.g. "BatchNorm2d"
    channels: int
    old: str                   # e.g. "BatchNorm2d(64)"
    new: str                   # e.g. "GroupNorm(64, groups=4)"
    copied: tuple[str, ...]    # tensors carried over: weight, bias, running_mean, running_var, num_batches_tracked


@dataclass(frozen=True)
class ConvertReport:
    spec: str
    rows: tuple[ConvertRow, ...]
    # (path, description) of norms over more than the channels, left as they are
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        """Old class name -> number of layers converted."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.old_class] = out.get(row.old_class, 0) + 1
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ConvertRow]:
        return iter(self.rows)

    def __repr__(self) -> str:
        counts = ", ".join(f"{name} x{n}" for name, n in self.counts.items()) or "nothing"
        return f"ConvertReport({self.spec!r}: {counts} converted, {len(self.skipped)} skipped)"

    def to_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per converted layer (``copied`` as a list, so YAML and JSON take it)."""
        return [{**asdict(row), "copied": list(row.copied)} for row in self.rows]

    def format_table(self) -> str:
        """An aligned text table, one line per converted layer, then one per skipped norm."""
        cells = [(r.path, r.old, r.new, ", ".join(r.copied) or "-") for r in self.rows]
        lines = [format_table(("path", "old", "new", "copied"), cells, right=[False] * 4)]
        lines += [f"skipped {path}: {desc} normalizes over more than the channels" for path, desc in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()


def convert_norms(model: nn.Module, spec: str | Spec, *, copy_affine: bool = True) -> tuple[nn.Module, ConvertReport]:
    """Replace every normalization layer of ``model`` by the layer the norm ``spec`` names, in place.

    Returns ``(model, report)``: the same model object, and a :class:`ConvertReport` with one
    row per converted layer (path, old and new layer, tensors copied), ``counts`` (old class
    name -> layers converted) and ``format_table()``.

    Each new layer is ``norm_factory(spec)(C, act=False)``, C the old layer's channel count,
    on the old layer's device and dtype and in its train/eval mode.  ``eps``, ``momentum`` and groups come
    from the spec (``gn:eps=1e-3``, ``bn:momentum=0.01``), never from the old layer.  With
    ``copy_affine`` the per-channel scale and shift are copied over where the new layer has
    them (``rms`` keeps the scale only, ``none`` nothing; FrozenBatchNorm2d's buffers count as
    its affine), with their ``requires_grad``, and so are running statistics where both layers
    have them (a BatchNorm or tracking InstanceNorm into ``bn``); without it the new layers
    start as the spec builds them.  A layer without an affine (``InstanceNorm2d()``) gives
    weight 1 and bias 0, the same function.

    Layers of another rank than (N, C, H, W) keep it (unbatched InstanceNorm input excepted):

    * ``gn``, ``gn:G``, ``gn:cpg=N``, ``ln``, ``in``: GroupNorm takes any (N, C, *) as it is.
      On (N, C) input (BatchNorm1d after a Linear) ``ln`` is LayerNorm over the features,
      while ``in`` (and any one-channel group) leaves one value per group and outputs the bias.
    * ``bn``: ``nn.BatchNorm1d`` / ``nn.BatchNorm3d`` for a BatchNorm1d/InstanceNorm1d or
      BatchNorm3d/InstanceNorm3d, :class:`BatchNormNd` (BatchNorm2d for any (N, C, *)) for a
      SyncBatchNorm, GroupNorm or channels-last LayerNorm; ``bn:ghost=G`` and ``bn:splits=K``:
      :class:`GhostBatchNormNd`, the same ghost BatchNorm for any (N, C, *).
    * ``rms``: :class:`RMSNormNd`, RMSNorm over dim 1 at each position of any (N, C, *).
    * ``frn``, ``evonorm``: take (N, C, *) as they are (FRN needs at least one position
      dimension: on (N, C) input it raises).
    * ``none``: Identity.
    * ``nn.LayerNorm(C)`` / ``nn.RMSNorm(C)`` see the channels last: the new layer runs inside
      :class:`ChannelsLast` (the positions of an (N, L, C) input take the place of H, W), or
      is ``nn.RMSNorm(C)`` for ``rms``.  A LayerNorm subclass named ``LayerNorm2d``
      (torchvision's, timm's) takes NCHW and gets the spec's layer itself.

    Any other subclass of a norm layer with a ``forward`` of its own (a fused activation, a
    permute) is refused: a plain norm in its place would compute something else.

    ``frn`` and ``evonorm`` go in *without* their fused activation (``act=False``: no TLU,
    no sigmoid gate; ``norm_activates`` False), because the model keeps applying its own
    activation after the layer.  A source FRN or EvoNorm layer is converted like any
    other norm when it has no activation of its own; one that applies its activation
    (``act=True``) is refused, as a plain norm in its place would drop that activation.

    Every replacement is built before any is put in, so a spec that cannot be built for some
    layer (``gn:32`` on 48 channels) is a SpecError naming its path, channels and the reason,
    and leaves the model untouched; so are a bad spec, a lazy layer not yet run, and a model
    that is itself a norm layer.  A layer held at several paths gets one replacement, put in at all of them.
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"convert_norms needs an nn.Module, got {type(model).__name__}")
    factory = norm_factory(spec)
    text = (spec.text or spec.name) if isinstance(spec, Spec) else str(spec).strip()
    frozen = _frozen_bn_type()
    if _layout(model, frozen) not in (None, "skip"):
        raise SpecError(f"convert_norms replaces the layers inside a model; this model is itself a "
                        f"{describe(model)}: wrap it first, e.g. nn.Sequential(layer)")

    slots = find_layers(model, lambda module: _layout(module, frozen))  # (path, parent, name, layer, layout)
    plans: dict[int, tuple[str, nn.Module, nn.Module, tuple[str, ...]]] = {}  # id(old) -> (path, old, new, copied)
    skipped: dict[int, tuple[str, str]] = {}
    failures: list[str] = []
    for path, _, _, old, layout in slots:
        if id(old) in plans or id(old) in skipped:
            continue
        if layout == "skip":
            skipped[id(old)] = (path, describe(old))
            continue
        channels = _channels(old)
        where = f"cannot convert {path} ({describe(old)}, {channels} channels) to norm {text!r}"
        if layout == "unknown":
            failures.append(f"{where}: {type(old).__name__} has a forward of its own (a permute, a fused "
                            f"activation), so no plain norm layer can stand in for it; replace it by hand")
            continue
        if layout == "fused":
            failures.append(f"{where}: the layer applies its activation itself (built with act=True), which a "
                            f"plain norm in its place would drop; build the model with the norm you want, or "
                            f"replace it by hand")
            continue
        if any(nn.parameter.is_lazy(t) for t in (*old.parameters(), *old.buffers())) or channels < 1:
            failures.append(f"{where}: the layer is lazy; run one forward pass before convert_norms")
            continue
        try:
            new = _adapt(factory(channels, act=False), layout, channels)  # the model applies its own activation
        except SpecError as error:
            failures.append(f"{where}: {error}")
            continue
        device, dtype = _placement(old, model)
        new.to(device=device, dtype=dtype).train(old.training)
        copied = _copy_state(old, new) if copy_affine else ()
        plans[id(old)] = (path, old, new, copied)
    raise_failures(failures)
    put_in(slots, {key: new for key, (_, _, new, _) in plans.items()})
    rows = tuple(ConvertRow(path, type(old).__name__, _channels(old), describe(old), describe(new), copied)
                 for path, old, new, copied in plans.values())
    return model, ConvertReport(text, rows, tuple(skipped.values()))


__all__ = [
    "BatchNormNd", "ChannelsLast", "ConvertReport", "ConvertRow", "GhostBatchNormNd", "RMSNormNd",
    "convert_norms", "describe",
]
