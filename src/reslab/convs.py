"""Weight-standardized convolutions by spec string.

``standardize_convs(model, "ws")`` swaps every ``nn.Conv2d`` of any model
(torchvision's included) for one whose effective weight is standardized per
output channel; ``conv_factory("sws")`` is the ``nn.Conv2d``-shaped callable for
models that build their convolutions themselves.

| spec    | convolution                                                            |
|---------|------------------------------------------------------------------------|
| default | the model's own convolutions, untouched (``nn.Conv2d`` when building)  |
| ws      | :class:`StdConv2d`, Weight Standardization (``ws:eps=1e-6``)          |
| sws     | :class:`ScaledStdConv2d`, Scaled WS of NF-ResNets                      |
|         | (``sws:gamma=relu,eps=1e-6``; gamma a positive number, relu, linear)   |

Both layers keep the raw weight ``W`` as their parameter (state dict keys as
``nn.Conv2d``'s, plus ``gain`` for ``sws``) and standardize it in every forward,
so gradients flow through the standardization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import SpecError
from .registry import Registry
from .specs import Converter, Spec, positive_float, to_float
from .swap import find_layers, put_in, raise_failures

ConvFactory = Callable[..., nn.Conv2d]

# The layers init schemes (reslab.inits) and LSUV treat as convolutions.
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Weight Standardization's eps, added to the per-channel variance: 1e-6 as timm's StdConv2d / ScaledStdConv2d.
WS_EPS = 1e-6

# The gain that makes ReLU followed by a scaled-WS conv preserve variance for z ~ N(0, 1) inputs
# (Brock et al. 2021, arXiv 2101.08692, Sec. 3 / Appendix D).  With a = relu(z):
#   E[a]   = E[z; z > 0]   = 1 / sqrt(2 pi)
#   E[a^2] = E[z^2; z > 0] = 1 / 2
#   Var(a) = E[a^2] - E[a]^2 = 1/2 - 1/(2 pi) = (1 - 1/pi) / 2  (~0.3408).
# An output y = sum_j w_j a_j of the conv has zero-mean weights (sum_j w_j = 0 cancels E[a]) with
# sum_j w_j^2 = fan_in * (gamma / sqrt(fan_in))^2 = gamma^2, so Var(y) = gamma^2 (1 - 1/pi) / 2,
# which is 1 for gamma = sqrt(2 / (1 - 1/pi)) = 1.71286...  (The NFNet code and timm's _nonlin_gamma use
# 1.7139588594436646, a sampled estimate of the same number, 0.06% off.)
RELU_GAMMA = math.sqrt(2 / (1 - 1 / math.pi))
LINEAR_GAMMA = 1.0
NAMED_GAMMAS: dict[str, float] = {"linear": LINEAR_GAMMA, "relu": RELU_GAMMA}


def _check_positive(what: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise SpecError(f"{what} must be a positive finite number, got {value!r}")
    return value


def _standardize(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(W - mean) / sqrt(var + eps)`` per output channel over (in/groups, kh, kw), population variance."""
    var, mean = torch.var_mean(weight, dim=tuple(range(1, weight.dim())), keepdim=True, correction=0)
    return (weight - mean) * torch.rsqrt(var + eps)


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization (Qiao et al. 2019, arXiv 1903.10520).

    The effective weight is ``(W - mean) / sqrt(var + eps)``, mean and population
    variance per output channel over (in/groups, kh, kw); ``W`` stays the parameter.
    Arguments as ``nn.Conv2d`` plus ``eps`` (1e-6, as timm's StdConv2d); parameters
    and state dict keys are ``nn.Conv2d``'s (weight, bias).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None, *, eps: float = WS_EPS):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.eps = _check_positive("StdConv2d eps", eps)

    def standardized_weight(self) -> torch.Tensor:
        """The effective weight: ``W`` standardized per output channel."""
        return _standardize(self.weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps:g}"


class ScaledStdConv2d(nn.Conv2d):
    """Conv2d with Scaled Weight Standardization (Brock, De & Smith 2021, arXiv 2101.08692).

    The effective weight is ``gain * gamma * (W - mean) / (sqrt(var + eps) * sqrt(fan_in))``,
    ``fan_in = in/groups * kh * kw``, mean and population variance per output channel;
    ``gain`` is a learnable (out, 1, 1, 1) parameter (1 at construction), ``gamma`` a fixed
    number: :data:`RELU_GAMMA` after a ReLU keeps unit-Gaussian inputs at unit variance.
    Arguments as ``nn.Conv2d`` plus ``gamma`` and ``eps`` (1e-6, as timm); the state dict is
    ``nn.Conv2d``'s plus ``gain``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None, *,
                 gamma: float = LINEAR_GAMMA, eps: float = WS_EPS):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.gamma = _check_positive("ScaledStdConv2d gamma", gamma)
        self.eps = _check_positive("ScaledStdConv2d eps", eps)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1, device=device, dtype=dtype))

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "gain" in self._parameters:  # nn.Conv2d.__init__ calls this before gain exists
            nn.init.ones_(self.gain)

    def standardized_weight(self) -> torch.Tensor:
        """The effective weight: ``W`` standardized per output channel, times ``gain * gamma / sqrt(fan_in)``."""
        return _standardize(self.weight, self.eps) * (self.gain * (self.gamma / math.sqrt(self.fan_in)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:g}, eps={self.eps:g}"


# --- specs ------------------------------------------------------------------

def gamma_value(value: str) -> float:
    """``sws`` gamma: a positive number, ``relu`` (:data:`RELU_GAMMA`) or ``linear`` (1.0)."""
    named = NAMED_GAMMAS.get(value.strip().lower())
    if named is not None:
        return named
    try:
        result = to_float(value)
    except ValueError:
        result = -1.0
    if not result > 0:
        raise ValueError(f"expected a positive number or one of {', '.join(sorted(NAMED_GAMMAS))}")
    return result


@dataclass(frozen=True)
class ConvEntry:
    name: str
    description: str
    params: dict[str, tuple[Converter, Any]]  # argument -> (converter, default)
    cls: type[nn.Conv2d]                      # nn.Conv2d for ``default``; built with every argument
    check: Callable[..., str | None] | None = None


@dataclass(frozen=True)
class ConvChoice:
    """A resolved conv spec: the class to build and every constructor argument it adds to nn.Conv2d's."""

    name: str
    text: str
    cls: type[nn.Conv2d]
    kwargs: dict[str, Any]

    @property
    def is_default(self) -> bool:
        return self.cls is nn.Conv2d

    def matches(self, module: nn.Module) -> bool:
        """True if ``module`` already is this spec's convolution with these settings."""
        return isinstance(module, self.cls) and all(getattr(module, k, None) == v for k, v in self.kwargs.items())


_REGISTRY: Registry[ConvEntry] = Registry("conv")


def register_conv(entry: ConvEntry) -> ConvEntry:
    return _REGISTRY.register(entry.name, entry)


register_conv(ConvEntry(
    "default", "the model's own convolutions, untouched (nn.Conv2d when a model builds them)", {}, nn.Conv2d,
))
register_conv(ConvEntry(
    "ws", "Weight Standardization (Qiao et al. 2019): weight standardized per output channel",
    {"eps": (positive_float, WS_EPS)}, StdConv2d,
))
register_conv(ConvEntry(
    "sws", "Scaled WS (Brock et al. 2021, NF-ResNets): gain * gamma * standardized weight / sqrt(fan_in); "
           "gamma=relu (the default, sqrt(2 / (1 - 1/pi)) = 1.71286), linear (1) or a positive number",
    {"gamma": (gamma_value, RELU_GAMMA), "eps": (positive_float, WS_EPS)}, ScaledStdConv2d,
))


def resolve_conv(spec: str | Spec) -> ConvChoice:
    """Validate a conv spec: its class and every argument, defaults filled in; a one-line SpecError if bad."""
    resolved = _REGISTRY.resolve(spec)
    return ConvChoice(resolved.name, resolved.text, resolved.entry.cls, resolved.args)


def conv_factory(spec: str | Spec) -> ConvFactory:
    """Resolve a conv spec once into a callable with ``nn.Conv2d``'s signature.

    ``conv_factory("sws")(64, 128, 3, stride=2, padding=1, bias=False)`` is a
    :class:`ScaledStdConv2d` with gamma = :data:`RELU_GAMMA`; ``default`` gives ``nn.Conv2d``.
    """
    choice = resolve_conv(spec)
    return partial(choice.cls, **choice.kwargs) if choice.kwargs else choice.cls


def list_convs() -> dict[str, str]:
    """Every conv name with a one-line description and its arguments' defaults."""
    return _REGISTRY.describe()


def conv_names() -> list[str]:
    return list(_REGISTRY)


# --- swapping the convolutions of a model -------------------------------------

_KNOWN_FORWARDS = frozenset({nn.Conv2d.forward, StdConv2d.forward, ScaledStdConv2d.forward})


def _refusal(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot be swapped for a standardized conv, or None if it can."""
    if nn.parameter.is_lazy(conv.weight):
        return "the layer is lazy; run one forward pass before standardize_convs"
    if type(conv).forward not in _KNOWN_FORWARDS or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        return (f"{type(conv).__name__} has a forward of its own (fused ops, 'same' padding), so a "
                f"standardized nn.Conv2d cannot stand in for it; replace it by hand")
    if parametrize.is_parametrized(conv) or conv._forward_pre_hooks or conv._forward_hooks \
            or conv._backward_hooks or conv._backward_pre_hooks:
        return ("the layer has hooks or parametrizations (weight_norm, spectral_norm, ...) that a "
                "replacement would lose; remove them first")
    return None


def _replacement(old: nn.Conv2d, choice: ConvChoice) -> nn.Conv2d:
    """``choice``'s conv with ``old``'s arguments, device, dtype, mode, raw weight, bias (and gain)."""
    new = choice.cls(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                     old.groups, old.bias is not None, old.padding_mode, device=old.weight.device,
                     dtype=old.weight.dtype, **choice.kwargs)
    with torch.no_grad():
        for name in ("weight", "bias", "gain"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
                dst.requires_grad_(src.requires_grad)
    return new.train(old.training)


def standardize_convs(model: nn.Module, spec: str | Spec) -> tuple[nn.Module, int]:
    """Replace every ``nn.Conv2d`` of ``model`` by the conv the spec names, in place; ``(model, number swapped)``.

    Each replacement has the old layer's arguments (stride, padding, dilation, groups, bias,
    padding_mode), device, dtype and train/eval mode, and its raw weight and bias (and gain,
    between ``sws`` layers) copied with their ``requires_grad``: the effective weight is the
    standardization of the old weight, not the old weight itself.  Layers that already are
    the spec's class with the spec's settings are left as they are; ``default`` swaps nothing.
    ``nn.Conv1d/3d`` and transposed convolutions are not touched.  Build an optimizer after
    the swap: the new layers hold new parameters.

    Every replacement is built before any is put in: a bad spec, a lazy layer, a Conv2d subclass
    with a forward of its own or a layer with hooks or parametrizations is a one-line SpecError
    naming its path, and leaves the model untouched.  A layer held at several paths gets one
    replacement, put in at all of them.
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"standardize_convs needs an nn.Module, got {type(model).__name__}")
    choice = resolve_conv(spec)
    if choice.is_default:
        return model, 0
    if isinstance(model, nn.Conv2d):
        raise SpecError(f"standardize_convs replaces the convolutions inside a model; this model is itself a "
                        f"{type(model).__name__}: wrap it first, e.g. nn.Sequential(conv)")

    slots = find_layers(model, lambda module: True if isinstance(module, nn.Conv2d) else None)
    plans: dict[int, nn.Conv2d] = {}
    failures: list[str] = []
    for path, _, _, old, _ in slots:  # a shared conv's first path names it
        if id(old) in plans or choice.matches(old):
            continue
        reason = _refusal(old)
        if reason is not None:
            failures.append(f"cannot standardize {path} ({type(old).__name__}) with conv {choice.text!r}: {reason}")
            plans[id(old)] = old  # reported once
            continue
        plans[id(old)] = _replacement(old, choice)
    raise_failures(failures)
    put_in(slots, plans)
    return model, len(plans)


__all__ = [
    "LINEAR_GAMMA", "RELU_GAMMA", "WS_EPS", "ConvChoice", "ConvEntry", "ConvFactory", "ScaledStdConv2d",
    "StdConv2d", "conv_factory", "conv_names", "gamma_value", "list_convs", "register_conv", "resolve_conv",
    "standardize_convs",
]
