"""Finished runs: read a run directory back (:func:`load_run`) and measure it (:func:`evaluate_run`).

``reslab eval DIR`` is :func:`evaluate_run`; both only read the run directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .build import build_for
from .config import TrainConfig
from .data import Dataset
from .datasets import NoTestSplit, load_dataset
from .errors import SpecError, choices_error
from .models import is_user_model_name
from .rundir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_STATE,
    Run,
    RunDir,
    UnreadableRecord,
    read_config,
    require_run_dir,
)
from .sources import import_registrations, model_change, read_sources
from .training import evaluate_model, resolve_device, run_dataset, uses_channels_last

log = logging.getLogger(__name__)

EVAL_SPLITS = ("test", "val", "train")


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Read the run directory ``path``: config, records, and the model as of its last checkpoint.

    The model is built exactly as training built it (the run's dataset sizes it,
    its memory format is the run's) and holds the checkpoint's weights, in eval
    mode on ``device``.  Returns the run's record, a :class:`reslab.rundir.Run` with its
    ``model`` (and ``channels_last``, the model's memory format) set; ``summary`` is None
    while the run has not ended.  A directory without a config.yaml or a
    checkpoint.pt, or with unreadable ones, is a SpecError.
    """
    folder = require_run_dir(path)
    run, _ = _load_run(folder, read_config(folder), resolve_device(str(device)))
    return run


