"""Training: ``train(config)`` runs one config into one run directory.

:class:`Trainer` owns a run: built from a config, it trains one epoch at a time
(:meth:`Trainer.train_epoch`, or its first N steps for a benchmark) and runs the
whole run with :meth:`Trainer.fit`, the one loop that trains, evaluates,
checkpoints and records every epoch and ends the run completed, diverged or
failed.  Everything it writes into the run directory goes through
:class:`reslab.rundir.RunDir`:

- ``config.yaml``   the resolved config (what produced the numbers),
- ``metrics.jsonl`` one JSON object per epoch, ``steps.jsonl`` one per interval of steps,
- ``checkpoint.pt`` written atomically after every epoch: model, optimizer,
  scheduler, grad scaler, epoch and RNG state, config - plain tensors,
  numbers and strings only, so ``torch.load(weights_only=True)`` reads it,
- ``summary.json``  written when the run ends (completed, diverged or failed),
- ``tb/``           TensorBoard event files, with ``tensorboard=True`` (:mod:`reslab.tblog`).

``train`` returns the run's record, a :class:`reslab.rundir.Run`; ``load_run(dir)``
reads a run back with its model as training built it, and ``evaluate_run(dir)``
measures that model on a split the way training did.

``resume=True`` continues from the checkpoint up to ``config.epochs`` and gives
exactly the metrics and weights of an uninterrupted run on the CPU: the data
order and augmentation of each epoch come from ``(seed, epoch)`` alone and the
global RNG state (dropout) is restored from the checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import math
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .build import build_for
from .build import check as check_model
from .config import EXECUTION_FIELDS, PROGRESS, TrainConfig, config_from_dict, describe_differences, resume_conflicts
from .data import Dataset
from .datasets import load_dataset
from .diagnose import count_params
from .distributed import Dist, check_world_size
from .errors import SpecError, choices_error
from .fileio import unwritable_reason
from .optim import make_optimizer, make_scheduler, parse_schedule

# CONFIG_FILE, METRICS_FILE, STEPS_FILE, SUMMARY_FILE and read_summary are not used here: callers that
# found them in this module before reslab.rundir owned the run directory still do.
from .rundir import (  # noqa: F401
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_STATE,
    STEPS_FILE,
    SUMMARY_FILE,
    Run,
    RunDir,
    UnreadableRecord,
    read_summary,
)
from .sources import model_change, write_sources
from .tblog import TensorBoardLog, check_available

log = logging.getLogger(__name__)

NO_STEP = 2**62  # "no non-finite loss yet" in the cross-rank MIN
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RunFailed(RuntimeError):
    """The run started but could not finish (not bad input)."""


# --- setup -----------------------------------------------------------------------


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` names (auto: CUDA where there is one); a SpecError if it is unusable here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SpecError(f"unknown --device {spec!r}; valid choices: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"--device {spec!r} asked for CUDA, but no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise SpecError(f"--device {spec!r}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    if device.type == "mps":
        # The loop keeps float64 sums on the device and the datasets compute float64
        # channel statistics: MPS has no float64 kernels, so a run would fail mid-way.
        raise SpecError(f"--device {spec!r} is not supported (MPS has no float64 kernels, which the training "
                        "loop's exact sums need); valid choices: auto, cpu, cuda, cuda:N")
    return device


def _native_bf16() -> bool:
    """bf16 in hardware (emulated bf16 on older GPUs runs, but far slower than fp16)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before the argument existed
        return torch.cuda.is_bf16_supported()


def check_config(cfg: TrainConfig) -> None:
    """Everything that can be checked before touching data or disk."""
    cfg.validate()
    check_model(cfg)
    parse_schedule(cfg.schedule)
    device = resolve_device(cfg.device)
    if cfg.precision != "fp32" and device.type != "cuda":
        raise SpecError(f"--precision {cfg.precision} needs a CUDA device; on the CPU use --precision fp32")
    if cfg.precision == "bf16" and device.type == "cuda" and not _native_bf16():
        raise SpecError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                        "valid choices here: fp32, fp16")
    if cfg.sync_bn and device.type != "cuda":
        raise SpecError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel); drop --sync-bn")
    if cfg.tensorboard:
        check_available()


