"""The run directory: the files a run writes, their names, and how they are read back.

A run directory holds

- ``config.yaml``   the resolved config (what produced the numbers),
- ``metrics.jsonl`` one JSON object per epoch,
- ``steps.jsonl``   mean train loss and lr per interval of ``--log-every`` steps,
- ``checkpoint.pt`` the state after the last completed epoch (the model's
  ``state_dict`` under :data:`MODEL_STATE`), readable with ``weights_only=True``,
- ``summary.json``  written when the run ends (completed, diverged or failed).

A sweep directory holds one run directory per grid point and seed, and the
grid as given in ``sweep.yaml``.  Training writes these files; sweeps, reports
and :func:`reslab.evaluate.load_run` read them through this module alone.
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
from .fileio import atomic_write_text, read_jsonl

CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"
STEPS_FILE = "steps.jsonl"  # mean train loss and lr per interval of --log-every steps
RUN_FILES = (CONFIG_FILE, METRICS_FILE, STEPS_FILE, CHECKPOINT_FILE, SUMMARY_FILE)
SWEEP_PLAN = "sweep.yaml"  # the grid as given: base, axes, seeds and run ids in grid order
MODEL_STATE = "model"  # the checkpoint key that holds the model's state_dict


class UnreadableRecord(SpecError):
    """A record file of a run that exists but cannot be read; ``reason`` says why in a few words."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{str(path)!r} is unreadable ({reason})")
        self.path, self.reason = path, reason


# --- what is there ------------------------------------------------------------------------


def is_run_dir(folder: str | Path) -> bool:
    """True where ``folder`` holds a ``config.yaml``: a run, finished or not."""
    return (Path(folder) / CONFIG_FILE).is_file()


def missing_run_files(folder: str | Path) -> list[str]:
    """The names of the files a finished epoch leaves (config and checkpoint) that ``folder`` lacks."""
    return [name for name in (CONFIG_FILE, CHECKPOINT_FILE) if not (Path(folder) / name).is_file()]


def require_run_dir(folder: str | Path) -> Path:
    """``folder`` as a Path if it holds a config and a checkpoint; a one-line SpecError naming what is missing."""
    path = Path(folder)
    if not path.exists():
        raise SpecError(f"{str(folder)!r} is not a run directory: it does not exist")
    if not path.is_dir():
        raise SpecError(f"{str(folder)!r} is not a run directory: it is a file")
    missing = missing_run_files(path)
    if missing:
        why = " (the run has not completed an epoch)" if missing == [CHECKPOINT_FILE] else ""
        raise SpecError(f"{str(folder)!r} is not a run directory: no {' and no '.join(missing)}{why}")
    return path


# --- reading the records ---------------------------------------------------------------------


def read_config_mapping(folder: str | Path) -> dict[str, Any]:
    """``config.yaml`` as a mapping with keys spelled as TrainConfig's fields (``-`` read as ``_``).

    Returns the mapping as saved (keys a newer or older reslab wrote included);
    raises :class:`UnreadableRecord` for a file that cannot be read or parsed or
    holds no mapping.
    """
    file = Path(folder) / CONFIG_FILE
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UnreadableRecord(file, type(exc).__name__) from None
    if not isinstance(data, dict):
        raise UnreadableRecord(file, "not a mapping")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def read_config(folder: str | Path) -> TrainConfig:
    """The run's config as a TrainConfig; :class:`UnreadableRecord` if it cannot be read or is no valid config."""
    data = read_config_mapping(folder)
    try:
        return config_from_dict(data)
    except SpecError as exc:
        raise UnreadableRecord(Path(folder) / CONFIG_FILE, str(exc).splitlines()[0]) from None


def read_summary(folder: str | Path) -> dict[str, Any] | None:
    """A run directory's summary.json, or None where it has none (or an unreadable one)."""
    try:
        summary = json.loads((Path(folder) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def run_status(folder: str | Path) -> str | None:
    """The status in a run directory's summary.json, or None if it has not ended."""
    summary = read_summary(folder)
    return summary.get("status") if summary is not None else None


def run_numbers(folder: str | Path) -> str:
    """``, test acc 0.9630, 12.3 s`` from a finished run's summary (empty if it has none)."""
    summary = read_summary(folder) or {}
    parts = []
    if isinstance(summary.get("final_eval_acc"), (int, float)):
        parts.append(f"{summary.get('eval_split', 'eval')} acc {summary['final_eval_acc']:.4f}")
    if isinstance(summary.get("wall_time_s"), (int, float)):
        parts.append(f"{summary['wall_time_s']:.1f} s")
    return "".join(f", {p}" for p in parts)


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl, one per completed epoch ([] where there is none)."""
    return read_jsonl(Path(folder) / METRICS_FILE)


def read_steps(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of steps.jsonl, one per logged interval of steps ([] where there is none)."""
    return read_jsonl(Path(folder) / STEPS_FILE)


def read_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """checkpoint.pt loaded with ``weights_only=True`` onto ``device``.

    Returns the checkpoint's mapping; raises :class:`UnreadableRecord` for a torn,
    foreign or missing file.
    """
    file = Path(folder) / CHECKPOINT_FILE
    try:
        state = torch.load(file, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file fails in many ways
        raise UnreadableRecord(file, type(exc).__name__) from None
    if not isinstance(state, dict):
        raise UnreadableRecord(file, "not a reslab checkpoint")
    return state


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
        path = Path(folder)
        return cls(path=path, config=read_config(path), summary=read_summary(path), metrics=read_metrics(path),
                   steps=read_steps(path))


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
