"""reslab: build any ResNet with any norm and any init by name, train it, compare, explain.

The public API mirrors the CLI::

    import reslab
    model = reslab.build_model("cifar_resnet20", norm="gn", num_classes=10)
    report = reslab.init_weights(model, "kaiming_normal:mode=fan_out", seed=0)
    print(report.format_table())

Submodules are imported on first use so ``import reslab`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "SpecError": "errors",
    "make_norm": "norms",
    "norm_factory": "norms",
    "list_norms": "norms",
    "convert_norms": "convert",
    "init_weights": "inits",
    "list_inits": "inits",
    "build_model": "models",
    "list_models": "models",
    "load_dataset": "data",
    "load_run": "evaluate",
    "LoadedRun": "evaluate",
    "evaluate_run": "evaluate",
    "list_datasets": "data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reslab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
