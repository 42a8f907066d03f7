"""The run directory: the files a run writes, their names, and how they are written and read back.

A run directory holds

- ``config.yaml``   the resolved config (what produced the numbers),
- ``metrics.jsonl`` one JSON object per epoch,
- ``steps.jsonl``   mean train loss and lr per interval of ``--log-every`` steps,
- ``checkpoint.pt`` the state after the last completed epoch (the model's
  ``state_dict`` under :data:`MODEL_STATE`), readable with ``weights_only=True``,
- ``summary.json``  written when the run ends (completed, diverged or failed),
- ``classes.json``  the class names, label order (where the dataset names its classes),
- ``sources.json``  the model's or dataset's code outside reslab, where the run uses
  some (:mod:`reslab.sources`),
- ``tb/``           TensorBoard event files, with ``--tensorboard`` (:mod:`reslab.tblog`).

:class:`RunDir` is the one object that writes these files and reads them back;
:class:`Run` is the one record of a run (planned, training, finished or loaded
with its model).  A sweep directory holds one run directory per grid point and
seed, and the grid as given in ``sweep.yaml``.  Training writes through this
module; sweeps, reports and :func:`reslab.evaluate.load_run` read through it alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .config import TrainConfig, config_from_dict
from .errors import SpecError
from .fileio import append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text, read_jsonl, rewrite_jsonl

CONFIG_FILE, METRICS_FILE = "config.yaml", "metrics.jsonl"
CHECKPOINT_FILE, SUMMARY_FILE = "checkpoint.pt", "summary.json"
STEPS_FILE = "steps.jsonl"  # mean train loss and lr per interval of --log-every steps
CLASSES_FILE = "classes.json"  # the dataset's class names, index = label, where the dataset names them
TB_DIR = "tb"  # TensorBoard event files, with --tensorboard (reslab.tblog)
RUN_FILES = (CONFIG_FILE, METRICS_FILE, STEPS_FILE, CHECKPOINT_FILE, SUMMARY_FILE)
SWEEP_PLAN = "sweep.yaml"  # the grid as given: base, axes, seeds and run ids in grid order
MODEL_STATE = "model"  # the checkpoint key that holds the model's state_dict


class UnreadableRecord(SpecError):
    """A record file of a run that exists but cannot be read; ``reason`` says why in a few words."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{str(path)!r} is unreadable ({reason})")
        self.path, self.reason = path, reason


# --- one run directory ------------------------------------------------------------------------


