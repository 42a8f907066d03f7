"""Training: ``train(config)`` runs one config into one run directory.

A run directory holds (names and readers: :mod:`reslab.rundir`)

- ``config.yaml``   the resolved config (what produced the numbers),
- ``metrics.jsonl`` one JSON object per epoch,
- ``checkpoint.pt`` written atomically after every epoch: model, optimizer,
  scheduler, grad scaler, epoch and RNG state, config - plain tensors,
  numbers and strings only, so ``torch.load(weights_only=True)`` reads it,
- ``summary.json``  written when the run ends (completed, diverged or failed),
- ``tb/``           TensorBoard event files, with ``tensorboard=True`` (:mod:`reslab.tblog`).

``load_run(dir)`` reads a run back with its model as training built it, and
``evaluate_run(dir)`` measures that model on a split the way training did.

``resume=True`` continues from the checkpoint up to ``config.epochs`` and gives
exactly the metrics and weights of an uninterrupted run on the CPU: the data
order and augmentation of each epoch come from ``(seed, epoch)`` alone and the
global RNG state (dropout) is restored from the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import EXECUTION_FIELDS, PROGRESS, TrainConfig, config_from_dict, describe_differences, resume_conflicts
from .data import Dataset
from .datasets import load_dataset
from .diagnose import count_params
from .errors import SpecError, choices_error
from .fileio import unwritable_reason, append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text, read_jsonl, rewrite_jsonl
from .inits import init_weights, needs_batch, parse_policy
from .models import build_model
from .norms import norm_factory
from .optim import make_optimizer, make_scheduler, parse_schedule
from .rundir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_STATE,
    STEPS_FILE,
    SUMMARY_FILE,
    UnreadableRecord,
    read_checkpoint,
    read_summary,
)
from .tblog import TB_DIR, TensorBoardLog, check_available

log = logging.getLogger(__name__)

NO_STEP = 2**62  # "no non-finite loss yet" in the cross-rank MIN
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RunFailed(RuntimeError):
    """The run started but could not finish (not bad input)."""


@dataclass
class RunResult:
    out: Path
    status: str  # completed | diverged | failed
    summary: dict[str, Any]


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
            raise SpecError(
                f"--device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
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
    norm_factory(cfg.norm)
    parse_policy(cfg.init)
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
            model_for(cfg, datasets[key])


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


def first_batch(cfg: TrainConfig, data: Dataset) -> torch.Tensor:
    """The run's first training batch (all of it, whatever the world size), on the CPU."""
    x, _ = next(iter(data.train_batches(cfg.batch_size, epoch=0, seed=cfg.seed)))
    return x.cpu()  # (B, C, H, W) normalized and augmented, exactly as step 1 sees it


