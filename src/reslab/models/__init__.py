"""Models by name: ``build_model("cifar_resnet20", norm="gn")``.

Every model is an entry-point function registered with :func:`register_model`
(timm's shape).  The function's keyword-only parameters *are* the model's
interface, so there is one source of truth:

* the common arguments ``num_classes``, ``in_channels``, ``norm`` and
  ``input_size`` are passed by :func:`build_model` to every entry point that
  declares them; an entry point that has no use for one (``norm`` for ``mlp``,
  ``input_size`` for the ResNets) simply does not declare it and never sees it,
  which lets one training config drive every model;
* every other keyword-only parameter is a model *option* (``stem``,
  ``shortcut``, ``width``, ``hidden``, ...); its default is the model's default
  and its type is the type string values are converted to, so options coming
  from the CLI or a YAML file as text (``width="32"``, ``zero_init_residual="true"``)
  work unchanged;
* the first line of the docstring is the description :func:`list_models` shows,
  with every option's default.

The entry points live in a :class:`reslab.registry.Registry`: :func:`build_model`
resolves a name and its options through it as every other registry resolves a
spec.  Unknown names and options are SpecErrors (:mod:`reslab.errors`) that list
the valid choices; a string that does not convert is one too, and other bad option
*values* are rejected by the model itself with the same kind of message.

Your own model is built by import path, ``py:package.module:Name`` or
``path/to/file.py:Name`` (a class or a factory; see :mod:`reslab.models.user_models`).

Any torchvision classification model is there too, as ``tv:NAME``
(``build_model("tv:resnet50", norm="gn")``, ``tv:vit_b_16``, ...): built
without weights and adapted to the common arguments, see
:mod:`reslab.models.torchvision_models`.  ``list_models(torchvision=True)``
lists them after reslab's own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..convs import ConvChoice, ScaledStdConv2d, StdConv2d, resolve_conv, standardize_convs
from ..errors import SpecError
from ..norms import norm_factory
from ..registry import Registry, Resolved
from ..specs import Converter, Spec, converter_for

ModelFn = Callable[..., nn.Module]

# Arguments every model may take; build_model passes each one only to the
# entry points that declare it.
COMMON_ARGS = ("num_classes", "in_channels", "norm", "input_size")

# (channels, side) of a model's natural input unless its registration says otherwise: CIFAR's.
DEFAULT_INPUT = (3, 32)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str  # first line of the entry point's docstring
    # option -> (converter of a string value, default): the entry point's keyword-only parameters
    params: dict[str, tuple[Converter, Any]]
    fn: ModelFn
    common: tuple[str, ...]  # the COMMON_ARGS this entry point declares
    default_input: tuple[int, int]  # (channels, side) of the input the model was designed for
    check: Callable[..., str | None] | None = None  # options are checked by the model itself


_REGISTRY: Registry[ModelEntry] = Registry("model")

def _option_converter(default: Any) -> Converter:
    """An option's converter: a string (from the CLI or a YAML file) becomes the default's type;
    any other value passes through, for the model to validate."""
    convert = converter_for(default)

    def converter(value: Any) -> Any:
        return convert(value) if convert is not None and isinstance(value, str) else value

    return converter


def register_model(fn: ModelFn | None = None, *, default_input: tuple[int, int] = DEFAULT_INPUT):
    """Decorator: register ``fn`` under its ``__name__``; duplicate names are refused.

    Use bare (``@register_model``) or with the model's natural input
    (``@register_model(default_input=(1, 28))``, as ``(channels, side)``), which
    tools such as ``reslab inspect`` use when the user gives none.
    """
    if fn is None:
        return functools.partial(register_model, default_input=default_input)
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in params):
        raise TypeError(f"model entry point {name!r} must take keyword-only arguments (def {name}(*, ...))")
    common = tuple(p.name for p in params if p.name in COMMON_ARGS)
    options = {p.name: p.default for p in params if p.name not in COMMON_ARGS}
    if any(default is inspect.Parameter.empty for default in options.values()):
        raise TypeError(f"every option of model entry point {name!r} needs a default")
    doc = inspect.getdoc(fn) or name
    options_params = {key: (_option_converter(default), default) for key, default in options.items()}
    _REGISTRY.register(name, ModelEntry(name, doc.splitlines()[0], options_params, fn, common, tuple(default_input)))
    return fn


def list_models(torchvision: bool = False) -> dict[str, str]:
    """Every registered model name with a one-line description and its options' defaults; with
    ``torchvision``, then every torchvision classification model as ``tv:NAME``."""
    described = _REGISTRY.describe()
    if torchvision:
        described.update(list_torchvision_models())
    return described


def model_names() -> list[str]:
    """Every registered model name, in registration order (``tv:NAME`` models not included)."""
    return list(_REGISTRY)


def model_options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts, each with its default."""
    if is_torchvision_name(name):
        return torchvision_options(name)
    if is_user_model_name(name):
        return user_options(name)
    return {key: default for key, (_, default) in _REGISTRY.lookup(name).params.items()}