def preflight(configs: list[TrainConfig]) -> None:
    """Check configs as deeply as possible without training: specs, datasets, model builds.

    Each distinct dataset is loaded once (so a missing one is reported now) and
    every model is built on the ``meta`` device, which allocates nothing, so an
    impossible option (``gn:5`` on a 16-channel layer) surfaces before any run
    starts.
    """
    datasets: dict[tuple, Dataset] = {}
    for cfg in configs:
        check_config(cfg)
        key = (cfg.dataset, cfg.data_dir, cfg.download, cfg.val_split)
        if key not in datasets:
            datasets[key] = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                                         val_split=cfg.val_split, seed=cfg.seed)
        with torch.device("meta"):
            build_for(cfg, datasets[key], initialize=False)


def _check_ghost_batches(model: nn.Module, cfg: TrainConfig, num_train: int, world_size: int) -> None:
    """Ghost BN splits each training batch into groups of G: every batch must split evenly, the
    short last one of an epoch included, or the run is refused before its first step."""
    from .norms import GhostBatchNorm2d

    ghosts = sorted({m.ghost for m in model.modules() if isinstance(m, GhostBatchNorm2d) and m.ghost is not None})
    per_rank = cfg.batch_size // world_size
    last = num_train % cfg.batch_size if world_size == 1 else 0  # DDP drops the short last batch
    for g in ghosts:
        bad = per_rank if per_rank % g else last if last % g else None
        if bad is not None:
            raise SpecError(f"--norm {cfg.norm!r}: ghost batches of {g} cannot split a training batch of {bad} "
                            f"({num_train} images at --batch-size {cfg.batch_size}); choose a batch size that {g} "
                            "divides, with a last batch it divides too")


# GroupNorm layers with fewer channels per group than this run slower in NHWC: PyTorch's
# channels-last GroupNorm kernel vectorizes over the channels of a group (on 2 CPU cores,
# forward + backward per layer: 1 channel per group 2-9x slower, 4 channels 1.1-2.8x, 8 at par).
CHANNELS_LAST_MIN_GROUP = 8


def uses_channels_last(setting: str, model: nn.Module) -> bool:
    """``--channels-last``: on, off, or auto = on for a model with 2-d convolutions, unless a
    GroupNorm layer has fewer than 8 channels per group (``in``, ``gn:G`` with many groups).

    NHWC lets oneDNN (CPU) and cuDNN (GPU) run convolutions without layout conversions;
    measured on 2 CPU cores (benchmarks/train_throughput.py), cifar_resnet20 trains 1.3x
    faster with ``bn``, 1.15x with ``ln`` and 1.07x with plain ``gn`` (16+ channels per
    group), but 0.68x with ``in`` (one channel per group), which auto therefore keeps in
    NCHW.  A model without convolutions (the MLP) has nothing to gain.
    """
    if setting != "auto":
        return setting == "on"
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    narrow_groups = any(isinstance(m, nn.GroupNorm) and m.num_channels // m.num_groups < CHANNELS_LAST_MIN_GROUP
                        for m in model.modules())
    return convolutional and not narrow_groups


def default_out(cfg: TrainConfig) -> Path:
    slug = "-".join(str(v) for v in (cfg.model, cfg.norm, cfg.init, cfg.dataset.split(":")[0], f"seed{cfg.seed}"))
    return Path("runs") / "".join(c if c.isalnum() or c in "-_.=" else "_" for c in slug)


def run_dataset(cfg: TrainConfig, device: torch.device | str = "cpu") -> Dataset:
    """The dataset a run of ``cfg`` trains on, on ``device``: its train split, and the split it
    evaluates on (the validation images held out by ``cfg.val_split`` and ``cfg.seed``, or the
    test split)."""
    return load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, device=device,
        val_split=cfg.val_split, seed=cfg.seed,
    )


