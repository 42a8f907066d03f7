"""TensorBoard event files of a run: ``--tensorboard`` writes them into ``RUN/tb/`` (``RunDir.tb_dir``).

What is written, and at which global step:

- ``train/loss``, ``train/lr``: one point per ``steps.jsonl`` row (the mean loss
  over each interval of ``--log-every`` steps and the lr of its last step), at
  the row's optimizer step, written as each interval is measured;
- ``train/epoch_loss``, ``train/acc``, ``eval/loss``, ``eval/acc``: one point per
  ``metrics.jsonl`` row, at the epoch number (1, 2, ...);
- the run's config as hparams (the fields that decide what it computes, not
  :data:`reslab.config.EXECUTION_FIELDS`) with ``hparam/final_eval_acc`` at the
  number of epochs completed, when the run ends completed or diverged.

Event files cannot be truncated, so every session opens its writer with
``purge_step`` = the first step after the checkpoint (1 for a new run): when
a resumed session's file is read, TensorBoard drops every point an earlier
session wrote from that step on (the part of an epoch that is about to be
redone), and the curves go on with one point per step.  Epoch points are
written only after their checkpoint, so they never need dropping.  A resume
that turns ``--tensorboard`` on for a run recorded without it first writes the
points of the records up to the checkpoint.

Only :func:`check_available` and :class:`TensorBoardLog` import TensorBoard, so
``import reslab`` and runs without ``--tensorboard`` never load it.
"""

from __future__ import annotations

import importlib
import math
import re
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .config import EXECUTION_FIELDS, TrainConfig
from .errors import SpecError

FINAL_METRIC = "hparam/final_eval_acc"
_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.")
_EPOCH_TAGS = (("train/epoch_loss", "train_loss"), ("train/acc", "train_acc"), ("eval/loss", "eval_loss"),
               ("eval/acc", "eval_acc"))


def check_available() -> None:
    """A one-line SpecError where ``--tensorboard`` cannot work: the tensorboard package is missing."""
    try:
        importlib.import_module("torch.utils.tensorboard")  # imports tensorboard, and checks its version
    except ImportError:
        raise SpecError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or pip install 'reslab[tensorboard]')") from None


def event_files(log_dir: Path) -> list[Path]:
    """The TensorBoard event files directly in ``log_dir``, in the order TensorBoard reads them (by name)."""
    if not log_dir.is_dir():
        return []
    return sorted(p for p in log_dir.iterdir() if _EVENT_FILE.match(p.name) and p.is_file())


def hparams_of(cfg: TrainConfig) -> dict[str, Any]:
    """The config fields that decide what a run computes, as hparams values (bool, number or string):
    None reads ``default`` (the model's, or no scaling), an init policy its YAML flow mapping."""
    values: dict[str, Any] = {}
    for f in fields(cfg):
        if f.name in EXECUTION_FIELDS:
            continue
        value = getattr(cfg, f.name)
        if value is None:
            value = "default"
        elif isinstance(value, dict):
            value = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
        values[f.name] = value
    return values


class TensorBoardLog:
    """The writer of one session of a run (rank 0 only); :meth:`close` flushes everything to disk."""

    def __init__(self, log_dir: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        earlier = event_files(log_dir)
        self.fresh = not earlier  # no earlier session wrote here
        if earlier:
            # TensorBoard reads a run's event files in name order, and a name starts with the
            # second the file was opened: this session's file must sort after the earlier ones,
            # or its purge would be applied before the points it is meant to drop.
            newest = max(int(_EVENT_FILE.match(p.name).group(1)) for p in earlier)
            wait = newest + 1 - time.time()
            if wait > 0:
                time.sleep(wait)
        # Every session's file opens with a SessionLog.START event at purge_step, the first
        # session's too: TensorBoard's Python loader takes a run's first START for its start and
        # only a later one for a restart that drops the points at and after its step.
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=30)

    def step_row(self, row: dict[str, Any]) -> None:
        """One ``steps.jsonl`` row: its mean loss (NaN where it was not finite) and lr at its step."""
        loss = row.get("loss")
        self.writer.add_scalar("train/loss", math.nan if loss is None else loss, row["step"])
        self.writer.add_scalar("train/lr", row["lr"], row["step"])

    def epoch_row(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row, at its epoch number; flushed, so a finished epoch is on disk."""
        for tag, key in _EPOCH_TAGS:
            self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()

    def backfill(self, step_rows: list[dict[str, Any]], epoch_rows: list[dict[str, Any]]) -> None:
        """The points of records written before this writer existed (a resume turning it on)."""
        for row in step_rows:
            self.step_row(row)
        for row in epoch_rows:
            self.epoch_row(row)

    def run_end(self, cfg: TrainConfig, status: str, final_eval_acc: float | None, epochs: int) -> None:
        """The config as hparams and the final eval accuracy (at ``epochs``, the epochs completed);
        the hparams session ends in success for a completed run, in failure for a diverged one."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams.api_pb2 import Status
        from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME, SESSION_END_INFO_TAG
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
        from torch.utils.tensorboard.summary import hparams

        experiment, start, _ = hparams(hparams_of(cfg), {FINAL_METRIC: final_eval_acc})
        end_info = SessionEndInfo(status=Status.Value("STATUS_SUCCESS" if status == "completed" else "STATUS_FAILURE"))
        content = HParamsPluginData(session_end_info=end_info, version=PLUGIN_DATA_VERSION)
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=content.SerializeToString()))
        end = Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=metadata)])
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary, epochs)
        if final_eval_acc is not None:
            self.writer.add_scalar(FINAL_METRIC, final_eval_acc, epochs)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