def _load_run(folder: Path, cfg: TrainConfig, device: torch.device) -> tuple[Run, Dataset]:
    """The run in ``folder`` (config ``cfg``) on ``device``, and the dataset it trained on."""
    run_dir = RunDir(folder)
    cfg = _with_sources(folder, cfg)
    state = run_dir.read_checkpoint(device)
    if not isinstance(state.get(MODEL_STATE), dict):
        raise UnreadableRecord(folder / CHECKPOINT_FILE, f"no {MODEL_STATE!r} state dict: not a reslab checkpoint")
    data = run_dataset(cfg, device)
    with torch.random.fork_rng(devices=[]):  # building draws from the global generator: leave the caller's alone
        model = build_for(cfg, data, initialize=False).to(device)  # the checkpoint holds every weight
    channels_last = uses_channels_last(cfg.channels_last, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        model.load_state_dict(state[MODEL_STATE])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise SpecError(f"checkpoint {str(folder / CHECKPOINT_FILE)!r} does not fit the model its {CONFIG_FILE} "
                        f"describes ({type(exc).__name__})") from None
    model.eval()
    run = Run(path=folder, config=cfg, summary=run_dir.read_summary(), metrics=run_dir.read_metrics(),
              steps=run_dir.read_steps(), model=model, channels_last=channels_last)
    return run, data


def _with_sources(folder: Path, cfg: TrainConfig) -> TrainConfig:
    """``cfg`` ready to rebuild the run's model here: the modules that registered its model or dataset
    imported (:func:`reslab.sources.import_registrations`), and a model file given by a relative path
    that does not resolve from here found where the run recorded it."""
    import_registrations(folder)
    changed = model_change(folder)
    if changed is not None:
        log.warning("run %s: %s; the checkpoint is loaded into the model as it is now", folder, changed)
    recorded = (read_sources(folder).get("model") or {}).get("file")
    if not is_user_model_name(cfg.model) or cfg.model.startswith("py:") or not recorded:
        return cfg
    given, _, attr = cfg.model.rpartition(":")
    if Path(given).is_file() or Path(given).name != Path(recorded).name or not Path(recorded).is_file():
        return cfg
    return replace(cfg, model=f"{recorded}:{attr}")


@dataclass(frozen=True)
class RunEvaluation:
    """A finished run's model measured on one split of one dataset."""

    path: Path
    dataset: str  # the dataset spec
    split: str  # test | val | train
    loss: float
    acc: float
    images: int
    eval_batch_size: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        """The numbers and what they were measured on, as JSON-ready values."""
        return {"run": str(self.path), "dataset": self.dataset, "split": self.split, "loss": self.loss,
                "acc": self.acc, "images": self.images, "eval_batch_size": self.eval_batch_size,
                "device": self.device}


def evaluate_run(path: str | Path, *, split: str | None = None, dataset: str | None = None,
                 eval_batch_size: int | None = None, device: str = "auto") -> RunEvaluation:
    """Evaluate the run in ``path`` as training evaluated it, writing nothing.

    ``split``: ``test``, ``val`` (the images the run held out with its
    ``val_split`` and ``seed``) or ``train`` (the images it trained on,
    un-augmented); default the split the run evaluated on.  ``dataset``: another
    dataset spec of the same image shape and classes, normalized as the run's
    inputs were.  ``eval_batch_size``: default the run's.  Returns a
    :class:`RunEvaluation`; bad input is a SpecError (a bad split or batch size
    before any data is loaded).
    """
    folder = require_run_dir(path)
    cfg = read_config(folder)
    split = check_eval_split(cfg, split, folder)
    batch_size = cfg.eval_batch_size if eval_batch_size is None else eval_batch_size
    if batch_size < 1:
        raise SpecError(f"--eval-batch-size must be a positive integer, got {batch_size}")
    dev = resolve_device(device)
    run, run_data = _load_run(folder, cfg, dev)
    data = split_data(cfg, run_data, split, dataset)
    precision = cfg.precision if dev.type == "cuda" else "fp32"  # autocast as in training where it ran
    result = evaluate_model(run.model, data, batch_size, channels_last=run.channels_last, precision=precision)
    return RunEvaluation(path=folder, dataset=data.spec, split=split, loss=result.loss, acc=result.acc,
                         images=result.images, eval_batch_size=batch_size, device=str(dev))


def check_eval_split(cfg: TrainConfig, split: str | None, folder: Path) -> str:
    """``split`` checked against the run (default: the split it evaluated on); returns the split to use."""
    if split is None:
        return "val" if cfg.val_split else "test"
    if split not in EVAL_SPLITS:
        raise choices_error("--split", split, EVAL_SPLITS)
    if split == "val" and not cfg.val_split:
        raise SpecError(f"--split val: the run in {str(folder)!r} was trained without --val-split, so it held out "
                        "no validation images; valid choices for it: test, train")
    return split


def split_data(cfg: TrainConfig, run_data: Dataset, split: str, dataset: str | None = None) -> Dataset:
    """A Dataset whose eval split holds the images ``split`` names, normalized as the run's inputs were.

    ``run_data`` is the run's own dataset (:func:`run_dataset`); ``dataset`` another
    spec to take the images from, held out with the run's ``val_split`` and ``seed``.
    """
    val_split = 0.0 if split == "test" else cfg.val_split
    source = run_data
    if dataset is not None or val_split != cfg.val_split:
        try:
            source = load_dataset(dataset or cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                                  device=run_data.device, val_split=val_split, seed=cfg.seed)
        except NoTestSplit:
            raise SpecError(f"--split test: dataset {dataset or cfg.dataset!r} has no test split (the run evaluated "
                            f"on the images --val-split {cfg.val_split:g} held out); valid choices for it: val, "
                            "train") from None
        _check_fits(source, run_data)
    images, labels = ((source.train_images, source.train_labels) if split == "train"
                      else (source.eval_images, source.eval_labels))
    return replace(source, eval_images=images, eval_labels=labels, eval_split=split,
                   mean=run_data.mean, std=run_data.std)


def _check_fits(data: Dataset, run_data: Dataset) -> None:
    """A SpecError unless ``data`` has the image shape and classes of the dataset the run trained on."""
    def shape(d: Dataset) -> str:
        return f"{d.in_channels}x{d.image_size}x{d.image_size} images in {d.num_classes} classes"

    if shape(data) != shape(run_data):
        raise SpecError(f"--dataset {data.spec!r} has {shape(data)}; the run's model takes {shape(run_data)} "
                        f"({run_data.spec}); choose a dataset of that shape")
