"""reslab: build any ResNet with any norm and any init by name, train it, compare, explain.

The public API mirrors the CLI (``reslab train`` is ``reslab.train``, and so on)::

    import reslab
    model = reslab.build_model("cifar_resnet20", norm="gn", num_classes=10)
    report = reslab.init_weights(model, "kaiming_normal:mode=fan_out", seed=0)
    print(report.format_table())
    result = reslab.train({"model": "cifar_resnet20", "norm": "gn", "epochs": 1, "out": "runs/r20"})
    run = reslab.load_run("runs/r20")
    reslab.train({"model": "nets.py:MyNet", "dataset": "folder:data/pets,size=32", "norm": "gn"})
    print(reslab.study("inits", out="studies/inits").verdict.verdict)

Submodules are imported on first use so ``import reslab`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it, or (submodule, its name there)
_EXPORTS: dict[str, str | tuple[str, str]] = {
    "TrainConfig": "config",
    "train": "training",
    "sweep": "sweeps",
    "study": "sweeps",
    "report": "reporting",
    "signal": ("diagnose", "signal_propagation"),
    "SpecError": "errors",
    "make_norm": "norms",
    "norm_factory": "norms",
    "list_norms": "norms",
    "norm_activates": "norms",
    "convert_norms": "convert",
    "standardize_convs": "convs",
    "list_convs": "convs",
    "lsuv_init": "lsuv",
    "init_weights": "inits",
    "list_inits": "inits",
    "build_model": "models",
    "list_models": "models",
    "register_model": "models",
    "register_dataset": "datasets",
    "load_dataset": "datasets",
    "load_run": "evaluate",
    "Run": "rundir",
    "LoadedRun": ("rundir", "Run"),  # the name load_run's result had before every run became a Run
    "evaluate_run": "evaluate",
    "list_datasets": "datasets",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'reslab' has no attribute {name!r}")
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value