def versions() -> dict[str, str]:
    import torchvision

    from . import __version__

    return {"reslab": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


# --- the run -----------------------------------------------------------------------


@dataclass
class EpochStats:
    """What one pass of :meth:`Trainer.train_epoch` measured, summed over every rank."""

    train_loss: float  # mean cross-entropy over the images seen
    train_acc: float
    seconds: float
    images: int  # images trained on, over every rank
    steps: int  # optimizer steps taken
    step_rows: list[dict[str, Any]]  # the steps.jsonl rows of the pass's intervals
    diverged_at: int | None  # the first step whose loss was not finite, if any

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class Trainer:
    """One run: built from a validated config for its run directory, it trains epoch by epoch
    (:meth:`train_epoch`) and runs the whole run with its records (:meth:`fit`)."""

    def __init__(self, cfg: TrainConfig, out: str | Path, device: torch.device, dist: Dist | None = None):
        self.cfg, self.device = cfg, device
        self.run_dir = RunDir(out)
        self.dist = dist or Dist()
        # Dropout draws from the global generator: seed it per run (and per
        # rank, so ranks drop different units); resume restores its state.
        torch.manual_seed(cfg.seed * 1000 + self.dist.rank)
        if device.type == "cuda":
            # Every step has the same shapes (the short last batch is one more), so cuDNN's
            # autotuner pays for itself within the first epoch.
            torch.backends.cudnn.benchmark = True
        self.data = run_dataset(cfg, device)
        model = build_for(cfg, self.data).to(device)
        _check_ghost_batches(model, cfg, self.data.num_train, self.dist.world_size)
        self.num_params = count_params(model)
        if cfg.sync_bn and self.dist.world_size > 1:  # one process: plain BN is already exact
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.channels_last = uses_channels_last(cfg.channels_last, model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the module whose state_dict is saved
        self.net: nn.Module = model
        if self.dist.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            # Static shapes: the train step compiles once for the full batch and once for a
            # short last batch, and both stay cached across epochs.  Evaluation runs the
            # eager module (``self.model``), so switching to eval mode never recompiles.
            self.net = torch.compile(self.net, dynamic=False)
        self.steps_per_epoch = self.data.steps_per_epoch(cfg.batch_size, drop_last=self.dist.world_size > 1)
        self.optimizer = make_optimizer(
            model, cfg.optimizer, lr=cfg.effective_lr(), momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov, decay_norm_and_bias=cfg.decay_norm_and_bias,
        )
        self.scheduler = make_scheduler(
            self.optimizer, cfg.schedule, epochs=cfg.epochs, steps_per_epoch=self.steps_per_epoch,
            warmup_epochs=cfg.warmup_epochs,
        )
        if self.dist.is_main:  # logged once the config has passed every check: bad input stays one line
            log.info("data: %s", self.data.describe())
        self.amp_dtype = DTYPES[cfg.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.epoch = 0  # epochs completed
        self.step = 0
        self.first_step_loss: float | None = None  # the loss at initialization (kept across resumes)
        # Totals over every session of the run (a resume adds to them): wall time up to the
        # last checkpoint, and the seconds and images of the training epochs it holds.
        self.wall_time_s, self.train_seconds, self.train_images = 0.0, 0.0, 0.0
        self.progress = _Progress("none", 0, enabled=False)  # what fit() shows; silent for a bare Trainer
        self.tb: TensorBoardLog | None = None  # fit() opens it with --tensorboard, on rank 0

    @property
    def layout(self) -> dict[str, int]:
        """How the run is spread over processes: noted in config.yaml and in the summary."""
        return {"world_size": self.dist.world_size, "per_device_batch": self.cfg.batch_size // self.dist.world_size}

    # -- state --

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This process's generators: dropout's masks come from them."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def gather_rng_states(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's :meth:`rng_state`, in rank order; a collective, so every rank calls it."""
        if self.dist.world_size == 1:
            return [self.rng_state()]
        states: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, self.rng_state())
        return [{k: v.cpu() for k, v in state.items()} for state in states]

    def state_dict(self, rng_states: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        """The checkpoint.  ``rng_states`` (from :meth:`gather_rng_states`) saves every rank's
        generators, so a resumed DDP run draws the dropout masks an uninterrupted one would."""
        rng_states = rng_states or [self.rng_state()]
        rng = {**rng_states[0], "per_rank": rng_states}
        return {
            "format": 1,
            "epoch": self.epoch,
            "step": self.step,
            "first_step_loss": self.first_step_loss,
            "wall_time_s": self.wall_time_s,
            "train_seconds": self.train_seconds,
            "train_images": self.train_images,
            MODEL_STATE: self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state[MODEL_STATE])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        per_rank = state["rng"].get("per_rank") or [state["rng"]]
        if len(per_rank) == self.dist.world_size:
            rng = per_rank[self.dist.rank]
        elif self.dist.rank == 0:
            rng = per_rank[0]
        else:  # resumed on more processes than saved it: a fresh stream per rank and epoch
            torch.manual_seed((self.cfg.seed * 1000 + self.dist.rank) * 100_003 + self.epoch)
            rng = {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.first_step_loss = state.get("first_step_loss")
        self.wall_time_s = float(state.get("wall_time_s", 0.0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.train_images = float(state.get("train_images", 0.0))

    # -- the run --

    def fit(self, progress: str = "none") -> Run:
        """Train from where the run stands (its start, or the checkpoint :meth:`load_state_dict`
        loaded) up to ``cfg.epochs``, and record it; returns the run's record.

        After every epoch the model is evaluated and the checkpoint and the metrics row
        are written.  The run ends completed, diverged (a loss that is not finite: the
        epoch stops there) or failed (an exception, recorded rather than raised), and its
        summary is written.  ``progress`` says how it shows (``cfg.progress``'s choices).
        Under torchrun a rank whose run breaks records the failure, aborts the process
        group and raises :class:`RunFailed`.
        """
        cfg = self.cfg
        with self._session() as (metrics, steps):
            self.progress = _Progress(progress, self.steps_per_epoch * (cfg.epochs - self.epoch), self.dist.is_main)
            status, ending = "completed", {}  # ending: why the run stopped early, for its summary
            started, wall_before = time.perf_counter(), self.wall_time_s  # earlier sessions, up to the checkpoint
            try:
                while self.epoch < cfg.epochs:
                    self.progress.start_epoch(self.epoch + 1, cfg.epochs)
                    lr = self.optimizer.param_groups[0]["lr"]  # the lr of the epoch's first step
                    stats = self.train_epoch()
                    self._record_steps(stats.step_rows)
                    steps.extend(stats.step_rows)
                    if stats.diverged_at is not None:
                        status, ending = "diverged", {"diverged_at_step": stats.diverged_at}
                        log.warning("loss is not finite at step %d (epoch %d): run diverged", stats.diverged_at,
                                    self.epoch + 1)
                        break
                    self.epoch += 1
                    row = {"epoch": self.epoch, "train_loss": stats.train_loss, "train_acc": stats.train_acc,
                           **self.evaluate(), "lr": lr, "epoch_time_s": stats.seconds,
                           "images_per_s": stats.images_per_s}
                    self.train_seconds += stats.seconds
                    self.train_images += stats.images
                    self.wall_time_s = wall_before + time.perf_counter() - started
                    self._record_epoch(row)
                    metrics.append(row)
                    self.progress.end_epoch(row, cfg.epochs)
            except (SpecError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - a run that breaks is recorded, not a traceback
                status, ending = "failed", {"error": f"{type(exc).__name__}: {exc}"}
                where = f" on rank {self.dist.rank}" if self.dist.world_size > 1 else ""
                log.error("run failed%s: %s", where, ending["error"])
            finally:
                self.progress.close()
            summary = {**self._summary(status, metrics, wall_before + time.perf_counter() - started), **ending}
            return self._end(summary, metrics, steps)

    # -- epochs --

    def autocast(self):
        return autocast_for(self.device, self.cfg.precision)

    def train_epoch(self, max_steps: int | None = None) -> EpochStats:
        """One pass over the training split with epoch ``self.epoch``'s order and augmentation, or
        over its first ``max_steps`` batches; ``self.epoch`` is left to the caller to advance.

        The pass stops at the end of the first interval of ``cfg.log_every`` steps in
        which a loss was not finite (``diverged_at`` says at which step).
        """
        cfg, dist = self.cfg, self.dist
        self.net.train()
        # Sums live on the device; one sync per epoch (plus one per interval, below).
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss*n, correct
        count = 0  # images seen: known on the host, so no tensor crosses to the device per step
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        # The per-step record: the loss summed on the device over each interval of
        # cfg.log_every steps, read back (with the non-finite check) once per interval.
        interval_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        interval_steps, first_step = 0, self.step
        step_rows: list[dict[str, Any]] = []
        diverged_at = None
        last = self.steps_per_epoch if max_steps is None else min(max_steps, self.steps_per_epoch)
        start = time.perf_counter()
        batches = self.data.train_batches(
            cfg.batch_size, epoch=self.epoch, seed=cfg.seed, drop_last=dist.world_size > 1,
            rank=dist.rank, world_size=dist.world_size, channels_last=self.channels_last,
        )
        for i, (x, y) in enumerate(itertools.islice(batches, last)):  # x: (B, C, H, W) normalized, y: (B,)
            with self.autocast():
                logits = self.net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
            self.scheduler.step()
            self.step += 1
            if self.step == 1:  # the loss at initialization, averaged over ranks: one sync per run
                self.first_step_loss = dist.all_sum(loss.detach().float().reshape(1)).item() / dist.world_size
            with torch.no_grad():
                n = y.numel()
                count += n
                totals += torch.stack([loss.detach().double() * n, (logits.argmax(1) == y).sum().double()])
                # the first non-finite step, tracked on the device without a sync
                first_bad = torch.where(~torch.isfinite(loss.detach()) & (first_bad < 0), self.step, first_bad)
                interval_loss += loss.detach().double()
            interval_steps += 1
            if interval_steps == cfg.log_every or i + 1 == last:
                row, diverged_at = self._end_interval(interval_loss, interval_steps, first_bad, lr)
                step_rows.append(row)
                interval_steps = 0
                if diverged_at is not None:
                    break
            self.progress.update(1)
        seconds = time.perf_counter() - start
        count_t = torch.full((1,), float(count), device=self.device, dtype=torch.float64)
        loss_sum, correct, count = dist.all_sum(torch.cat([totals, count_t])).tolist()
        return EpochStats(train_loss=loss_sum / max(count, 1), train_acc=correct / max(count, 1), seconds=seconds,
                          images=int(count), steps=self.step - first_step, step_rows=step_rows,
                          diverged_at=diverged_at)

    def _end_interval(self, interval_loss: torch.Tensor, interval_steps: int, first_bad: torch.Tensor,
                      lr: float) -> tuple[dict[str, Any], int | None]:
        """The steps.jsonl row of the interval that ends at this step, and the earliest step of the
        run whose loss was not finite on any rank (None: none yet).  One host sync for both,
        which also tells a diverged run early; ``interval_loss`` is reset for the next interval."""
        dist = self.dist
        loss_sum = dist.all_sum(interval_loss.reshape(1))
        earliest = dist.all_min(torch.where(first_bad < 0, NO_STEP, first_bad).reshape(1))
        loss_sum, earliest = torch.cat([loss_sum, earliest.double()]).tolist()
        mean = loss_sum / (interval_steps * dist.world_size)
        row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 6),
               "loss": mean if math.isfinite(mean) else None, "lr": lr, "steps": interval_steps}
        if self.tb is not None:
            self.tb.step_row(row)
        interval_loss.zero_()
        return row, None if int(earliest) == NO_STEP else int(earliest)

    def evaluate(self) -> dict[str, float]:
        """``eval_loss`` and ``eval_acc`` on the eval split, summed over every rank."""
        # The eager module: no gradient sync to do, and a compiled net would recompile for
        # eval mode and the eval batch shape.  Under DDP its buffers (BN running stats) are
        # rank 0's, broadcast at every training forward.
        result = evaluate_model(self.model, self.data, self.cfg.eval_batch_size, channels_last=self.channels_last,
                                precision=self.cfg.precision, dist=self.dist)
        return {"eval_loss": result.loss, "eval_acc": result.acc}


    # -- the records (rank 0 writes them) --

    @contextmanager
    def _session(self) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        """This session's records, opened: config.yaml written, the rows an earlier session wrote
        past the checkpoint dropped (their epoch is about to be redone) and, with
        ``--tensorboard``, the event writer opened.  Yields the metrics and steps rows kept
        (none on ranks other than 0).  The writer is flushed and closed however the session ends."""
        self.dist.barrier()  # every rank has checked the run directory before rank 0 writes into it
        metrics: list[dict[str, Any]] = []
        steps: list[dict[str, Any]] = []
        if self.dist.is_main:
            self.run_dir.write_config(self.cfg, self.layout)
            write_sources(self.run_dir.path, self.cfg)
            if self.data.classes:
                self.run_dir.write_classes(self.data.classes)
            metrics, steps = self.run_dir.keep_records_until(self.epoch, self.step)
            if self.cfg.tensorboard:
                # Points an earlier session wrote past the checkpoint are dropped by TensorBoard.
                self.tb = TensorBoardLog(self.run_dir.tb_dir, purge_step=self.step + 1)
                if self.tb.fresh:  # a resume turning --tensorboard on: the curves start with the records
                    self.tb.backfill(steps, metrics)
        try:
            yield metrics, steps
        finally:
            if self.tb is not None:
                self.tb.close()
                self.tb = None

    def _record_steps(self, rows: list[dict[str, Any]]) -> None:
        if self.dist.is_main:
            self.run_dir.append_steps(*rows)

    def _record_epoch(self, row: dict[str, Any]) -> None:
        """The checkpoint after an epoch and the epoch's metrics row (and TensorBoard points)."""
        rng_states = self.gather_rng_states()  # a collective: every rank takes part
        if self.dist.is_main:
            self.run_dir.save_checkpoint(self.state_dict(rng_states))
            self.run_dir.append_metrics(row)
            if self.tb is not None:
                self.tb.epoch_row(row)

    def _end(self, summary: dict[str, Any], metrics: list[dict[str, Any]], steps: list[dict[str, Any]]) -> Run:
        """Write the summary of a run that has ended and return its record."""
        if summary["status"] == "failed" and self.dist.world_size > 1:
            # The other ranks may be blocked in a collective this rank will never join, and
            # rank 0 may be one of them: the failing rank records the failure itself.
            summary["failed_rank"] = self.dist.rank
            self.run_dir.write_summary(summary)
            self.dist.abort()
            raise RunFailed(f"rank {self.dist.rank}: {summary['error']}")
        if self.dist.is_main:
            self.run_dir.write_summary(summary)
        if self.tb is not None and summary["status"] != "failed":
            self.tb.run_end(self.cfg, summary["status"], summary["final_eval_acc"], self.epoch)
        return Run(path=self.run_dir.path, config=self.cfg, summary=summary, metrics=metrics, steps=steps,
                   channels_last=self.channels_last)

    def _summary(self, status: str, rows: list[dict[str, Any]], wall_time_s: float) -> dict[str, Any]:
        """The run's record.  ``best_eval_acc`` exists only for a validation split: the best
        epoch on the test split is a choice made by looking at the test set."""
        data, device = self.data, self.device
        validation = data.eval_split == "val"
        return {
            "status": status,
            "epochs_completed": self.epoch,
            "epochs": self.cfg.epochs,
            "final_eval_acc": rows[-1]["eval_acc"] if rows else None,
            "best_eval_acc": max((r["eval_acc"] for r in rows), default=None) if validation else None,
            "best_epoch": (max(rows, key=lambda r: r["eval_acc"])["epoch"] if rows else None) if validation else None,
            "final_train_loss": rows[-1]["train_loss"] if rows else None,
            "eval_split": data.eval_split,
            "num_train": data.num_train,
            "num_eval": data.num_eval,
            "wall_time_s": wall_time_s,
            "train_images_per_s": self.train_images / self.train_seconds if self.train_seconds > 0 else None,
            "first_step_loss": self.first_step_loss,
            "num_params": self.num_params,
            "channels_last": self.channels_last,
            **self.layout,
            "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
            "versions": versions(),
        }


# --- evaluation ------------------------------------------------------------------------


def autocast_for(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device``; a no-op context for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


@dataclass(frozen=True)
class Evaluation:
    """Mean cross-entropy and accuracy over ``images`` images of one split."""

    loss: float
    acc: float
    images: int


@torch.no_grad()
def evaluate_model(model: nn.Module, data: Dataset, batch_size: int, *, channels_last: bool = False,
                   precision: str = "fp32", dist: Dist | None = None) -> Evaluation:
    """Evaluate ``model`` (put in eval mode) on ``data``'s eval split, in order and un-augmented.

    Returns the mean loss and the accuracy over the whole split: under DDP each
    rank takes its slice of every batch and the float64 sums are added over ranks.
    """
    dist = dist or Dist()
    device = data.device
    model.eval()
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, correct
    count = 0
    for x, y in data.eval_batches(batch_size, rank=dist.rank, world_size=dist.world_size,
                                  channels_last=channels_last):
        with autocast_for(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        count += y.numel()
        totals += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double()])
    count_t = torch.full((1,), float(count), device=device, dtype=torch.float64)
    loss_sum, correct, count = dist.all_sum(torch.cat([totals, count_t])).tolist()
    return Evaluation(loss=loss_sum / max(count, 1), acc=correct / max(count, 1), images=int(count))


# --- progress ------------------------------------------------------------------------


def shows_bars() -> bool:
    """True on a terminal and in a Jupyter notebook, where ``tqdm.auto`` draws a bar (a widget
    in the notebook); False where output goes to a file or a pipe."""
    if sys.stderr.isatty():
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class _Progress:
    """A tqdm bar on a terminal and in a notebook, a log line per epoch otherwise (or nothing)."""

    def __init__(self, mode: str, total_steps: int, enabled: bool):
        if mode == "auto":
            mode = "bar" if shows_bars() else "log"
        self.mode = mode if enabled else "none"
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}/{epochs}")

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def end_epoch(self, row: dict[str, Any], epochs: int) -> None:
        line = (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.4f}  "
                f"eval_loss {row['eval_loss']:.4f}  eval_acc {row['eval_acc']:.4f}  lr {row['lr']:.4g}  "
                f"{row['images_per_s']:.0f} img/s")
        if self.bar is not None:
            self.bar.write(line)
        elif self.mode == "log":
            log.info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- entry point -----------------------------------------------------------------------


@dataclass
class _Resume:
    """What ``--resume`` found in the run directory."""

    state: dict[str, Any] | None = None  # the checkpoint to continue from (None: start over in place)
    finished: dict[str, Any] | None = None  # the summary of a run that has nothing left to do


def _prepare_out(cfg: TrainConfig, run_dir: RunDir) -> _Resume:
    """Check the run directory; with ``--resume``, what to continue from.

    A resume may change only what :func:`reslab.config.resume_conflicts` allows
    (how the run executes, and ``epochs`` under a schedule that does not depend
    on it); anything else is refused, naming every field, because the run
    directory would then hold numbers of a run other than the one its
    config.yaml names.
    """
    out, checkpoint = run_dir.path, run_dir.file(CHECKPOINT_FILE)
    if not cfg.resume:
        if run_dir.holds_files():
            raise SpecError(f"--out {str(out)!r} already holds files; pass --resume to continue that run "
                            "or choose another --out")
        return _Resume()
    if not run_dir.has_checkpoint():
        if run_dir.is_run():
            return _Resume()  # started, but killed before its first checkpoint: start over in place
        raise SpecError(f"--resume: {str(out)!r} holds no run to resume (no {CHECKPOINT_FILE}); "
                        "drop --resume to start one")
    try:
        state = run_dir.read_checkpoint()
        saved = config_from_dict({k: v for k, v in state["config"].items() if k not in ("out", "resume")})
    except Exception as exc:  # a torn or foreign file
        reason = exc.reason if isinstance(exc, UnreadableRecord) else type(exc).__name__
        raise SpecError(f"--resume: checkpoint {str(checkpoint)!r} is corrupted or not a reslab checkpoint "
                        f"({reason})") from None
    changed = model_change(out)
    if changed is not None:
        raise SpecError(f"--resume: the run in {str(out)!r} cannot continue: {changed}; use another --out "
                        "to train the model as it is now")
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        allowed = ", ".join(f"--{n.replace('_', '-')}" for n in EXECUTION_FIELDS if n not in ("out", "resume"))
        epochs_note = "" if "epochs" not in conflicts else (
            f"; --epochs may change only under a schedule that does not depend on it (constant, step, "
            f"multistep at epoch numbers), not {saved.schedule!r}")
        raise SpecError(
            f"--resume: the run in {str(out)!r} was trained with other settings "
            f"({describe_differences(saved, cfg, conflicts)}); "
            f"a resume may change only {allowed}{epochs_note}; use another --out to train these settings"
        )
    epoch = int(state.get("epoch", 0))
    if cfg.epochs < epoch:
        raise SpecError(f"--resume: --epochs {cfg.epochs} is below the {epoch} epochs the run in {str(out)!r} "
                        f"has already trained; pass --epochs {epoch} or more")
    summary = run_dir.read_summary()
    if summary is not None and (summary.get("status") == "diverged"
                                or (summary.get("status") == "completed" and cfg.epochs == epoch)):
        return _Resume(finished=summary)  # nothing left to do: its record stays exactly as it is
    return _Resume(state=state)


def _check_writable(out: Path) -> None:
    """The run directory can be created (or written into), or a one-line SpecError before any work."""
    problem = unwritable_reason(out)
    if problem is not None:
        raise SpecError(f"--out {str(out)!r} is not writable: {problem}")


def train(config: TrainConfig | dict[str, Any], dist: Dist | None = None, *, progress: str | None = None,
          quiet: bool = False) -> Run:
    """Run ``config`` to the end and return its record (a :class:`reslab.rundir.Run`: ``status``,
    ``summary``, ``metrics``, ``steps``, ``out``); bad input raises SpecError before anything is written.

    ``progress`` overrides how this call shows its progress (``cfg.progress``'s choices)
    without changing the config the run records: a sweep shows one bar for all its runs.
    By default (``auto``) a bar shows on a terminal and in a notebook; ``quiet=True``
    shows nothing (``progress="none"``).

    Under torchrun, a rank whose run breaks records the failure, aborts the process group
    and raises :class:`RunFailed` (:meth:`Trainer.fit`), so its exit ends the job at once
    instead of leaving the other ranks blocked in a collective until the timeout.
    """
    cfg = config if isinstance(config, TrainConfig) else config_from_dict(config)
    if progress is not None and progress not in PROGRESS:
        raise choices_error("progress", progress, PROGRESS)
    if quiet:
        progress = "none"
    dist = dist or Dist.from_env()
    check_config(cfg)
    check_world_size(cfg, dist)
    device = dist.device_for(resolve_device(cfg.device))
    with dist.process_group(device):
        return _train(cfg, dist, device, progress or cfg.progress)


def _train(cfg: TrainConfig, dist: Dist, device: torch.device, progress: str) -> Run:
    """Check the run directory (and find what to resume from), build the Trainer, and fit it."""
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    if cfg.out is None:
        cfg = config_from_dict({"out": str(out)}, cfg)
    run_dir = RunDir(out)
    resume = _prepare_out(cfg, run_dir)
    if resume.finished is not None:
        log.info("%s: the run has finished (%s); nothing to do", out, resume.finished.get("status"))
        return Run(path=out, config=cfg, summary=resume.finished, metrics=run_dir.read_metrics(),
                   steps=run_dir.read_steps(), channels_last=bool(resume.finished.get("channels_last")))
    _check_writable(out)
    trainer = Trainer(cfg, out, device, dist)  # loads data, builds the model: may still raise SpecError
    if resume.state is not None:
        try:
            trainer.load_state_dict(resume.state)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise SpecError(f"--resume: checkpoint in {str(out)!r} does not fit this config "
                            f"({type(exc).__name__})") from None
    return trainer.fit(progress)


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
