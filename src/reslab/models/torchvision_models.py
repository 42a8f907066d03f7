"""Any torchvision classification model by name: ``build_model("tv:resnet50", norm="gn")``.

``tv:NAME`` is ``torchvision.models.get_model(NAME, weights=None, num_classes=...)``
for every NAME of ``torchvision.models.list_models(module=torchvision.models)``,
made to fit reslab's common arguments:

* ``in_channels``: the first convolution the input meets (found by running the
  model on the ``meta`` device up to it) is replaced by one with the same
  kernel, stride, padding, dilation and bias that takes ``in_channels``;
* ``norm``: every norm layer becomes the spec's, through
  :func:`reslab.convert.convert_norms`.  Plain ``bn`` keeps the model's own
  batch norm layers as torchvision builds them (with their eps and momentum) and
  turns any other norm (the layer norms of ViT, Swin, ConvNeXt) into batch norm;
  ``none`` removes them all;
* ``input_size``: ViT and MaxViT take their image size at construction and get
  it; for every model one forward pass on the ``meta`` device (no memory, no
  arithmetic) checks that the input fits, so an image smaller than the model
  can take is a SpecError naming the smallest size it can, not a crash in the
  first training step.

The only model option is ``zero_init_residual``, for the ResNet family
(``resnet*``, ``resnext*``, ``wide_resnet*``), whose constructors take it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..convert import convert_norms
from ..errors import SpecError
from ..specs import parse_spec, to_bool

PREFIX = "tv:"
LIST_HINT = "reslab list models --all"

# Options of reslab's own ResNets that torchvision's models do not have.
RESLAB_RESNET_OPTIONS = ("stem", "shortcut", "width", "residual")
RESNET_MODULE = "torchvision.models.resnet"  # the builders that take zero_init_residual
INCEPTION_SIDE = 299
DEFAULT_SIDE = 224
PROBE_MAX_SIDE = 1024  # the largest input tried when looking for the smallest one a model takes


def is_torchvision_name(name: Any) -> bool:
    """True for a ``tv:NAME`` model name."""
    return isinstance(name, str) and name.strip().startswith(PREFIX)


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Every torchvision classification model name (without ``tv:``), sorted."""
    import torchvision.models

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def _builder(name: str) -> Callable[..., nn.Module]:
    import torchvision.models

    return torchvision.models.get_model_builder(name)


def _family(name: str) -> str:
    """The torchvision module the builder lives in, e.g. ``torchvision.models.resnet``."""
    return _builder(name).__module__


def _description(name: str) -> str:
    """The first sentence of the builder's docstring, without its reST markup."""
    text = (inspect.getdoc(_builder(name)) or name).split("\n\n")[0].replace("\n", " ")
    text = re.sub(r"`([^`]*?)\s*<https?://[^`]*>`_{1,2}", r"\1", text)
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)
    return " ".join(text.split())


def list_torchvision_models() -> dict[str, str]:
    """``tv:NAME`` -> one-line description, for every torchvision classification model."""
    return {PREFIX + name: _description(name) for name in torchvision_names()}


def resolve_name(name: str) -> str:
    """The torchvision name in ``tv:NAME``; a one-line SpecError for an unknown one."""
    bare = name.strip()[len(PREFIX):].strip()
    names = torchvision_names()
    if bare in names:
        return bare
    if not bare:
        raise SpecError(f"model {name!r} names no torchvision model: write tv:NAME, e.g. tv:resnet18 "
                        f"(`{LIST_HINT}` lists them)")
    import torchvision.models

    if bare in torchvision.models.list_models():
        kind = _family(bare).removeprefix("torchvision.models.").split(".")[0]
        raise SpecError(f"model {name!r} is a torchvision {kind} model; only classification models can be "
                        f"built (`{LIST_HINT}` lists them)")
    lowered = {n.lower(): n for n in names}
    close = [lowered[n] for n in difflib.get_close_matches(bare.lower(), list(lowered), n=3, cutoff=0.6)]
    guess = f"; did you mean {', '.join(PREFIX + n for n in close)}?" if close else ""
    raise SpecError(f"unknown torchvision model {bare!r} in {name!r}{guess} (`{LIST_HINT}` lists them)")


def torchvision_options(name: str) -> dict[str, Any]:
    """The options ``tv:NAME`` accepts, each with its default."""
    return {"zero_init_residual": False} if _family(resolve_name(name)) == RESNET_MODULE else {}


