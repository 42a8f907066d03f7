#!/usr/bin/env python
"""GPU check: reslab's CUDA paths, one PASS/FAIL line each, then resnet18-cifar throughput.

Run on a machine with a CUDA device, from the repository root::

    python benchmarks/gpu_check.py

Items (each its own function; each catches its own exception and prints
``FAIL <item>: <one-line reason>``):

* **bf16 autocast** - ``reslab.train`` with ``precision=bf16`` on synthetic data
  completes with finite losses.
* **fp16 autocast + GradScaler** - the same with ``precision=fp16``; the
  checkpoint holds the grad scaler's state with a finite, positive scale.
* **channels_last** - a ``Trainer`` with ``channels_last=on`` keeps its conv
  weights (and their gradients, and the conv inputs) in NHWC through training,
  and its per-step losses, weights and eval loss match an NCHW trainer's.
* **no per-step host sync** - a few bf16 training steps of ``Trainer`` run
  under ``torch.cuda.set_sync_debug_mode("error")``: the loop reads the device
  back once per ``log_every`` interval, so steps inside an interval must not
  synchronize; also checks that autocast computes the convolutions in bf16.
* **data on the device** - ``load_dataset(..., device="cuda")`` gives the
  batches the CPU dataset gives.
* **seeded init on the device** - ``init_weights(..., seed=)`` on a CUDA model
  is reproducible and leaves the caller's CPU and CUDA generators alone.
* **NCCL DDP** - ``torchrun`` with 2 processes, ``--sync-bn``; SKIP with one GPU.

Then throughput: resnet18 with the cifar stem on synthetic 3x32x32 images,
reslab's training path (bf16 autocast, channels_last) against the seed notes'
pipeline (a plain PyTorch loop: PIL + torchvision transforms per sample,
``DataLoader``, fp32 NCHW), timed in the same run as benchmarks/train_throughput.py
times: a warm-up epoch each, then interleaved rounds of one epoch, each window
closed by a device synchronize; img/s is total images over total time.

Exit status: 0 when every item passes or skips, 1 when one fails, 2 without a
CUDA device (one line, nothing run).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SPEC32 = "synthetic:train={n},test=256,size=32,channels=3,classes=10,crop=4,flip=true"
BATCH = 128


class Skip(Exception):
    """An item that does not apply on this machine (printed as SKIP with the reason)."""


# --- shared pieces ------------------------------------------------------------------------------


def run_config(out: Path, **overrides) -> dict:
    """A short resnet18-cifar run on synthetic CIFAR-shaped images on cuda (fields of reslab.train's config)."""
    config = {"model": "resnet18", "stem": "cifar", "dataset": SPEC32.format(n=1024), "epochs": 2,
              "batch_size": BATCH, "lr": 0.05, "device": "cuda", "progress": "none", "log_every": 2,
              "out": str(out)}
    return {**config, **overrides}


def make_trainer(out: Path, **overrides):
    """A ``reslab.training.Trainer`` for :func:`run_config` (nothing is written to ``out``)."""
    from reslab.config import config_from_dict
    from reslab.training import Trainer, check_config, resolve_device

    cfg = config_from_dict(run_config(out, **overrides))
    check_config(cfg)
    return Trainer(cfg, out, resolve_device(cfg.device))


def finite_run(out: Path) -> tuple[dict, list[float]]:
    """The summary and per-interval losses of a finished run; raises unless it completed with finite losses."""
    from reslab.rundir import read_steps, read_summary

    summary = read_summary(out) or {}
    if summary.get("status") != "completed":
        raise AssertionError(f"run ended {summary.get('status')!r}: {summary.get('error', 'no error recorded')}")
    losses = [row["loss"] for row in read_steps(out)]
    numbers = [summary.get("first_step_loss"), summary.get("final_train_loss"), *losses]
    if not losses or not all(isinstance(v, float) and math.isfinite(v) for v in numbers):
        raise AssertionError(f"non-finite or missing losses: first {numbers[0]}, final {numbers[1]}, steps {losses}")
    return summary, losses


def conv_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(f"{name}.weight", m.weight) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def where(exc: BaseException) -> str:
    """The innermost reslab frame of ``exc``'s traceback, as ``file:line `code```, or ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}reslab{os.sep}" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {Path(f.filename).name}:{f.lineno} `{(f.line or '').strip()}`"


# --- the items ----------------------------------------------------------------------------------


def check_bf16(tmp: Path) -> str:
    import reslab

    out = tmp / "bf16"
    reslab.train(run_config(out, precision="bf16"))
    summary, losses = finite_run(out)
    return f"{len(losses)} logged losses, first step {summary['first_step_loss']:.3f}, last {losses[-1]:.3f}"


def check_fp16_scaler(tmp: Path) -> str:
    import reslab
    from reslab.rundir import read_checkpoint

    out = tmp / "fp16"
    reslab.train(run_config(out, precision="fp16"))
    _, losses = finite_run(out)
    scaler = read_checkpoint(out).get("scaler") or {}
    scale = scaler.get("scale")
    if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
        raise AssertionError(f"checkpoint's scaler state has no finite positive scale: {scaler!r}")
    return f"{len(losses)} logged losses, last {losses[-1]:.3f}; checkpoint scaler scale {scale:g}"


def check_channels_last(tmp: Path) -> str:
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare layouts in true fp32, not TF32 rounding
    try:
        common = {"dataset": SPEC32.format(n=512), "log_every": 1, "lr": 0.01}
        nhwc = make_trainer(tmp / "nhwc", channels_last="on", **common)
        nchw = make_trainer(tmp / "nchw", channels_last="off", **common)
        first_conv = next(m for m in nhwc.model.modules() if isinstance(m, nn.Conv2d))
        seen = []
        hook = first_conv.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        a, b = nhwc.train_epoch(), nchw.train_epoch()
        hook.remove()
        not_nhwc = [n for n, w in conv_weights(nhwc.model)
                    if not (w.is_contiguous(memory_format=torch.channels_last)
                            and w.grad is not None and w.grad.is_contiguous(memory_format=torch.channels_last))]
        if not nhwc.channels_last or not_nhwc or not seen or not all(seen):
            raise AssertionError(f"not channels_last in training: weights/grads {not_nhwc[:3]}, inputs {seen[:3]}")
        # Training: the same seed gives the same weights and batches, so the losses agree to rounding.
        # (Gradients at init are ill-conditioned - BatchNorm's backward cancels - so weights are not compared.)
        la, lb = (torch.tensor([row["loss"] for row in stats.step_rows]) for stats in (a, b))
        ea, eb = nhwc.evaluate(), nchw.evaluate()
        if not torch.allclose(la, lb, rtol=1e-3, atol=1e-4) or not math.isclose(ea["eval_loss"], eb["eval_loss"],
                                                                               rel_tol=1e-3):
            raise AssertionError(f"per-step losses NHWC {la.tolist()} vs NCHW {lb.tolist()}, "
                                 f"eval loss {ea['eval_loss']:.5f} vs {eb['eval_loss']:.5f}")
        # Inference: the NHWC model's weights in an NCHW copy give the same logits.
        nchw.model.load_state_dict(nhwc.model.state_dict())
        x, _ = next(nhwc.data.eval_batches(256))
        with torch.no_grad():
            za = nhwc.model.eval()(x.contiguous(memory_format=torch.channels_last))
            zb = nchw.model.eval()(x)
        gap = ((za - zb).abs().max() / zb.abs().max().clamp_min(1e-6)).item()
        if gap > 1e-3:
            raise AssertionError(f"same weights, NHWC vs NCHW logits differ by {gap:.2e} of their largest value")
        return (f"{len(la)} steps: losses within {(la - lb).abs().max().item():.1e}, eval loss {ea['eval_loss']:.4f} "
                f"vs {eb['eval_loss']:.4f}; same-weight logits within {gap:.1e} relative")
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


class SyncWatch:
    """Stands in for ``Trainer.progress``, whose ``update(1)`` the loop calls after every step: turns
    ``torch.cuda.set_sync_debug_mode("error")`` on after the first step and off after ``watched`` more."""

    def __init__(self, watched: int):
        self.watched, self.done = watched, 0

    def update(self, n: int) -> None:
        self.done += n
        if self.done == 1:
            torch.cuda.set_sync_debug_mode("error")
        elif self.done == 1 + self.watched:
            torch.cuda.set_sync_debug_mode("default")


def check_no_step_sync(tmp: Path, watched: int = 5) -> str:
    trainer = make_trainer(tmp / "sync", precision="bf16", channels_last="on", log_every=1000,
                           dataset=SPEC32.format(n=BATCH * (watched + 4)))
    dtypes = set()
    first_conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
    hook = first_conv.register_forward_hook(lambda m, args, output: dtypes.add(output.dtype))
    trainer.train_epoch(max_steps=3)  # warm-up: cuDNN autotuning, and step 1 reads the initial loss back (once)
    # A fresh pass: its start (the epoch's draws) and its last step (the interval's record, which
    # ends every pass) may sync; the steps in between, inside one log_every interval, must not.
    saved, trainer.progress = trainer.progress, SyncWatch(watched)
    try:
        trainer.train_epoch(max_steps=watched + 2)
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):  # torch: "called a synchronizing CUDA operation"
            raise
        first_line = str(exc).strip().splitlines()[0]
        raise AssertionError(f"host sync inside a logging interval{where(exc)}: {first_line}") from None
    finally:
        torch.cuda.set_sync_debug_mode("default")
        trainer.progress, watch = saved, trainer.progress
        hook.remove()
    if watch.done != watched + 2:
        raise AssertionError(f"the loop reported {watch.done} of {watched + 2} steps to Trainer.progress: "
                             "the watch did not cover the steps")
    if dtypes != {torch.bfloat16}:
        raise AssertionError(f"autocast bf16: the first conv computed in {sorted(map(str, dtypes))}")
    return f"{watched} bf16 steps (log_every 1000) under set_sync_debug_mode('error'); convs in bfloat16"


def check_data_on_device() -> str:
    from reslab.datasets import load_dataset

    spec = "synthetic:train=300,test=40,size=8,crop=2,flip=true"
    cpu, gpu = load_dataset(spec), load_dataset(spec, device="cuda")
    tensors = (gpu.train_images, gpu.train_labels, gpu.eval_images, gpu.eval_labels)
    if not all(t.is_cuda for t in tensors):
        raise AssertionError(f"splits not on the device: {[str(t.device) for t in tensors]}")
    stats = [*zip(gpu.mean, cpu.mean, strict=True), *zip(gpu.std, cpu.std, strict=True)]
    if not all(math.isclose(g, c, rel_tol=1e-6) for g, c in stats):
        raise AssertionError(f"channel statistics differ: mean {gpu.mean} vs {cpu.mean}, std {gpu.std} vs {cpu.std}")
    pairs = [*zip(cpu.train_batches(64, epoch=1, seed=2), gpu.train_batches(64, epoch=1, seed=2), strict=True),
             *zip(cpu.eval_batches(16), gpu.eval_batches(16), strict=True)]
    for i, ((xc, yc), (xg, yg)) in enumerate(pairs):
        if not (xg.is_cuda and torch.equal(yg.cpu(), yc) and torch.allclose(xg.cpu(), xc, atol=1e-5)):
            raise AssertionError(f"batch {i} differs from the CPU dataset's (max |dx| "
                                 f"{(xg.cpu() - xc).abs().max().item():.2e}, labels equal {torch.equal(yg.cpu(), yc)})")
    return f"{len(pairs)} train and eval batches equal the CPU dataset's (crop + flip on the device)"


def check_init_on_device() -> str:
    from reslab import build_model, init_weights

    a, b = (build_model("cifar_resnet20", num_classes=10).cuda() for _ in range(2))
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    init_weights(a, "kaiming_normal", seed=5)
    init_weights(b, "kaiming_normal", seed=5)
    if not torch.equal(torch.get_rng_state(), cpu_state) or not torch.equal(torch.cuda.get_rng_state(), cuda_state):
        raise AssertionError("init_weights(seed=5) moved the caller's CPU or CUDA generator")
    differ = [n for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True)
              if not torch.equal(p, q)]
    if differ:
        raise AssertionError(f"two seeded inits differ in {len(differ)} tensors, e.g. {differ[0]}")
    if not all(p.is_cuda for p in a.parameters()):
        raise AssertionError("init_weights moved parameters off the device")
    return "kaiming_normal seed=5 twice: equal tensors, generators untouched"


def check_ddp_nccl(tmp: Path) -> str:
    if torch.cuda.device_count() < 2:
        raise Skip(f"NCCL DDP needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    from reslab.rundir import read_summary

    out = tmp / "ddp"
    args = ["--model", "resnet18", "--stem", "cifar", "--dataset", SPEC32.format(n=1024), "--epochs", "1",
            "--batch-size", str(BATCH), "--device", "cuda", "--sync-bn",
            "--progress", "none", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "reslab", "train", *args], capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise AssertionError(f"torchrun exited {done.returncode}: {lines[-1] if lines else 'no output'}")
    summary = read_summary(out) or {}
    if summary.get("world_size") != 2 or summary.get("per_device_batch") != BATCH // 2:
        raise AssertionError(f"summary says world size {summary.get('world_size')}, "
                             f"per-device batch {summary.get('per_device_batch')}")
    _, losses = finite_run(out)
    return f"torchrun 2 processes, nccl, --sync-bn: completed, last logged loss {losses[-1]:.3f}"


# --- throughput ---------------------------------------------------------------------------------


class SeedImages(torch.utils.data.Dataset):
    """HWC uint8 images and int labels, a PIL image per sample: torchvision.datasets.CIFAR10's ``__getitem__``."""

    def __init__(self, images_hwc, labels: list[int], transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


class SeedPipeline:
    """The seed notes' CIFAR-10 loop: PIL + torchvision transforms per sample, a shuffling DataLoader,
    fp32 NCHW, ``zero_grad / forward / loss / backward / step`` with ``loss.item()`` every step."""

    def __init__(self, images_hwc, labels, mean, std, workers: int, device: torch.device):
        import torchvision.transforms as T

        from reslab import build_model

        transform = T.Compose([T.Pad(4), T.RandomHorizontalFlip(), T.RandomCrop(32), T.ToTensor(),
                               T.Normalize(mean, std)])
        self.loader = torch.utils.data.DataLoader(SeedImages(images_hwc, labels, transform), batch_size=BATCH,
                                                  shuffle=True, num_workers=workers)
        self.model = build_model("resnet18", stem="cifar", num_classes=10).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.device = device

    def epoch(self) -> int:
        self.model.train()
        seen = 0
        for images, labels in self.loader:
            images, labels = images.to(self.device), labels.to(self.device)
            loss = F.cross_entropy(self.model(images), labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss.item()  # the tutorial's running loss
            seen += labels.numel()
        return seen


def measure_throughput(tmp: Path, images: int, rounds: int, workers: int) -> str:
    reslab_side = make_trainer(tmp / "speed", precision="bf16", channels_last="on", log_every=10,
                               dataset=SPEC32.format(n=images), lr=0.05)
    data, device = reslab_side.data, reslab_side.device
    seed = SeedPipeline(data.train_images.permute(0, 2, 3, 1).contiguous().cpu().numpy(),
                        data.train_labels.cpu().tolist(), data.mean, data.std, workers, device)

    def reslab_epoch() -> int:
        stats = reslab_side.train_epoch()
        if stats.diverged_at is not None:
            raise AssertionError(f"reslab run diverged at step {stats.diverged_at}")
        reslab_side.epoch += 1  # the next window is a new epoch (new shuffle), as in a real run
        return stats.images

    totals = {"reslab": [0.0, 0], "seed": [0.0, 0]}
    sides = {"reslab": reslab_epoch, "seed": seed.epoch}
    for r in range(rounds + 1):  # round 0 warms up (cuDNN autotuning, allocator, DataLoader)
        for name, epoch in sides.items():
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            seen = epoch()
            torch.cuda.synchronize(device)
            if r:
                totals[name][0] += time.perf_counter() - start
                totals[name][1] += seen
    rates = {name: seen / seconds for name, (seconds, seen) in totals.items()}
    print(f"  reslab  bf16 autocast, channels_last, data on the device   {rates['reslab']:>10,.0f} img/s")
    print(f"  seed    fp32 NCHW, PIL transforms, DataLoader workers={workers}  {rates['seed']:>10,.0f} img/s")
    ratio = rates["reslab"] / rates["seed"]
    print(f"  reslab/seed: {ratio:.2f}x")
    return f"{ratio:.2f}x the seed pipeline ({rates['reslab']:,.0f} vs {rates['seed']:,.0f} img/s)"


# --- main ---------------------------------------------------------------------------------------


def run_item(name: str, check, *args) -> str:
    """Run one item; print its PASS/SKIP/FAIL line; return the outcome."""
    start = time.perf_counter()
    try:
        detail, outcome = check(*args), "PASS"
    except Skip as exc:
        detail, outcome = str(exc), "SKIP"
    except Exception as exc:  # noqa: BLE001 - every item reports its own failure in one line
        text = " ".join(str(exc).split()) or "(no message)"
        detail, outcome = f"{type(exc).__name__}: {text[:400]}", "FAIL"
    print(f"{outcome}  {name:<30} {time.perf_counter() - start:5.1f} s  {detail}", flush=True)
    return outcome


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=25_600, help="synthetic train images per throughput epoch")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per side, interleaved, after a warm-up one")
    p.add_argument("--workers", type=int, default=0, help="the seed pipeline's DataLoader workers (the seed: 0)")
    args = p.parse_args(argv)
    if args.images < BATCH or args.rounds < 1 or args.workers < 0:
        p.error(f"--images must be at least {BATCH}, --rounds at least 1 and --workers at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: needs a CUDA device, and torch {torch.__version__} sees none "
              f"(torch.cuda.is_available() is False); run it on a GPU machine")
        return 2
    import reslab

    print(f"reslab {reslab.__version__} GPU check on {torch.cuda.get_device_name(0)} "
          f"({torch.cuda.device_count()} device(s)), torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reslab-gpu-check-") as folder:
        tmp = Path(folder)
        outcomes = [
            run_item("bf16 autocast training", check_bf16, tmp),
            run_item("fp16 autocast + GradScaler", check_fp16_scaler, tmp),
            run_item("channels_last", check_channels_last, tmp),
            run_item("no per-step host sync", check_no_step_sync, tmp),
            run_item("data on the device", check_data_on_device),
            run_item("seeded init on the device", check_init_on_device),
            run_item("NCCL DDP (2 processes)", check_ddp_nccl, tmp),
        ]
        print(f"\nthroughput: resnet18 (cifar stem), batch {BATCH}, {args.images:,} synthetic 3x32x32 images per "
              f"epoch, {args.rounds} timed epochs per side after a warm-up one; cuDNN autotuning (process-wide) "
              f"on for both, fp32 convolutions with cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}", flush=True)
        outcomes.append(run_item("throughput", measure_throughput, tmp, args.images, args.rounds, args.workers))
    counts = {k: outcomes.count(k) for k in ("PASS", "SKIP", "FAIL")}
    print(f"\n{counts['PASS']} passed, {counts['SKIP']} skipped, {counts['FAIL']} failed "
          f"in {time.perf_counter() - started:.0f} s")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