class RunDir:
    """One run directory: every file a run writes into it, and every reader of them.

    Training writes through it (rank 0 alone, each file whole or appended line by
    line); sweeps, reports and :func:`reslab.evaluate.load_run` read through it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The path of the record ``name`` (:data:`CONFIG_FILE`, ...) in this directory."""
        return self.path / name

    @property
    def tb_dir(self) -> Path:
        """Where ``--tensorboard`` writes its event files."""
        return self.path / TB_DIR

    # -- what is there --

    def is_run(self) -> bool:
        """True where the directory holds a ``config.yaml``: a run, finished or not."""
        return self.file(CONFIG_FILE).is_file()

    def has_checkpoint(self) -> bool:
        return self.file(CHECKPOINT_FILE).is_file()

    def holds_files(self) -> bool:
        """True where the directory exists and holds anything at all."""
        return self.path.is_dir() and any(self.path.iterdir())

    def missing(self) -> list[str]:
        """The names of the files a finished epoch leaves (config and checkpoint) that the directory lacks."""
        return [name for name in (CONFIG_FILE, CHECKPOINT_FILE) if not self.file(name).is_file()]

    # -- reading the records --

    def read_config_mapping(self) -> dict[str, Any]:
        """``config.yaml`` as a mapping with keys spelled as TrainConfig's fields (``-`` read as ``_``).

        Returns the mapping as saved (keys a newer or older reslab wrote included);
        raises :class:`UnreadableRecord` for a file that cannot be read or parsed or
        holds no mapping.
        """
        file = self.file(CONFIG_FILE)
        try:
            data = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UnreadableRecord(file, type(exc).__name__) from None
        if not isinstance(data, dict):
            raise UnreadableRecord(file, "not a mapping")
        return {str(k).replace("-", "_"): v for k, v in data.items()}

    def read_config(self) -> TrainConfig:
        """The run's config as a TrainConfig; :class:`UnreadableRecord` if it cannot be read or is no valid config."""
        data = self.read_config_mapping()
        try:
            return config_from_dict(data)
        except SpecError as exc:
            raise UnreadableRecord(self.file(CONFIG_FILE), str(exc).splitlines()[0]) from None

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json, or None where there is none (or an unreadable one)."""
        try:
            summary = json.loads(self.file(SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def status(self) -> str | None:
        """The status in summary.json, or None if the run has not ended."""
        summary = self.read_summary()
        return summary.get("status") if summary is not None else None

    def numbers(self) -> str:
        """``, test acc 0.9630, 12.3 s`` from a finished run's summary (empty if it has none)."""
        summary = self.read_summary() or {}
        parts = []
        if isinstance(summary.get("final_eval_acc"), (int, float)):
            parts.append(f"{summary.get('eval_split', 'eval')} acc {summary['final_eval_acc']:.4f}")
        if isinstance(summary.get("wall_time_s"), (int, float)):
            parts.append(f"{summary['wall_time_s']:.1f} s")
        return "".join(f", {p}" for p in parts)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl, one per completed epoch ([] where there is none)."""
        return read_jsonl(self.file(METRICS_FILE))

    def read_steps(self) -> list[dict[str, Any]]:
        """The rows of steps.jsonl, one per logged interval of steps ([] where there is none)."""
        return read_jsonl(self.file(STEPS_FILE))

    def read_checkpoint(self, device: str | torch.device = "cpu") -> dict[str, Any]:
        """checkpoint.pt loaded with ``weights_only=True`` onto ``device``.

        Returns the checkpoint's mapping; raises :class:`UnreadableRecord` for a torn,
        foreign or missing file.
        """
        file = self.file(CHECKPOINT_FILE)
        try:
            state = torch.load(file, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file fails in many ways
            raise UnreadableRecord(file, type(exc).__name__) from None
        if not isinstance(state, dict):
            raise UnreadableRecord(file, "not a reslab checkpoint")
        return state

    def read(self) -> Run:
        """The run from its records (config, summary, metrics, steps; no model)."""
        return Run(path=self.path, config=self.read_config(), summary=self.read_summary(),
                   metrics=self.read_metrics(), steps=self.read_steps())

    # -- writing the records (training, on rank 0) --

    def write_config(self, cfg: TrainConfig, notes: dict[str, Any] | None = None) -> Path:
        """config.yaml: the resolved config, then each of ``notes`` (how the run is laid out
        over processes) as a ``# key: value`` comment line, which reading it back ignores."""
        lines = "".join(f"# {k}: {v}\n" for k, v in (notes or {}).items())
        return atomic_write_text(self.file(CONFIG_FILE), cfg.to_yaml() + lines)

    def keep_records_until(self, epoch: int, step: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Drop the metrics rows past ``epoch`` and the steps rows past ``step`` (what a session
        wrote after the checkpoint it is resumed from, about to be redone); returns the rows kept."""
        metrics = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        steps = [r for r in self.read_steps() if r.get("step", 0) <= step]
        rewrite_jsonl(self.file(METRICS_FILE), metrics)
        rewrite_jsonl(self.file(STEPS_FILE), steps)
        return metrics, steps

    def append_metrics(self, *rows: dict[str, Any]) -> None:
        append_jsonl(self.file(METRICS_FILE), *rows)

    def append_steps(self, *rows: dict[str, Any]) -> None:
        if rows:
            append_jsonl(self.file(STEPS_FILE), *rows)

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """checkpoint.pt, replaced whole: a crash leaves the previous one or this one."""
        return atomic_torch_save(self.file(CHECKPOINT_FILE), state)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return atomic_write_json(self.file(SUMMARY_FILE), summary)

    def write_classes(self, classes: list[str] | tuple[str, ...]) -> Path:
        """classes.json: the class names, the name of label ``i`` at index ``i``."""
        return atomic_write_json(self.file(CLASSES_FILE), list(classes))

    def read_classes(self) -> list[str] | None:
        """The class names in classes.json, or None where the run has none (or an unreadable one)."""
        try:
            classes = json.loads(self.file(CLASSES_FILE).read_text())
        except (OSError, ValueError):
            return None
        return [str(c) for c in classes] if isinstance(classes, list) else None


# --- the same readers by folder, for callers that hold a path ---------------------------------


def is_run_dir(folder: str | Path) -> bool:
    """True where ``folder`` holds a ``config.yaml``: a run, finished or not."""
    return RunDir(folder).is_run()


def require_run_dir(folder: str | Path) -> Path:
    """``folder`` as a Path if it holds a config and a checkpoint; a one-line SpecError naming what is missing."""
    path = Path(folder)
    if not path.exists():
        raise SpecError(f"{str(folder)!r} is not a run directory: it does not exist")
    if not path.is_dir():
        raise SpecError(f"{str(folder)!r} is not a run directory: it is a file")
    missing = RunDir(path).missing()
    if missing:
        why = " (the run has not completed an epoch)" if missing == [CHECKPOINT_FILE] else ""
        raise SpecError(f"{str(folder)!r} is not a run directory: no {' and no '.join(missing)}{why}")
    return path


def read_config_mapping(folder: str | Path) -> dict[str, Any]:
    """:meth:`RunDir.read_config_mapping` of ``folder``."""
    return RunDir(folder).read_config_mapping()


def read_config(folder: str | Path) -> TrainConfig:
    """:meth:`RunDir.read_config` of ``folder``."""
    return RunDir(folder).read_config()


def read_summary(folder: str | Path) -> dict[str, Any] | None:
    """:meth:`RunDir.read_summary` of ``folder``."""
    return RunDir(folder).read_summary()


def run_status(folder: str | Path) -> str | None:
    """:meth:`RunDir.status` of ``folder``."""
    return RunDir(folder).status()


def run_numbers(folder: str | Path) -> str:
    """:meth:`RunDir.numbers` of ``folder``."""
    return RunDir(folder).numbers()


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    """:meth:`RunDir.read_metrics` of ``folder``."""
    return RunDir(folder).read_metrics()


def read_steps(folder: str | Path) -> list[dict[str, Any]]:
    """:meth:`RunDir.read_steps` of ``folder``."""
    return RunDir(folder).read_steps()


def read_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """:meth:`RunDir.read_checkpoint` of ``folder``."""
    return RunDir(folder).read_checkpoint(device)


# --- the run record ----------------------------------------------------------------------------


@dataclass
class Run:
    """One run, as every part of reslab sees it: what training returns, what a sweep plans and
    finds, what reports and verdicts read, and what :func:`reslab.load_run` gives back.

    ``summary`` is None while the run has not ended (a planned run, or one still
    training); ``model`` is filled only by :func:`reslab.load_run`.
    """

    path: Path
    config: TrainConfig
    summary: dict[str, Any] | None = None  # summary.json
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl: one row per completed epoch
    steps: list[dict[str, Any]] = field(default_factory=list)  # steps.jsonl: one row per logged interval
    model: nn.Module | None = field(default=None, repr=False)  # built as training built it, in eval mode
    # Whether the model runs in NHWC, as it did in training, and so takes NHWC batches.
    channels_last: bool = field(default=False, repr=False)

    @property
    def status(self) -> str:
        """completed, diverged or failed once the run has ended; incomplete before."""
        return str(self.summary.get("status", "failed")) if self.summary is not None else "incomplete"

    @property
    def run_id(self) -> str:
        """The run's name in its sweep: its directory's name."""
        return self.path.name

    @property
    def out(self) -> Path:
        """The run directory (the name ``reslab.train``'s result has always used)."""
        return self.path

    def value(self, name: str) -> Any:
        """The config field ``name`` of this run (a grid axis, the seed, ...)."""
        return getattr(self.config, name)

    @classmethod
    def read(cls, folder: str | Path) -> Run:
        """The run in ``folder`` from its records (config, summary, metrics, steps; no model)."""
        return RunDir(folder).read()


# --- sweep directories -----------------------------------------------------------------------


def write_sweep_plan(out: str | Path, plan: dict[str, Any]) -> Path:
    """Write a sweep's plan (base, grid, seeds, run ids) into ``out``; returns the file written."""
    return atomic_write_text(Path(out) / SWEEP_PLAN, yaml.safe_dump(plan, sort_keys=False))


def read_sweep_plan(out: str | Path) -> dict[str, Any] | None:
    """A sweep directory's plan, or None where it has none (or an unreadable one)."""
    try:
        plan = yaml.safe_load((Path(out) / SWEEP_PLAN).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return plan if isinstance(plan, dict) else None