def torchvision_input(name: str) -> tuple[int, int]:
    """``(channels, side)`` of the input torchvision builds ``tv:NAME`` for: 3x299 for inception_v3, else 3x224."""
    return (3, INCEPTION_SIDE) if resolve_name(name) == "inception_v3" else (3, DEFAULT_SIDE)


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options converted for ``tv:NAME``; a one-line SpecError for one it does not take."""
    valid = torchvision_options(name)
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key in RESLAB_RESNET_OPTIONS:
            raise SpecError(f"option {key!r} applies to reslab's own ResNets, not to torchvision's {name!r}; "
                            "drop it (reslab's models: reslab list models)")
        if key == "zero_init_residual" and key not in valid:
            raise SpecError(f"option 'zero_init_residual' applies to torchvision's ResNet family (resnet*, "
                            f"resnext*, wide_resnet*), not to {name!r}; drop it")
        if key not in valid:
            raise SpecError(f"unknown option {key!r} for model {name!r}; valid options: {', '.join(valid) or 'none'}")
        if isinstance(value, str):
            try:
                value = to_bool(value)
            except ValueError as exc:
                raise SpecError(f"bad value {value!r} for option {key!r} of model {name!r}: {exc}") from None
        if not isinstance(value, bool):
            raise SpecError(f"option {key!r} of model {name!r} must be true or false, got {value!r}")
        checked[key] = value
    return checked


# --- build ---------------------------------------------------------------------------------


def _size_kwargs(bare: str, hw: tuple[int, int] | None) -> dict[str, Any]:
    """Constructor arguments that fix the input size, for the models that take one (ViT, MaxViT)."""
    if hw is None:
        return {}
    family = _family(bare)
    if family == "torchvision.models.vision_transformer":
        if hw[0] != hw[1]:
            raise SpecError(f"model {PREFIX + bare!r} takes square inputs only, got {hw[0]}x{hw[1]}")
        return {"image_size": hw[0]}
    if family == "torchvision.models.maxvit":
        return {"input_size": hw}
    return {}


def _construct(bare: str, kwargs: dict[str, Any]) -> nn.Module:
    """``get_model(bare, weights=None, **kwargs)``, also under ``torch.device("meta")``.

    A few constructors read tensors they compute (RegNet's widths); on the meta device
    those have no values, so such a model is built on the CPU and moved to meta.
    """
    import torchvision.models

    try:
        return torchvision.models.get_model(bare, weights=None, **kwargs)
    except (NotImplementedError, RuntimeError):
        if torch.get_default_device().type != "meta":
            raise
    with torch.device("cpu"):
        model = torchvision.models.get_model(bare, weights=None, **kwargs)
    return model.to("meta")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _meta_forward(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """``model`` run in eval mode on an empty ``shape`` input, every tensor on the meta device."""
    tensors = {name: t.to("meta") for name, t in (*model.named_parameters(), *model.named_buffers())}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.func.functional_call(model, tensors, (torch.empty(shape, device="meta"),))
    finally:
        model.train(was_training)


class _Reached(Exception):
    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


def _first_conv(model: nn.Module, label: str, hw: tuple[int, int]) -> str:
    """Path of the first Conv2d the input meets (the first registered one where no forward tells)."""
    convs = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise SpecError(f"model {label!r} has no 2-d convolution to take the input channels")

    def stop(path: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            raise _Reached(path)
        return hook

    handles = [m.register_forward_pre_hook(stop(path)) for path, m in convs]
    try:
        _meta_forward(model, (1, convs[0][1].in_channels, *hw))
    except _Reached as reached:
        return reached.path
    except Exception:  # noqa: BLE001 - no forward on meta: fall back to module order
        pass
    finally:
        for handle in handles:
            handle.remove()
    return convs[0][0]


def _adapt_stem(model: nn.Module, label: str, in_channels: int, hw: tuple[int, int]) -> None:
    """Replace the first convolution by one that takes ``in_channels``, same geometry and bias."""
    path = _first_conv(model, label, hw)
    old = model.get_submodule(path)
    if old.in_channels == in_channels:
        return
    if old.groups != 1:
        raise SpecError(f"model {label!r}: the first convolution {path} is grouped ({old.groups} groups); "
                        f"it cannot be rebuilt for {in_channels} input channels")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def _is_torch_batch_norm(module: nn.Module) -> bool:
    """A batch norm layer of torch itself (1d/2d/3d, sync, lazy), as torchvision's models use."""
    return type(module).__module__ == nn.modules.batchnorm.__name__


def _apply_norm(model: nn.Module, norm: str) -> None:
    """Put the norm ``norm`` in; plain ``bn`` leaves the model's own batch norm layers alone."""
    spec = parse_spec(norm, "norm spec")
    plain_bn = spec.name == "bn" and not spec.positional and not spec.kwargs
    before = dict(model.named_modules(remove_duplicate=False)) if plain_bn else {}
    convert_norms(model, norm)
    for path, module in before.items():
        if path and _is_torch_batch_norm(module):  # put torchvision's own layer back, eps and momentum included
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, module)


