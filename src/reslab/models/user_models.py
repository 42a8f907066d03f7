"""Your own model by import path: ``--model py:package.module:Name`` or ``--model path/to/file.py:Name``.

``Name`` is a class or a factory function that returns an ``nn.Module`` (``Outer.Inner``
reaches a nested attribute).  It is built the way ``tv:`` models are:

* **Its arguments come from its signature.** ``num_classes`` and ``in_channels`` (or
  timm's ``in_chans``) are passed when it declares them (``num_classes`` also when it
  takes ``**kwargs``, as timm's factories do); every other argument is a model option,
  set with ``-o KEY=VALUE`` (``model_options`` in a config), converted to the type its
  annotation or default names (``-o width=8`` is the int 8 for ``width: int = 16``); an
  argument taken by ``**kwargs`` is read as a YAML value (``8``, ``0.5``, ``true``,
  ``[1, 2]``).  An argument without a default must be given.
* **``--norm``, ``--conv`` and ``--init`` apply to it** as to any model: every norm layer
  becomes the ``--norm`` spec's (:func:`reslab.convert.convert_norms`; plain ``bn`` keeps
  the model's own batch norm layers), ``--conv ws|sws`` standardizes every convolution,
  and ``--init`` initializes it (:func:`reslab.inits.init_weights`).
  ``--zero-init-residual`` is passed to a constructor that declares
  ``zero_init_residual``; otherwise the blocks zero their branch themselves at init,
  through ``zero_init_last()`` (timm's convention) or ``residual_branch()``
  (:mod:`reslab.model_inits`), which is also how ``fixup`` and ``skipinit`` find them.
* **It must fit the data**: once built, one forward pass of two images of the run's
  input shape (on the ``meta`` device, or the CPU where the model cannot run there)
  checks that it returns ``(2, num_classes)``, so a model that takes other inputs is a
  one-line error before training, not a crash in the first step.

A file path is resolved against the working directory; the file is imported as a
module of its own (its folder on ``sys.path`` while it imports, so it can import its
neighbours).  For ``py:`` the working directory is tried after ``sys.path``.

Every run of such a model records the file its code lives in and its SHA-256
(:func:`model_source`, ``sources.json`` in the run directory), so ``--resume`` and a
sweep refuse a run whose model code changed since it was trained.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..errors import SpecError
from ..fileio import file_digest, source_file_of
from ..specs import converter_for, converter_for_type, to_bool
from .torchvision_models import _apply_norm, _first_line, _meta_forward, _side

PY_PREFIX = "py:"
_FILE_RE = re.compile(r"^(?P<file>.+\.py):(?P<attr>[A-Za-z_][A-Za-z0-9_.]*)$")
_ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
CHANNEL_ARGS = ("in_channels", "in_chans")  # reslab's and timm's name for the input channels
PASSED = ("num_classes", *CHANNEL_ARGS)
FORM = "py:package.module:Name or path/to/file.py:Name"


def is_user_model_name(name: Any) -> bool:
    """True for ``py:...`` and ``....py:Name`` model names."""
    if not isinstance(name, str):
        return False
    text = name.strip()
    return text.startswith(PY_PREFIX) or bool(_FILE_RE.match(text))


def _split(name: str) -> tuple[str, str, bool]:
    """``(module or file, attribute path, is_file)`` of a user model name; a SpecError if malformed."""
    text = name.strip()
    if text.startswith(PY_PREFIX):
        module, colon, attr = text[len(PY_PREFIX):].rpartition(":")
        if not colon or not module or not _ATTR_RE.match(attr) or not _ATTR_RE.match(module):
            raise SpecError(f"malformed model {name!r}: expected {FORM}, e.g. py:mypkg.nets:MyNet")
        return module, attr, False
    match = _FILE_RE.match(text)
    if match is None:
        raise SpecError(f"malformed model {name!r}: expected {FORM}")
    return match["file"], match["attr"], True


@contextmanager
def _import_errors(name: str, what: str):
    """Any exception while importing user code becomes one line naming the model and the error."""
    try:
        yield
    except SpecError:
        raise
    except BaseException as exc:  # noqa: BLE001 - a SyntaxError, an ImportError, a SystemExit in user code
        if isinstance(exc, KeyboardInterrupt):
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise SpecError(f"model {name!r}: cannot import {what}: {type(exc).__name__}: {text}") from None


def _import_file(name: str, file: str) -> types.ModuleType:
    """The module of ``file``, imported once per content (an edited file is imported again)."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise SpecError(f"model {name!r}: no such file {file!r} (resolved against {Path.cwd()})")
    path = path.resolve()
    key = hashlib.sha256(f"{path}\0{file_digest(path)}".encode()).hexdigest()  # the file, as it is now
    module_name = f"reslab_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{key[:12]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        with _import_errors(name, str(path)):
            spec.loader.exec_module(module)
    except SpecError:
        del sys.modules[module_name]
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(name: str, module: str) -> types.ModuleType:
    """``module`` imported from ``sys.path``; where its top package is not there, from the working
    directory too (which then stays on ``sys.path``, as under ``python -m``)."""
    with _import_errors(name, f"module {module!r}"):
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            cwd = str(Path.cwd())
            if exc.name != module.split(".")[0] or cwd in sys.path:
                raise
            sys.path.append(cwd)
        return importlib.import_module(module)