def model_for(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The model of ``cfg`` sized for ``data``, built (with the residual branch its init needs), not initialized."""
    return build_model(
        cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, norm=cfg.norm,
        input_size=data.image_size, conv=cfg.conv, **cfg.model_options(),
    )


def build_for(cfg: TrainConfig, data: Dataset, *, initialize: bool = True) -> nn.Module:
    """The model of ``cfg`` sized for ``data`` and initialized by ``cfg.init`` (on the CPU, NCHW).
    A data-dependent init (``lsuv``) sees the run's first training batch.  ``initialize=False``
    only builds it (:func:`model_for`), for weights loaded afterwards."""
    model = model_for(cfg, data)
    if not initialize:
        return model
    batch = first_batch(cfg, data) if needs_batch(cfg.init) else None
    report = init_weights(model, cfg.init, seed=cfg.seed, batch=batch)
    variances = [row.output_var for row in report if row.output_var is not None]
    if variances:
        log.info("init %s: output variance of %d layers on the first batch in [%.3f, %.3f]",
                 cfg.init, len(variances), min(variances), max(variances))
    return model


def versions() -> dict[str, str]:
    import torchvision

    from . import __version__

    return {"reslab": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


# --- distributed context (single process unless launched by torchrun) ---------------


@dataclass
class Dist:
    """Where this process stands in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise SpecError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> bool:
        """Join the process group (nccl on GPUs, gloo on CPUs); True if this call created it."""
        if self.world_size <= 1 or torch.distributed.is_initialized():
            return False
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                             device_id=device if device.type == "cuda" else None)
        return True

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in a new tensor (``values`` may be a view of something still in use)."""
        return self._reduce(values, torch.distributed.ReduceOp.SUM)

    def all_min(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, torch.distributed.ReduceOp.MIN)

    def _reduce(self, values: torch.Tensor, op) -> torch.Tensor:
        values = values.clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(values, op=op)
        return values


# --- the loop ----------------------------------------------------------------------


class Trainer:
    """One run: built from a validated config, driven epoch by epoch."""

    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device, dist: Dist | None = None):
        self.cfg, self.out, self.device = cfg, out, device
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
        # Called with each steps.jsonl row as soon as its interval is measured (TensorBoard).
        self.on_step_row: Callable[[dict[str, Any]], None] | None = None

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

    # -- epochs --

    def autocast(self):
        return autocast_for(self.device, self.cfg.precision)

    def train_epoch(self, progress) -> dict[str, Any]:
        cfg, dist = self.cfg, self.dist
        self.net.train()
        # Sums live on the device; one sync per epoch (plus the periodic finite check).
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss*n, correct
        count = 0  # images seen: known on the host, so no tensor crosses to the device per step
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        # The per-step record: the loss summed on the device over each interval of
        # cfg.log_every steps, read back (with the non-finite check) once per interval.
        interval_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        interval_steps = 0
        step_rows: list[dict[str, Any]] = []
        diverged_at = None
        start = time.perf_counter()
        batches = self.data.train_batches(
            cfg.batch_size, epoch=self.epoch, seed=cfg.seed, drop_last=dist.world_size > 1,
            rank=dist.rank, world_size=dist.world_size, channels_last=self.channels_last,
        )
        for i, (x, y) in enumerate(batches):  # x: (B, C, H, W) normalized, y: (B,)
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
            if interval_steps == cfg.log_every or i + 1 == self.steps_per_epoch:
                # One host sync per interval: the interval's mean loss over ranks, and the
                # earliest non-finite step (often enough to stop a diverged run early).
                loss_sum = dist.all_sum(interval_loss.reshape(1))
                earliest = dist.all_min(torch.where(first_bad < 0, NO_STEP, first_bad).reshape(1))
                loss_sum, earliest = torch.cat([loss_sum, earliest.double()]).tolist()
                mean = loss_sum / (interval_steps * dist.world_size)
                step_rows.append({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 6),
                                  "loss": mean if math.isfinite(mean) else None, "lr": lr,
                                  "steps": interval_steps})
                if self.on_step_row is not None:
                    self.on_step_row(step_rows[-1])
                interval_loss.zero_()
                interval_steps = 0
                if int(earliest) != NO_STEP:
                    diverged_at = int(earliest)
                    break
            progress.update(1)
        seconds = time.perf_counter() - start
        count_t = torch.full((1,), float(count), device=self.device, dtype=torch.float64)
        loss_sum, correct, count = dist.all_sum(torch.cat([totals, count_t])).tolist()
        return {
            "train_loss": loss_sum / max(count, 1),
            "train_acc": correct / max(count, 1),
            "epoch_time_s": seconds,
            "images_per_s": count / seconds if seconds > 0 else 0.0,
            "diverged_at_step": diverged_at,
            "steps": step_rows,
        }

    def evaluate(self) -> dict[str, float]:
        """``eval_loss`` and ``eval_acc`` on the eval split, summed over every rank."""
        # The eager module: no gradient sync to do, and a compiled net would recompile for
        # eval mode and the eval batch shape.  Under DDP its buffers (BN running stats) are
        # rank 0's, broadcast at every training forward.
        result = evaluate_model(self.model, self.data, self.cfg.eval_batch_size, channels_last=self.channels_last,
                                precision=self.cfg.precision, dist=self.dist)
        return {"eval_loss": result.loss, "eval_acc": result.acc}


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


class _Progress:
    """A tqdm bar on a terminal, a log line per epoch otherwise (or nothing)."""

    def __init__(self, mode: str, total_steps: int, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
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


def _prepare_out(cfg: TrainConfig, out: Path) -> _Resume:
    """Check the run directory; with ``--resume``, what to continue from.

    A resume may change only what :func:`reslab.config.resume_conflicts` allows
    (how the run executes, and ``epochs`` under a schedule that does not depend
    on it); anything else is refused, naming every field, because the run
    directory would then hold numbers of a run other than the one its
    config.yaml names.
    """
    checkpoint = out / CHECKPOINT_FILE
    if not cfg.resume:
        if out.exists() and any(out.iterdir()):
            raise SpecError(f"--out {str(out)!r} already holds files; pass --resume to continue that run or choose another --out")
        return _Resume()
    if not checkpoint.is_file():
        if (out / CONFIG_FILE).is_file():
            return _Resume()  # started, but killed before its first checkpoint: start over in place
        raise SpecError(f"--resume: {str(out)!r} holds no run to resume (no {CHECKPOINT_FILE}); drop --resume to start one")
    try:
        state = read_checkpoint(out)
        saved = config_from_dict({k: v for k, v in state["config"].items() if k not in ("out", "resume")})
    except Exception as exc:  # a torn or foreign file
        reason = exc.reason if isinstance(exc, UnreadableRecord) else type(exc).__name__
        raise SpecError(f"--resume: checkpoint {str(checkpoint)!r} is corrupted or not a reslab checkpoint ({reason})") from None
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        allowed = ", ".join(f"--{n.replace('_', '-')}" for n in EXECUTION_FIELDS if n not in ("out", "resume"))
        epochs_note = "" if "epochs" not in conflicts else (
            f"; --epochs may change only under a schedule that does not depend on it (constant, step, "
            f"multistep at epoch numbers), not {saved.schedule!r}")
        raise SpecError(
            f"--resume: the run in {str(out)!r} was trained with other settings ({describe_differences(saved, cfg, conflicts)}); "
            f"a resume may change only {allowed}{epochs_note}; use another --out to train these settings"
        )
    epoch = int(state.get("epoch", 0))
    if cfg.epochs < epoch:
        raise SpecError(f"--resume: --epochs {cfg.epochs} is below the {epoch} epochs the run in {str(out)!r} "
                        f"has already trained; pass --epochs {epoch} or more")
    summary = read_summary(out)
    if summary is not None and (summary.get("status") == "diverged"
                                or (summary.get("status") == "completed" and cfg.epochs == epoch)):
        return _Resume(finished=summary)  # nothing left to do: its record stays exactly as it is
    return _Resume(state=state)


def _check_writable(out: Path) -> None:
    """The run directory can be created (or written into), or a one-line SpecError before any work."""
    problem = unwritable_reason(out)
    if problem is not None:
        raise SpecError(f"--out {str(out)!r} is not writable: {problem}")


def check_world_size(cfg: TrainConfig, dist: Dist) -> None:
    """Both batch sizes split evenly over the ranks, or the run is refused before any work."""
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(cfg, name)
        if value % dist.world_size:
            fits = value + dist.world_size - value % dist.world_size
            raise SpecError(
                f"--{name.replace('_', '-')} {value} is a global batch and must divide evenly over the "
                f"{dist.world_size} processes of this torchrun job; e.g. --{name.replace('_', '-')} {fits}"
            )


def _abort_group() -> None:
    """Tear the process group down without waiting for peers (they may be stuck in a collective)."""
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except Exception:  # noqa: BLE001 - an older torch, or a group already gone: exiting is enough
        pass


def train(config: TrainConfig | dict[str, Any], dist: Dist | None = None, *, progress: str | None = None) -> RunResult:
    """Run ``config`` to the end; bad input raises SpecError before anything is written.

    ``progress`` overrides how this call shows its progress (``cfg.progress``'s choices)
    without changing the config the run records: a sweep shows one bar for all its runs.

    Under torchrun, a rank whose run breaks records the failure, aborts the process
    group and raises :class:`RunFailed`, so its exit ends the job at once instead
    of leaving the other ranks blocked in a collective until the timeout.
    """
    cfg = config if isinstance(config, TrainConfig) else config_from_dict(config)
    if progress is not None and progress not in PROGRESS:
        raise choices_error("progress", progress, PROGRESS)
    dist = dist or Dist.from_env()
    check_config(cfg)
    check_world_size(cfg, dist)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    created_group = dist.init(device)
    try:
        return _train(cfg, dist, device, progress or cfg.progress)
    except RunFailed:
        created_group = False  # aborted already
        raise
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist: Dist, device: torch.device, progress_mode: str) -> RunResult:
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    if cfg.out is None:
        cfg = config_from_dict({"out": str(out)}, cfg)
    resume = _prepare_out(cfg, out)
    if resume.finished is not None:
        log.info("%s: the run has finished (%s); nothing to do", out, resume.finished.get("status"))
        return RunResult(out=out, status=str(resume.finished.get("status")), summary=resume.finished)
    _check_writable(out)
    trainer = Trainer(cfg, out, device, dist)  # loads data, builds the model: may still raise SpecError
    if resume.state is not None:
        try:
            trainer.load_state_dict(resume.state)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise SpecError(f"--resume: checkpoint in {str(out)!r} does not fit this config ({type(exc).__name__})") from None

    record = {"world_size": dist.world_size, "per_device_batch": cfg.batch_size // dist.world_size}
    dist.barrier()  # every rank has checked the run directory before rank 0 writes into it
    tb: TensorBoardLog | None = None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG_FILE, cfg.to_yaml() + "".join(f"# {k}: {v}\n" for k, v in record.items()))
        # Metrics past the checkpoint belong to an epoch that is about to be redone.
        rows = [r for r in read_jsonl(out / METRICS_FILE) if r.get("epoch", 0) <= trainer.epoch]
        rewrite_jsonl(out / METRICS_FILE, rows)
        step_rows = [r for r in read_jsonl(out / STEPS_FILE) if r.get("step", 0) <= trainer.step]
        rewrite_jsonl(out / STEPS_FILE, step_rows)
        if cfg.tensorboard:
            # Points an earlier session wrote past the checkpoint are dropped by TensorBoard.
            tb = TensorBoardLog(out / TB_DIR, purge_step=trainer.step + 1)
            if tb.fresh:  # a resume turning --tensorboard on: the curves start with the records
                tb.backfill(step_rows, rows)
            trainer.on_step_row = tb.step_row
    else:
        rows = []
    try:
        return _run_epochs(cfg, dist, device, trainer, out, rows, record, progress_mode, tb)
    finally:
        if tb is not None:
            tb.close()


def _run_epochs(cfg: TrainConfig, dist: Dist, device: torch.device, trainer: Trainer, out: Path,
                rows: list[dict[str, Any]], record: dict[str, Any], progress_mode: str,
                tb: TensorBoardLog | None) -> RunResult:
    """Train from ``trainer``'s state up to ``cfg.epochs`` and record how the run ended."""
    progress = _Progress(progress_mode, trainer.steps_per_epoch * (cfg.epochs - trainer.epoch), dist.is_main)
    status, diverged_at, error = "completed", None, None
    started = time.perf_counter()
    wall_before = trainer.wall_time_s  # earlier sessions of this run, up to its checkpoint
    try:
        while trainer.epoch < cfg.epochs:
            progress.start_epoch(trainer.epoch + 1, cfg.epochs)
            lr = trainer.optimizer.param_groups[0]["lr"]
            stats = trainer.train_epoch(progress)
            diverged_at = stats.pop("diverged_at_step")
            step_rows = stats.pop("steps")
            if dist.is_main and step_rows:
                append_jsonl(out / STEPS_FILE, *step_rows)
            if diverged_at is not None:
                status = "diverged"
                log.warning("loss is not finite at step %d (epoch %d): run diverged", diverged_at, trainer.epoch + 1)
                break
            trainer.epoch += 1
            row = {"epoch": trainer.epoch, **{k: stats[k] for k in ("train_loss", "train_acc")},
                   **trainer.evaluate(), "lr": lr, "epoch_time_s": stats["epoch_time_s"],
                   "images_per_s": stats["images_per_s"]}
            trainer.train_seconds += stats["epoch_time_s"]
            trainer.train_images += stats["images_per_s"] * stats["epoch_time_s"]
            trainer.wall_time_s = wall_before + time.perf_counter() - started
            rng_states = trainer.gather_rng_states()  # a collective: every rank takes part
            if dist.is_main:
                atomic_torch_save(out / CHECKPOINT_FILE, trainer.state_dict(rng_states))
                append_jsonl(out / METRICS_FILE, row)
                if tb is not None:
                    tb.epoch_row(row)
            rows.append(row)
            progress.end_epoch(row, cfg.epochs)
    except (SpecError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a run that breaks is recorded, not a traceback
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        log.error("run failed%s: %s", f" on rank {dist.rank}" if dist.world_size > 1 else "", error)
    finally:
        progress.close()
    summary = _summary(cfg, trainer, rows, status, wall_before + time.perf_counter() - started, record, device)
    if diverged_at is not None:
        summary["diverged_at_step"] = diverged_at
    if error is not None:
        summary["error"] = error
    if status == "failed" and dist.world_size > 1:
        # The other ranks may be blocked in a collective this rank will never join, and
        # rank 0 may be one of them: the failing rank records the failure itself.
        summary["failed_rank"] = dist.rank
        atomic_write_json(out / SUMMARY_FILE, summary)
        _abort_group()
        raise RunFailed(f"rank {dist.rank}: {error}")
    if dist.is_main:
        atomic_write_json(out / SUMMARY_FILE, summary)
    if tb is not None and status != "failed":
        tb.run_end(cfg, status, summary["final_eval_acc"], trainer.epoch)
    return RunResult(out=out, status=status, summary=summary)


def _summary(cfg: TrainConfig, trainer: Trainer, rows: list[dict[str, Any]], status: str, wall_time_s: float,
             record: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The run's record.  ``best_eval_acc`` exists only for a validation split: the best
    epoch on the test split is a choice made by looking at the test set."""
    validation = trainer.data.eval_split == "val"
    return {
        "status": status,
        "epochs_completed": trainer.epoch,
        "epochs": cfg.epochs,
        "final_eval_acc": rows[-1]["eval_acc"] if rows else None,
        "best_eval_acc": max((r["eval_acc"] for r in rows), default=None) if validation else None,
        "best_epoch": (max(rows, key=lambda r: r["eval_acc"])["epoch"] if rows else None) if validation else None,
        "final_train_loss": rows[-1]["train_loss"] if rows else None,
        "eval_split": trainer.data.eval_split,
        "num_train": trainer.data.num_train,
        "num_eval": trainer.data.num_eval,
        "wall_time_s": wall_time_s,
        "train_images_per_s": trainer.train_images / trainer.train_seconds if trainer.train_seconds > 0 else None,
        "first_step_loss": trainer.first_step_loss,
        "num_params": trainer.num_params,
        "channels_last": trainer.channels_last,
        **record,
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "versions": versions(),
    }


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
