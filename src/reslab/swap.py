"""Replacing layers of any model in place: what ``convert_norms`` and ``standardize_convs`` share.

Both find the layers to replace (a layer held at several paths at every one of them), build
every replacement before putting any in, so one that cannot be built leaves the model as it
was, and then put each in at all of its paths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .errors import SpecError

# (path, parent, attribute, layer, what the classifier said of it)
Slot = tuple[str, nn.Module, str, nn.Module, Any]


def find_layers(model: nn.Module, classify: Callable[[nn.Module], Any]) -> list[Slot]:
    """Every layer below ``model`` that ``classify`` does not return None for, in module order.

    Such a layer is not looked inside; a layer held at several paths has one slot per path.
    """
    found: list[Slot] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            kind = classify(child)
            if kind is None:
                visit(child, path)
            else:
                found.append((path, module, name, child, kind))

    visit(model, "")
    return found


def raise_failures(failures: list[str]) -> None:
    """A one-line SpecError with the first failure and how many more there are; nothing if none."""
    if failures:
        more = f" ({len(failures) - 1} more layers fail as well)" if len(failures) > 1 else ""
        raise SpecError(failures[0] + more)


def put_in(slots: list[Slot], replacements: Mapping[int, nn.Module]) -> None:
    """Put ``replacements[id(layer)]`` in at every slot of each replaced layer."""
    for _, parent, name, old, _ in slots:
        if id(old) in replacements:
            setattr(parent, name, replacements[id(old)])