def load_object(name: str) -> Any:
    """The class or factory ``name`` points to (imported); one-line SpecErrors for every failure."""
    where, attr, is_file = _split(name)
    module = _import_file(name, where) if is_file else _import_module(name, where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if not n.startswith("_")
                            and (inspect.isclass(v) or inspect.isfunction(v))
                            and getattr(v, "__module__", None) == module.__name__)
            raise SpecError(f"model {name!r}: {where} has no {attr!r}"
                            f"{'; it defines ' + ', '.join(public) if public else ''}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        raise SpecError(f"model {name!r} is an instance of {type(obj).__name__}, not a class or a factory: "
                        "name the class (or a function that builds it), so every run builds a fresh one")
    if not callable(obj):
        raise SpecError(f"model {name!r} is a {type(obj).__name__}, not a class or a function that builds "
                        "an nn.Module")
    return obj


def _parameters(name: str, obj: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """The named parameters of the constructor (``self`` excluded) and whether it takes ``**kwargs``."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return {}, True  # a builtin without a signature: pass what is given
    params = {p.name: p for p in signature.parameters.values()
              if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    return params, var_keyword


def user_options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts (every constructor argument but the ones reslab passes), each
    with its default (:data:`reslab.registry.REQUIRED` where it has none)."""
    from ..registry import REQUIRED

    params, _ = _parameters(name, load_object(name))
    return {key: REQUIRED if p.default is inspect.Parameter.empty else p.default
            for key, p in params.items() if key not in PASSED}


def _target_type(param: inspect.Parameter, hints: dict[str, Any]) -> Any:
    """The scalar type a string value of ``param`` converts to (None: read it as YAML)."""
    hint = hints.get(param.name, param.annotation)
    if hint is not inspect.Parameter.empty:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
        if converter_for_type(hint) is not None:
            return hint
    default = param.default
    if default is not inspect.Parameter.empty and converter_for(default) is not None:
        return type(default)
    return None


def _convert(name: str, key: str, value: Any, kind: Any) -> Any:
    if not isinstance(value, str):
        return value
    if kind is None:
        try:
            return yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            return value
    try:
        return converter_for_type(kind)(value)
    except ValueError as exc:
        raise SpecError(f"bad value {value!r} for option {key!r} of model {name!r}: expected "
                        f"{kind.__name__} ({exc})") from None


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the defaults' types
        return {}


def constructor_args(name: str, obj: Any, options: dict[str, Any], num_classes: int,
                     in_channels: int) -> dict[str, Any]:
    """The keyword arguments the model is constructed with: what it declares of ``num_classes`` and
    ``in_channels``, and ``options`` typed from its signature; SpecError for one it does not take."""
    params, var_keyword = _parameters(name, obj)
    hints = _hints(obj)
    kwargs: dict[str, Any] = {}
    if "num_classes" in params or var_keyword:
        kwargs["num_classes"] = num_classes
    channels = next((key for key in CHANNEL_ARGS if key in params), None)
    if channels is not None:
        kwargs[channels] = in_channels
    for key, value in options.items():
        if key in kwargs or key == "num_classes":  # an in_channels it does not declare may come by **kwargs
            raise SpecError(f"option {key!r} of model {name!r} is set by reslab from the data; drop -o {key}")
        if key not in params and not var_keyword:
            valid = [k for k in params if k not in PASSED]
            raise SpecError(f"unknown option {key!r} for model {name!r}; valid options: {', '.join(valid) or 'none'}")
        kwargs[key] = _convert(name, key, value, _target_type(params[key], hints) if key in params else None)
    missing = [key for key, p in params.items() if p.default is inspect.Parameter.empty and key not in kwargs
               and p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    if missing:
        raise SpecError(f"model {name!r} needs option {missing[0]!r}: pass -o {missing[0]}=VALUE "
                        f"(model_options: {{{missing[0]}: ...}} in a config)")
    return kwargs


def takes_option(name: str, key: str) -> bool:
    """Whether the constructor of ``name`` declares the argument ``key``."""
    params, _ = _parameters(name, load_object(name))
    return key in params


def construct(name: str, *, num_classes: int, in_channels: int, **options: Any) -> nn.Module:
    """Build the user model ``name`` (no norm, conv or input check yet: :func:`reslab.models.build_model`)."""
    obj = load_object(name)
    kwargs = constructor_args(name, obj, options, num_classes, in_channels)
    try:
        model = obj(**kwargs)
    except TypeError as exc:  # the signature said yes, the body said no: still the user's arguments
        raise SpecError(f"model {name!r} cannot be built with {_shown(kwargs)}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _shown(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"


def _cpu_forward(model: nn.Module, x: torch.Tensor) -> Any:
    """``model`` on ``x`` in eval mode without gradients, leaving its mode and the global RNG as they were."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return model(x)
    finally:
        model.train(was_training)


def check_fits(model: nn.Module, name: str, in_channels: int, hw: tuple[int, int], num_classes: int) -> None:
    """A one-line SpecError unless ``model`` maps two ``in_channels x H x W`` images to ``(2, num_classes)``."""
    x = torch.zeros(2, in_channels, *hw)
    try:
        out = _meta_forward(model, tuple(x.shape))
    except Exception:  # noqa: BLE001 - some code cannot run on meta (.item(), data-dependent shapes)
        try:
            out = _cpu_forward(model, x)
        except Exception as exc:  # noqa: BLE001 - any failure: this input does not fit the model
            hint = "" if takes_option(name, "in_channels") or takes_option(name, "in_chans") else \
                " (its constructor takes no in_channels, so reslab cannot size its input)"
            raise SpecError(f"model {name!r} cannot take {in_channels}x{hw[0]}x{hw[1]} inputs{hint}: "
                            f"{type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        hint = "" if takes_option(name, "num_classes") else " (its constructor takes no num_classes)"
        raise SpecError(f"model {name!r} returns {got} for 2 images, not (2, {num_classes}) logits{hint}")


RESLAB_RESNET_OPTIONS = ("stem", "shortcut")  # flags of reslab's own ResNets


def build_user_model(name: str, *, num_classes: int, in_channels: int, norm: str,
                     input_size: int | tuple[int, int] | None, **options: Any) -> nn.Module:
    """Build user model ``name`` for ``num_classes`` outputs and ``in_channels`` inputs, with ``norm``
    (see the module doc); ``input_size`` (default 32) is the side the fit check runs at."""
    for key in RESLAB_RESNET_OPTIONS:
        if key in options:
            raise SpecError(f"--{key} applies to reslab's own ResNets, not to {name!r}; drop it")
    zero_init_residual = options.get("zero_init_residual")
    if zero_init_residual is not None and not takes_option(name, "zero_init_residual"):
        options = {k: v for k, v in options.items() if k != "zero_init_residual"}
    model = construct(name, num_classes=num_classes, in_channels=in_channels, **options)
    _apply_norm(model, norm)
    if zero_init_residual is not None and to_bool(str(zero_init_residual)):
        model.zero_init_residual = True  # init_weights zeroes each block's branch (zero_init_last / residual_branch)
    check_fits(model, name, in_channels, _side(input_size) or (32, 32), num_classes)
    return model


def source_file(name: str) -> Path | None:
    """The file the code of user model ``name`` lives in (None where Python cannot tell)."""
    return source_file_of(load_object(name))


def model_source(name: str) -> dict[str, str] | None:
    """``{"file", "sha256"}`` of the code of user model ``name``, for the run's record."""
    file = source_file(name)
    return None if file is None else {"file": str(file), "sha256": file_digest(file)}


__all__ = ["FORM", "PY_PREFIX", "build_user_model", "check_fits", "construct", "is_user_model_name", "load_object",
           "model_source", "source_file", "takes_option", "user_options"]
