"""The code outside reslab a run depends on: recorded with the run, checked, and imported again.

A run of your own model (``--model py:pkg.mod:Name`` or ``file.py:Name``), or of a model
or dataset you registered in Python (``@reslab.register_model``,
``@reslab.register_dataset``), writes ``sources.json`` into its run directory::

    {"model": {"spec": "nets.py:MyNet", "file": "/home/me/nets.py", "sha256": "9f2c..."},
     "dataset": {"spec": "pets", "module": "mypkg.data", "file": "/home/me/mypkg/data.py"}}

* ``--resume`` and a sweep reusing a finished run compare the model file's SHA-256 with
  the one recorded and refuse, in one line naming the file, a run whose model code
  changed since it was trained: its checkpoint would be continued, or its numbers
  reported, under code that did not produce them.
* :func:`reslab.load_run` and ``reslab eval`` import the recorded module of a
  registered model or dataset that the process has not registered yet, so a run on
  a registration made in an importable module can be evaluated from a fresh shell.
  A registration made in a script (``__main__``) cannot be imported again: a
  one-line SpecError says to move it into a module.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import SpecError
from .fileio import atomic_write_json, file_digest, source_file_of

log = logging.getLogger(__name__)

SOURCES_FILE = "sources.json"


def _registered_model_source(name: str) -> dict[str, Any] | None:
    """Module, file and digest of a model registered outside reslab; None for reslab's own."""
    from .models import _REGISTRY

    entry = _REGISTRY.get(name)
    if entry is None or entry.fn.__module__.split(".")[0] == "reslab":
        return None
    record: dict[str, Any] = {"module": entry.fn.__module__}
    file = source_file_of(entry.fn)
    if file is not None:
        record.update(file=str(file), sha256=file_digest(file))
    return record


def model_source(name: str) -> dict[str, Any] | None:
    """What the run records of the code of model ``name``; None for reslab's own and ``tv:`` models."""
    from .models import is_user_model_name
    from .models.user_models import model_source as user_model_source

    record = user_model_source(name) if is_user_model_name(name) else _registered_model_source(name)
    return None if record is None else {"spec": name, **record}


def dataset_source(spec: str) -> dict[str, Any] | None:
    """Module and file of a dataset registered outside reslab; None for reslab's own."""
    from .datasets import dataset_source as registered

    record = registered(spec)
    return None if record is None else {"spec": spec, **record}


def run_sources(cfg: TrainConfig) -> dict[str, Any]:
    """The sources of a run of ``cfg``: ``model`` and ``dataset`` where they live outside reslab."""
    found = {"model": model_source(cfg.model), "dataset": dataset_source(cfg.dataset)}
    return {key: value for key, value in found.items() if value is not None}


def write_sources(folder: str | Path, cfg: TrainConfig) -> None:
    """``sources.json`` into the run directory ``folder``, where the run depends on code outside reslab."""
    sources = run_sources(cfg)
    if sources:
        atomic_write_json(Path(folder) / SOURCES_FILE, sources)


def read_sources(folder: str | Path) -> dict[str, Any]:
    """The run's ``sources.json`` (empty where it has none or it cannot be read)."""
    path = Path(folder) / SOURCES_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_change(folder: str | Path) -> str | None:
    """Why the model code of the run in ``folder`` is not the code it was trained with; None if it is."""
    recorded = read_sources(folder).get("model") or {}
    file, digest = recorded.get("file"), recorded.get("sha256")
    if not file or not digest:
        return None
    if not Path(file).is_file():
        return f"its model source {file} is gone"
    if file_digest(file) != digest:
        return f"its model source {file} changed since it was trained"
    return None


def _import_registration(kind: str, record: dict[str, Any]) -> None:
    module, file = record.get("module"), record.get("file")
    if not module or (module in sys.modules and module != "__main__"):
        return  # nothing recorded, or already imported in this process
    if module == "__main__":
        raise SpecError(f"{kind} {record.get('spec')!r} was registered by the script {file or '__main__'}, which "
                        f"cannot be imported again: register it in a module, then import that module")
    try:
        importlib.import_module(module)
        return
    except ImportError:
        if not file or not Path(file).is_file():
            raise SpecError(f"{kind} {record.get('spec')!r} was registered by module {module!r}, which cannot be "
                            f"imported here{f' and {file} is gone' if file else ''}; make it importable") from None
    spec = importlib.util.spec_from_file_location(module, file)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)


def import_registrations(folder: str | Path) -> None:
    """Import the modules that registered the run's model and dataset, where this process lacks them."""
    from .datasets import dataset_names
    from .models import model_names
    from .specs import parse_spec

    sources = read_sources(folder)
    model, dataset = sources.get("model"), sources.get("dataset")
    if model and model.get("module") and model.get("spec") not in model_names():
        _import_registration("model", model)
    if dataset and dataset.get("module") and parse_spec(dataset["spec"]).name not in dataset_names():
        _import_registration("dataset", dataset)


__all__ = ["SOURCES_FILE", "dataset_source", "file_digest", "import_registrations", "model_change",
           "model_source", "read_sources", "run_sources", "write_sources"]
