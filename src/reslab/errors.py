"""Exceptions that reslab raises for bad input.

Every error a user can cause by a typo (an unknown name, a malformed spec, an
impossible option) is a :class:`SpecError`.  It is a ``ValueError`` so plain
Python callers can catch it the usual way; the CLI turns it into one line on
stderr and exit code 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class SpecError(ValueError):
    """A bad user-supplied value: the message names it and the valid choices."""


def choices_error(what: str, value: object, choices: Iterable[str]) -> SpecError:
    """Build the standard "unknown X 'v'; valid: a, b, c" error."""
    valid = ", ".join(sorted(choices))
    return SpecError(f"unknown {what} {value!r}; valid choices: {valid}")
