"""Spec strings: ``name``, ``name:positional`` or ``name:key=value,key=value``.

One grammar serves norms (``gn:16``), init schemes
(``kaiming_normal:mode=fan_out,nonlinearity=relu``), datasets
(``synthetic:train=2560,size=32``) and schedules (``step:every=20,gamma=0.3333``).

Lists of specs (``--init zeros,uniform:a=-0.5,b=0.5,kaiming_normal``) are split
at *top level only*: a comma-separated piece that looks like ``key=value`` (and
has no ``:`` before its ``=``) continues the spec before it; any other piece
starts a new spec.  So the list above is ``zeros``,
``uniform:a=-0.5,b=0.5`` and ``kaiming_normal``.  A positional argument must be
the first thing after the colon, which is why ``gn:8,bn`` is two specs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Spec:
    """A parsed spec string.  Argument values stay strings until bound."""

    name: str
    positional: tuple[str, ...] = ()
    kwargs: Mapping[str, str] = field(default_factory=dict)
    text: str = ""


def _is_keyword_piece(piece: str) -> bool:
    head, eq, _ = piece.partition("=")
    return bool(eq) and ":" not in head and bool(_KEY_RE.match(head.strip()))


def split_list(text: str) -> list[str]:
    """Split a comma list of specs at top level (see the module docstring)."""
    items: list[str] = []
    for piece in str(text).split(","):
        if items and _is_keyword_piece(piece):
            items[-1] += "," + piece
        else:
            items.append(piece)
    return [item.strip() for item in items]


def split_nonempty_list(text: str, what: str) -> list[str]:
    """:func:`split_list`, refusing an empty item (``'bn,,gn'``): a SpecError naming ``what``."""
    items = split_list(text)
    if any(not item for item in items):
        raise SpecError(f"{what} {text!r} has an empty item")
    return items


def parse_spec(text: str, what: str = "spec") -> Spec:
    """Parse ``name[:args]`` into a :class:`Spec`; malformed text is a SpecError."""
    raw = str(text).strip()
    name, colon, rest = raw.partition(":")
    name = name.strip()
    if not _NAME_RE.match(name):
        raise SpecError(f"malformed {what} {raw!r}: expected NAME or NAME:key=value,...")
    positional: list[str] = []
    kwargs: dict[str, str] = {}
    if colon:
        if not rest.strip():
            raise SpecError(f"malformed {what} {raw!r}: nothing after ':'")
        for piece in rest.split(","):
            piece = piece.strip()
            if not piece:
                raise SpecError(f"malformed {what} {raw!r}: empty argument")
            key, eq, value = piece.partition("=")
            if eq:
                key = key.strip()
                if not _KEY_RE.match(key):
                    raise SpecError(f"malformed {what} {raw!r}: bad argument name {key!r}")
                if key in kwargs:
                    raise SpecError(f"malformed {what} {raw!r}: argument {key!r} given twice")
                kwargs[key] = value.strip()
            elif kwargs:
                raise SpecError(
                    f"malformed {what} {raw!r}: positional value {piece!r} after key=value arguments"
                )
            else:
                positional.append(piece)
    return Spec(name=name, positional=tuple(positional), kwargs=kwargs, text=raw)


# --- typed argument binding -------------------------------------------------

Converter = Callable[[str], Any]


def to_float(value: str) -> float:
    result = float(value)
    if not math.isfinite(result):
        raise ValueError("not a finite number")
    return result


def to_int(value: str) -> int:
    return int(value)


def to_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


# How a string becomes a value of a scalar type; bool before int (a bool is an int).
SCALAR_CONVERTERS: tuple[tuple[type, Converter], ...] = ((bool, to_bool), (int, to_int), (float, to_float), (str, str))


def converter_for_type(kind: Any) -> Converter | None:
    """The converter of strings to ``kind`` (bool, int, float or str, or a subclass); None for any other."""
    if not isinstance(kind, type):
        return None
    return next((convert for scalar, convert in SCALAR_CONVERTERS if issubclass(kind, scalar)), None)


def converter_for(default: Any) -> Converter | None:
    """The converter of strings to the type of ``default`` (an option's or argument's); None where
    that type is not a scalar (``None``, a tuple, ...)."""
    return converter_for_type(type(default))


def positive_float(value: str) -> float:
    result = to_float(value)
    if result <= 0:
        raise ValueError("must be positive")
    return result


def nonnegative_float(value: str) -> float:
    result = to_float(value)
    if result < 0:
        raise ValueError("must be >= 0")
    return result


def unit_float(value: str) -> float:
    """A number in the closed interval [0, 1]."""
    result = to_float(value)
    if not 0.0 <= result <= 1.0:
        raise ValueError("must be in [0, 1]")
    return result


def positive_int(value: str) -> int:
    result = to_int(value)
    if result < 1:
        raise ValueError("must be a positive integer")
    return result


def one_of(*choices: str) -> Converter:
    """A converter that accepts only the given strings."""

    def convert(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    convert.choices = choices  # type: ignore[attr-defined]
    return convert


def bind(spec: Spec, params: Mapping[str, Converter], what: str) -> dict[str, Any]:
    """Bind a spec's arguments to typed parameters, in declaration order.

    ``params`` maps each accepted argument name to a converter; positional
    values fill them in order.  Unknown names, too many values and values a
    converter rejects are SpecErrors that name the value and the valid choices.
    """
    names = list(params)
    label = f"{what} {spec.name!r}"
    if len(spec.positional) > len(names):
        allowed = ", ".join(names) if names else "none"
        raise SpecError(
            f"{label} takes {len(names)} argument(s) ({allowed}), got {len(spec.positional)} in {spec.text!r}"
        )
    raw: dict[str, str] = dict(zip(names, spec.positional, strict=False))  # positional values fill the first names
    for key, value in spec.kwargs.items():
        if key not in params:
            allowed = ", ".join(names) if names else "none"
            raise SpecError(f"unknown argument {key!r} for {label}; valid arguments: {allowed}")
        if key in raw:
            raise SpecError(f"argument {key!r} for {label} given twice in {spec.text!r}")
        raw[key] = value
    bound: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            bound[key] = params[key](value)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"bad value {value!r} for argument {key!r} of {label}: {exc}") from None
    return bound