def model_input(name: str) -> tuple[int, int]:
    """``(in_channels, input_size)`` of the input ``name`` was designed for, e.g. ``(3, 224)``."""
    if is_torchvision_name(name):
        return torchvision_input(name)
    if is_user_model_name(name):
        return DEFAULT_INPUT
    return _REGISTRY.lookup(name).default_input


def _resolve(name: str, options: dict[str, Any]) -> Resolved[ModelEntry]:
    """The entry of model ``name`` with every option, given ones converted, the rest at their defaults."""
    entry = _REGISTRY.lookup(name)
    unknown = [key for key in options if key not in entry.params]
    if unknown:  # "option", as the CLI's -o KEY=VALUE and the config's model_options call them
        raise SpecError(f"unknown option {unknown[0]!r} for model {name!r}; "
                        f"valid options: {', '.join(entry.params) or 'none'}")
    return _REGISTRY.resolve(Spec(name, kwargs=options, text=name))


def _coerce(value: Any, default: Any, what: str) -> Any:
    """Convert a string value to the type of ``default``; non-string values pass through untouched."""
    convert = converter_for(default)
    if convert is None or not isinstance(value, str):
        return value
    try:
        return convert(value)
    except ValueError as exc:
        raise SpecError(f"bad value {value!r} for {what}: {exc}") from None


def _positive_int(value: Any, what: str) -> int:
    value = _coerce(value, 1, what)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{what} must be a positive integer, got {value!r}")
    return value


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    norm: str = "bn",
    input_size: int | tuple[int, int] | None = None,
    conv: str = "default",
    **options: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a key of :func:`list_models`, ``tv:NAME`` for torchvision's model NAME, or your own
            model as ``py:package.module:Name`` or ``path/to/file.py:Name``
            (:mod:`reslab.models.user_models`).
        num_classes: size of the classifier output.
        in_channels: channels of the input images (1 for MNIST, 3 for CIFAR).
        norm: a norm spec (``bn``, ``gn:16``, ``none``, ...; see ``reslab.norms``);
            validated even for models without norm layers.
        input_size: input height/width (an int or ``(H, W)``); only models that
            need it (``mlp``) or check it (``simple_cnn``) use it.
        conv: ``default`` (the model's own convolutions), ``ws`` or ``sws``: every
            ``nn.Conv2d`` becomes a weight-standardized one (:mod:`reslab.convs`).
        **options: the model's own options, see :func:`model_options`.

    Unknown names, unknown options and bad values raise :class:`SpecError`.
    """
    torchvision, user = is_torchvision_name(name), is_user_model_name(name)
    if torchvision:
        check_options(name, options)  # the name, then the options
    elif user:
        load_object(name)  # the import, before the common arguments
    else:
        resolved = _resolve(name, options)
    norm_factory(norm)  # fail on a bad norm spec whether or not the model has norm layers
    if isinstance(input_size, str):
        input_size = _positive_int(input_size, "input_size")
    common = {
        "num_classes": _positive_int(num_classes, "num_classes"),
        "in_channels": _positive_int(in_channels, "in_channels"),
        "norm": norm,
        "input_size": input_size,
    }
    choice = resolve_conv(conv)
    if torchvision:
        model = build_torchvision_model(name, **common, **options)
    elif user:
        model = build_user_model(name, **common, **options)
    else:
        model = resolved.entry.fn(**{key: common[key] for key in resolved.entry.common}, **resolved.args)
    return _with_convs(model, choice, name)


def _with_convs(model: nn.Module, choice: ConvChoice, name: str) -> nn.Module:
    """``model`` with its convolutions weight-standardized as the resolved conv spec says."""
    if choice.is_default:
        return model
    others = {type(m).__name__ for m in model.modules()
              if isinstance(m, (StdConv2d, ScaledStdConv2d)) and type(m) is not choice.cls}
    if others:
        raise SpecError(f"conv {choice.text!r}: model {name!r} is built with {', '.join(sorted(others))} already "
                        f"(init nf uses scaled WS); drop --conv or use --conv sws")
    return standardize_convs(model, choice.text)[0]


# Importing the model modules fills the registry (ResNets first, so they lead
# list_models()); they import register_model from this package, which is why
# the registry is defined above this line.
from . import resnet  # noqa: E402,F401,I001
from . import baselines  # noqa: E402,F401
from .baselines import MLP, SimpleCNN  # noqa: E402
from .resnet import BasicBlock, Bottleneck, ResNet, ZeroPadShortcut  # noqa: E402
from .user_models import build_user_model, is_user_model_name, load_object, user_options  # noqa: E402
from .torchvision_models import (  # noqa: E402
    build_torchvision_model,
    check_options,
    is_torchvision_name,
    list_torchvision_models,
    torchvision_input,
    torchvision_options,
)

__all__ = [
    "COMMON_ARGS", "ModelEntry", "register_model", "build_model", "list_models", "model_names",
    "model_options", "model_input", "ResNet", "BasicBlock", "Bottleneck", "ZeroPadShortcut", "MLP", "SimpleCNN",
]
