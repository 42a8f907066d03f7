"""The one registry shape every name->entry table in reslab uses.

Adding a norm, an init scheme, a dataset or a study is one ``register`` call;
lookups of unknown names fail with the standard "unknown X; valid choices" error.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import choices_error

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A ``dict`` of named entries that refuses duplicates and explains misses."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # e.g. "norm", "init scheme": used in error messages

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