def _zero_last_norm(block: nn.Module) -> bool:
    """Zero the scale of the last norm of a torchvision BasicBlock/Bottleneck branch; True if there was one."""
    last = block.bn3 if hasattr(block, "bn3") else block.bn2
    weight = getattr(last, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    with torch.no_grad():
        weight.zero_()
    return True


def _branch_layers(block: nn.Module) -> list[nn.Module]:
    """The residual branch of a torchvision BasicBlock/Bottleneck in forward order: conv1, bn1, conv2, bn2
    (, conv3, bn3); bn2 (bn3) outputs what the block adds to its shortcut."""
    names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    return [getattr(block, name) for name in (names if hasattr(block, "conv3") else names[:4])]


def _mark_residual_blocks(model: nn.Module, zero_init_residual: bool) -> None:
    """Give each residual block ``zero_init_last()`` and record the option, as reslab's ResNets do,
    so ``init_weights`` zeroes the branches again after initializing them; and ``residual_branch()``,
    the layers of its branch, so ``fixup`` and ``skipinit`` can be attached to it
    (:func:`reslab.model_inits.attach_branch`)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for module in model.modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            module.zero_init_last = types.MethodType(_zero_last_norm, module)
            module.residual_branch = types.MethodType(_branch_layers, module)
    model.zero_init_residual = zero_init_residual
    if zero_init_residual:
        zeroed = [module.zero_init_last() for module in model.modules() if hasattr(module, "zero_init_last")]
        if not any(zeroed):
            raise SpecError("zero_init_residual=True needs a norm with a scale at the end of each residual "
                            "branch; this norm has none (use bn, gn, ln, in or rms)")


def _runs(model: nn.Module, shape: tuple[int, ...], num_classes: int) -> str | None:
    """None if ``model`` maps a ``shape`` batch to (N, num_classes) on the meta device, else why not."""
    try:
        out = _meta_forward(model, shape)
    except Exception as exc:  # noqa: BLE001 - any failure means this input does not fit
        return _first_line(exc)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (shape[0], num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return f"the output is {got}, not (N, {num_classes})"
    return None


def _smallest_side(model: nn.Module, channels: int, num_classes: int, fails: int, runs: int) -> int:
    """The smallest square side in (fails, runs] the model runs on, by bisection: the model fails
    on ``fails`` and runs on ``runs``, and is taken to run on every side above one it runs on."""
    while runs - fails > 1:
        mid = (fails + runs) // 2
        if _runs(model, (2, channels, mid, mid), num_classes) is None:
            runs = mid
        else:
            fails = mid
    return runs


def _check_input(model: nn.Module, label: str, channels: int, hw: tuple[int, int], num_classes: int) -> None:
    """A SpecError if ``model`` cannot take a ``hw`` input, naming the smallest square one it can take."""
    problem = _runs(model, (2, channels, *hw), num_classes)
    if problem is None:
        return
    big = max(PROBE_MAX_SIDE, 2 * max(hw))
    if _runs(model, (2, channels, big, big), num_classes) is not None:
        return  # the meta device runs it on no size: nothing to tell here, the real forward will
    if hw[0] == hw[1]:
        smallest = _smallest_side(model, channels, num_classes, hw[0], big)
        raise SpecError(f"model {label!r} needs inputs of at least {smallest}x{smallest}, got {hw[0]}x{hw[1]} "
                        "(upscale the images or choose another model)")
    raise SpecError(f"model {label!r} cannot take {hw[0]}x{hw[1]} inputs: {problem}")


def _side(input_size: Any) -> tuple[int, int] | None:
    if input_size is None:
        return None
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw):
        raise SpecError(f"input_size must be a positive integer or (H, W), got {input_size!r}")
    return hw


def build_torchvision_model(name: str, *, num_classes: int, in_channels: int, norm: str,
                            input_size: int | tuple[int, int] | None, **options: Any) -> nn.Module:
    """Build ``tv:NAME`` for ``num_classes`` outputs, ``in_channels`` inputs, with ``norm`` (see the module doc).

    The common arguments come checked by :func:`reslab.models.build_model`.
    """
    bare = resolve_name(name)
    label = PREFIX + bare
    options = check_options(name, options)
    hw = _side(input_size)
    kwargs: dict[str, Any] = {"num_classes": num_classes, **options, **_size_kwargs(bare, hw)}
    if bare in ("googlenet", "inception_v3"):
        # Without weights the auxiliary heads would be on, and training would return a tuple;
        # init_weights=False is what torchvision does without weights, minus its warning.
        kwargs.update(aux_logits=False, init_weights=False)
    try:
        model = _construct(bare, kwargs)
    except (AssertionError, ValueError) as exc:
        if hw is None or not _size_kwargs(bare, hw):
            raise
        raise SpecError(f"model {label!r} cannot be built for {hw[0]}x{hw[1]} inputs: {_first_line(exc)}") from None
    if in_channels != 3:  # every torchvision classification model is built for RGB
        side = torchvision_input(label)[1]
        _adapt_stem(model, label, in_channels, hw or (side, side))
    _apply_norm(model, norm)
    if _family(bare) == RESNET_MODULE:
        _mark_residual_blocks(model, bool(options.get("zero_init_residual", False)))
    if hw is not None:
        _check_input(model, label, in_channels, hw, num_classes)
    return model


__all__ = [
    "PREFIX", "build_torchvision_model", "check_options", "is_torchvision_name", "list_torchvision_models",
    "resolve_name", "torchvision_input", "torchvision_names", "torchvision_options",
]
