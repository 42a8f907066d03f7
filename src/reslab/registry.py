"""The one registry protocol every name->entry table in reslab follows.

A spec string names an entry and its arguments (``gn:cpg=16``,
``kaiming_normal:mode=fan_out``, ``synthetic:train=256``).  Every table --
norms, convs, init schemes (per-tensor and whole-model), datasets, schedules,
optimizers, models -- turns one into an entry the same way:

1. **parse** the text (:func:`reslab.specs.parse_spec`),
2. **look up** the name (unknown names list the valid ones),
3. **bind** the arguments through the entry's converters (positional values
   fill the parameters in declaration order),
4. fill the **defaults** the entry declares (an argument whose default is
   :data:`REQUIRED` must be given),
5. **check** the arguments together (the entry's ``check``),

and **describes** itself for ``reslab list`` from the same declarations.  An entry
is any object with ``name``, ``description``, ``params`` (argument ->
``(converter, default)``) and ``check`` (``None`` or ``(**args) -> problem or
None``; it may also raise a SpecError itself).  Adding a norm, an init scheme or a
dataset is one ``register`` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .errors import SpecError, choices_error
from .specs import Converter, Spec, bind, parse_spec


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of an argument that has none: the spec must give it


class Entry(Protocol):
    name: str
    description: str
    params: Mapping[str, tuple[Converter, Any]]
    check: Callable[..., str | None] | None


T = TypeVar("T", bound=Entry)


@dataclass(frozen=True)
class Resolved(Generic[T]):
    """A spec resolved against a registry: its entry, complete typed arguments, and the text given."""

    entry: T
    args: dict[str, Any]
    text: str

    @property
    def name(self) -> str:
        return self.entry.name


def show_default(key: str, default: Any) -> str:
    """``key=default`` as ``reslab list`` shows it (``key=REQUIRED`` for an argument without one)."""
    if default is REQUIRED:
        return f"{key}=<required>"
    if isinstance(default, float):
        return f"{key}={default:g}"
    if isinstance(default, tuple):
        return f"{key}={','.join(str(v) for v in default)}"
    return f"{key}={default}"


class Registry(dict[str, T], Generic[T]):
    """A ``dict`` of named entries that refuses duplicates, explains misses and resolves specs."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # e.g. "norm", "init scheme": used in error messages ("unknown norm", "norm spec")

    def register(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = entry
        return entry

    def lookup(self, name: str, shown: str | None = None) -> T:
        """The entry for ``name``; a SpecError naming ``shown`` (default ``name``) and the choices if absent."""
        if name not in self:
            raise choices_error(self.kind, shown or name, self)
        return self[name]

    def resolve(self, spec: str | Spec) -> Resolved[T]:
        """Parse, look up, bind, fill defaults and check ``spec``; a one-line SpecError on any problem."""
        parsed = spec if isinstance(spec, Spec) else parse_spec(spec, f"{self.kind} spec")
        text = parsed.text or parsed.name
        entry = self.lookup(parsed.name, text)
        bound = bind(parsed, {key: conv for key, (conv, _) in entry.params.items()}, self.kind)
        args = {key: bound.get(key, default) for key, (_, default) in entry.params.items()}
        missing = [key for key, value in args.items() if value is REQUIRED]
        if missing:
            raise SpecError(f"{self.kind} {entry.name!r} needs argument {missing[0]!r}, "
                            f"e.g. '{entry.name}:{missing[0]}=...'")
        problem = entry.check(**args) if entry.check is not None else None
        if problem:
            raise SpecError(f"bad arguments in {self.kind} spec {text!r}: {problem}")
        return Resolved(entry, args, text)

    def describe(self) -> dict[str, str]:
        """Every name with its one-line description and its arguments' defaults (``reslab list``)."""
        out = {}
        for name, entry in self.items():
            args = ", ".join(show_default(key, default) for key, (_, default) in entry.params.items())
            out[name] = entry.description + (f" (args: {args})" if args else "")
        return out
