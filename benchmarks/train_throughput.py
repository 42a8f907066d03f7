#!/usr/bin/env python
"""Training throughput: reslab's training path vs a tutorial-style PyTorch loop.

One process, one model, one batch size, the same synthetic CIFAR-shaped images
(uint8 3x32x32, 10 classes) on both sides:

* **reslab** - ``reslab.training.Trainer.train_epoch``, the loop ``reslab train``
  runs: device-resident uint8 images, batched random crop (pad 4) + flip and
  normalization on the device, SGD with momentum, the per-step LR scheduler and
  the periodic non-finite-loss check.  ``--precision`` and ``--channels-last``
  apply here.
* **baseline** - what the PyTorch CIFAR tutorials write: the images as an HWC
  uint8 array behind a ``torch.utils.data.Dataset`` whose ``__getitem__`` makes
  a PIL image and applies ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean, std)``; a
  ``DataLoader(shuffle=True, num_workers=W)``; the same model (same builder,
  norm and init) in NCHW fp32; ``SGD(momentum=0.9)``; the classic
  ``zero_grad / forward / cross_entropy / backward / step`` with
  ``loss.item()`` every step.

Every timed window starts at an epoch boundary, runs ``--steps`` optimizer
steps (default: one epoch) and is closed by a device synchronize, so per-epoch
costs (reslab's shuffle and augmentation draws, the DataLoader's worker start)
are paid as in real training.  Each configuration is warmed up first, then the
configurations take turns for ``--rounds`` rounds; img/s is the total images
over the total time of its windows.

FLOP efficiency: training FLOPs per image are counted once with
``torch.utils.flop_counter.FlopCounterMode`` over a forward + backward pass on
one batch (convolutions and matmuls; norms, activations and the optimizer are
not counted), times the measured img/s, against a square matmul's FLOP/s
measured in the same run on the same device in the dtype that side computes in.

Run ``python benchmarks/train_throughput.py --help``; benchmarks/README.md says
how to read the output.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --- small helpers ----------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_name()}, {os.cpu_count()} logical cores)"


def images_in(steps: int, num_images: int, batch_size: int) -> int:
    """Images seen in ``steps`` steps from an epoch start (the last batch of an epoch may be short)."""
    per_epoch = math.ceil(num_images / batch_size)
    full, rest = divmod(steps, per_epoch)
    return full * num_images + min(rest * batch_size, num_images)


def fmt_rate(flops_per_s: float, unit: float, unit_name: str) -> str:
    return f"{flops_per_s / unit:.3g} {unit_name}"


# --- the two sides ----------------------------------------------------------------------


@dataclass
class Row:
    side: str  # reslab | baseline
    label: str
    dtype: str  # compute dtype, for the matmul reference
    seconds: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)

    def add(self, seconds: float, images: int) -> None:
        self.seconds.append(seconds)
        self.images.append(images)

    @property
    def img_per_s(self) -> float:
        return sum(self.images) / sum(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        rates = [i / s for i, s in zip(self.images, self.seconds, strict=True)]
        return min(rates), max(rates)


class ReslabSide:
    """reslab's real training path: a Trainer, driven through ``train_epoch``."""

    def __init__(self, args, precision: str, channels_last: str, out: Path):
        from reslab.config import TrainConfig
        from reslab.training import Trainer, check_config, resolve_device

        self.cfg = TrainConfig(
            model=args.model, norm=args.norm, init=args.init, stem=args.stem,
            dataset=dataset_spec(args.images), batch_size=args.batch_size, optimizer="sgd", lr=args.lr,
            momentum=0.9, weight_decay=args.weight_decay, schedule="constant", epochs=1000, seed=args.seed,
            device=str(args.device), precision=precision, channels_last=channels_last, progress="none",
            out=str(out),
        )
        check_config(self.cfg)
        self.device = resolve_device(self.cfg.device)
        self.trainer = Trainer(self.cfg, out, self.device)
        layout = "channels_last" if self.trainer.channels_last else "NCHW"
        what = f"defaults ({layout})" if channels_last == "auto" else layout
        self.row = Row("reslab", f"reslab {precision} {what}", precision)

    def run(self, steps: int) -> tuple[float, int]:
        """``steps`` optimizer steps from the start of a fresh epoch; returns (seconds, images)."""
        t = self.trainer
        left = steps
        sync(self.device)
        start = time.perf_counter()
        while left > 0:  # a window longer than an epoch goes on into the next one
            stats = t.train_epoch(max_steps=left)
            if stats.diverged_at is not None:
                raise RuntimeError(f"reslab run diverged at step {stats.diverged_at}")
            left -= stats.steps
            t.epoch += 1  # the next pass, in this window or the next, starts a new epoch (new shuffle)
        sync(self.device)
        seconds = time.perf_counter() - start
        return seconds, images_in(steps, t.data.num_train, self.cfg.batch_size)


class TutorialDataset(torch.utils.data.Dataset):
    """CIFAR10-style: HWC uint8 array + int labels; PIL image per sample (torchvision's CIFAR10.__getitem__)."""

    def __init__(self, images_hwc: np.ndarray, labels: list[int], transform):
        self.data, self.targets, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.data[index])
        return self.transform(img), self.targets[index]


class BaselineSide:
    """The tutorial loop: PIL + torchvision transforms per sample, DataLoader, NCHW fp32, loss.item() per step."""

    def __init__(self, args, device: torch.device, images_hwc: np.ndarray, labels: list[int],
                 mean: tuple[float, ...], std: tuple[float, ...], workers: int):
        import torchvision.transforms as T

        from reslab.build import build, init_model
        from reslab.config import TrainConfig

        self.device = device
        transform = T.Compose([
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])
        self.dataset = TutorialDataset(images_hwc, labels, transform)
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=args.batch_size, shuffle=True,
                                                  num_workers=workers)
        # The same builder, options and init as the reslab side (fixup's residual branch included).
        cfg = TrainConfig(model=args.model, norm=args.norm, init=args.init, stem=args.stem, seed=args.seed)
        model = build(cfg, num_classes=10, in_channels=3, input_size=32)
        init_model(model, cfg)
        self.model = model.to(device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9,
                                         weight_decay=args.weight_decay)
        self.batch_size = args.batch_size
        self.row = Row("baseline", f"baseline fp32 NCHW, workers={workers}", "fp32")
        self.losses: list[float] = []

    def run(self, steps: int) -> tuple[float, int]:
        model, criterion, optimizer, device = self.model, self.criterion, self.optimizer, self.device
        model.train()
        done = seen = 0
        sync(device)
        start = time.perf_counter()
        while done < steps:
            batches = iter(self.loader)  # a new epoch: new shuffle, workers (re)started as in a tutorial
            for inputs, targets in batches:
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad()
                outputs = model(inputs)
                loss = criterion(outputs, targets)
                loss.backward()
                optimizer.step()
                self.losses.append(loss.item())
                done += 1
                seen += targets.size(0)
                if done == steps:
                    break
        sync(device)
        seconds = time.perf_counter() - start
        del batches  # shut the workers of an unfinished epoch down outside the timer
        return seconds, seen


def dataset_spec(images: int) -> str:
    return f"synthetic:train={images},test=256,size=32,channels=3,classes=10,crop=4,flip=true"


# --- FLOPs ----------------------------------------------------------------------------------


def train_flops_per_image(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor) -> float:
    """FLOPs of one forward + backward (conv/matmul only, FlopCounterMode) per image, on a copy of ``model``."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).train()
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(probe(batch), labels).backward()
    return counter.get_total_flops() / batch.shape[0]


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.5, chunks: int = 5) -> float:
    """Peak FLOP/s of an ``n x n`` by ``n x n`` matmul: the best of ``chunks`` synchronized bursts over ~``seconds``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    sync(device)
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    sync(device)
    one = max(time.perf_counter() - start, 1e-6)
    reps = max(2, min(500, int(seconds / chunks / one)))
    best = 0.0
    for _ in range(chunks):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        sync(device)
        best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - start))
    return best


def cudnn_tf32() -> bool:
    """Whether fp32 convolutions may use TF32 in cuDNN (PyTorch's default: yes)."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is not None and conv != "none":
        return conv == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def matmul_references(device: torch.device, dtypes: set[str], n: int) -> dict[str, dict]:
    """Matmul FLOP/s per compute dtype; on CUDA fp32 follows cuDNN's TF32 setting, as the convolutions do."""
    refs = {}
    for name in sorted(dtypes):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        note = ""
        previous = torch.get_float32_matmul_precision()
        if device.type == "cuda" and name == "fp32" and cudnn_tf32():
            torch.set_float32_matmul_precision("high")  # TF32, what cuDNN uses for the fp32 convs
            note = " (TF32, as cuDNN's fp32 convolutions)"
        try:
            refs[name] = {"flops_per_s": matmul_flops(device, dtype, n), "n": n, "note": note.strip(" ()")}
        finally:
            torch.set_float32_matmul_precision(previous)
        refs[name]["label"] = f"{n}x{n} {name} matmul{note}"
    return refs


# --- data pipelines alone (optional) ---------------------------------------------------------


def pipeline_only(reslab: ReslabSide, baseline: BaselineSide, steps: int) -> dict[str, float]:
    """img/s of producing the batches alone (no model): reslab's train_batches vs the DataLoader."""
    data, cfg, device = reslab.trainer.data, reslab.cfg, reslab.device
    sync(device)
    start = time.perf_counter()
    seen = 0
    for epoch in range(10**6):
        for i, (_, y) in enumerate(data.train_batches(cfg.batch_size, epoch=10**5 + epoch, seed=cfg.seed,
                                                      channels_last=reslab.trainer.channels_last)):
            seen += y.numel()
            if epoch * reslab.trainer.steps_per_epoch + i + 1 == steps:
                break
        else:
            continue
        break
    sync(device)
    reslab_rate = seen / (time.perf_counter() - start)
    start = time.perf_counter()
    seen = done = 0
    while done < steps:
        for x, y in baseline.loader:
            x, y = x.to(device), y.to(device)
            seen += y.numel()
            done += 1
            if done == steps:
                break
    sync(device)
    return {"reslab": reslab_rate, "baseline": seen / (time.perf_counter() - start)}


# --- profile (optional) -------------------------------------------------------------------------

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
               "aten::_local_scalar_dense", "aten::item")


def profile_side(side, steps: int, device: torch.device, rows: int = 15) -> str:
    """torch.profiler over ``steps`` steps of one side: the top ops and the host-device sync points."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds, images = side.run(steps)
    averages = prof.key_averages()
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        sort = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    counts = {e.key: e.count for e in averages if e.key in SYNC_EVENTS}
    lines = [f"profile of {side.row.label}: {steps} steps, {images / seconds:,.0f} img/s under the profiler",
             "  per step: " + (", ".join(f"{k} x{v / steps:.2f}" for k, v in sorted(counts.items()))
                               or "no sync events"),
             averages.table(sort_by=sort, row_limit=rows)]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--model", default=None,
                   help="reslab model name (default: cifar_resnet20 on the CPU, resnet18 with --stem cifar on CUDA)")
    p.add_argument("--stem", default=None, choices=("imagenet", "cifar"), help="ResNet stem (default: the model's)")
    p.add_argument("--norm", default="bn", help="norm spec for both sides")
    p.add_argument("--init", default="default", help="init scheme for both sides")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=None,
                   help="synthetic train images = one epoch (default: 4096 on the CPU, 50000 on CUDA)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per timed window, from an epoch start (default: one epoch)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="untimed steps per configuration before the first window (default: 4 on the CPU, 50 on CUDA)")
    p.add_argument("--rounds", type=int, default=3, help="timed windows per configuration, interleaved")
    p.add_argument("--precision", default="fp32",
                   help="reslab side: fp32, bf16 or fp16 (the last two CUDA only); a comma list gives one row each")
    p.add_argument("--channels-last", nargs="?", const="on", default="both", choices=("auto", "on", "off", "both"),
                   help="reslab side: NHWC memory format, as `reslab train --channels-last` (`both`: one row with "
                        "reslab's defaults, auto, and one with NCHW; the first row, the defaults, is the one the "
                        "speedup line compares)")
    p.add_argument("--workers", default="0",
                   help="baseline DataLoader num_workers; a comma list gives one baseline row each")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="side of the reference matmul (default: 2048 on the CPU, 8192 on CUDA)")
    p.add_argument("--pipeline-only", action="store_true",
                   help="also time producing the batches alone (no model) on both sides")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True before building either side (reslab's Trainer "
                        "turns it on for CUDA anyway, and it is process-wide, so both sides get it either way)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many steps of the first reslab and first baseline row")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON here")
    args = p.parse_args(argv)

    from reslab.training import resolve_device

    args.device = resolve_device(args.device)
    cuda = args.device.type == "cuda"
    if args.model is None:
        args.model = "resnet18" if cuda else "cifar_resnet20"
        if cuda and args.stem is None:
            args.stem = "cifar"
    args.images = args.images or (50000 if cuda else 4096)
    if args.warmup_steps is None:
        args.warmup_steps = 50 if cuda else 4
    args.precisions = [s.strip() for s in args.precision.split(",") if s.strip()]
    args.layouts = {"auto": ["auto"], "on": ["on"], "off": ["off"], "both": ["auto", "off"]}[args.channels_last]
    args.worker_list = [int(w) for w in str(args.workers).split(",") if w.strip()]
    args.matmul_size = args.matmul_size or (8192 if cuda else 2048)
    steps_per_epoch = math.ceil(args.images / args.batch_size)
    args.steps = args.steps or steps_per_epoch
    if args.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    for name in ("batch_size", "images", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    return args


class CpuContention:
    """How much CPU other processes (and the hypervisor, as steal time) took while we timed: Linux only.

    Every number here assumes the machine is ours; on a 2-core box a concurrent
    test run can slow both sides several-fold (and not equally).
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        import resource

        try:
            values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = values
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return (user + nice + system + irq + softirq) / tick, steal / tick, own, time.perf_counter()

    def report(self) -> tuple[float, str]:
        end = self._sample()
        if self.start is None or end is None:
            return 0.0, ""
        busy, steal, own, wall = (b - a for a, b in zip(self.start, end, strict=True))
        capacity = wall * (os.cpu_count() or 1)
        others = max(busy - own, 0.0) + steal
        share = others / capacity if capacity > 0 else 0.0
        text = f"other processes and steal took {100 * share:.1f}% of the {os.cpu_count()} cores while timing"
        if share > 0.1:
            text = "WARNING: " + text + ": the numbers above are unreliable, rerun on a quiet machine"
        return share, text


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    cuda = device.type == "cuda"

    tmp = tempfile.TemporaryDirectory(prefix="reslab-bench-")
    reslab_sides = [ReslabSide(args, prec, cl, Path(tmp.name) / f"r{i}")
                    for i, (prec, cl) in enumerate((p, c) for p in args.precisions for c in args.layouts)]
    data = reslab_sides[0].trainer.data
    images_hwc = data.train_images.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (N, H, W, C) uint8
    labels = data.train_labels.cpu().tolist()
    baseline_sides = [BaselineSide(args, device, images_hwc, labels, data.mean, data.std, w) for w in args.worker_list]
    sides = [*reslab_sides, *baseline_sides]

    print("reslab training throughput: reslab's training path vs a tutorial-style loop")
    print(f"  device    {device_name(device)}")
    import torchvision

    from reslab import __version__

    print(f"  versions  torch {torch.__version__}, torchvision {torchvision.__version__}, reslab {__version__}, "
          f"python {platform.python_version()}")
    print(f"  threads   torch {torch.get_num_threads()} intra-op; baseline DataLoader workers {args.workers}"
          + ("; cudnn.benchmark on" if args.cudnn_benchmark else ""))
    stem = f", stem {args.stem}" if args.stem else ""
    print(f"  model     {args.model}{stem}, norm {args.norm}, init {args.init}; "
          f"{reslab_sides[0].trainer.num_params:,} params")
    print(f"  data      {args.images} synthetic uint8 3x32x32 images, 10 classes, crop 4 + flip; "
          f"batch {args.batch_size}")
    print(f"  timing    {args.warmup_steps} warm-up steps each, then {args.rounds} interleaved rounds of "
          f"{args.steps} steps ({images_in(args.steps, args.images, args.batch_size)} images) per configuration")
    sys.stdout.flush()

    # FLOPs per trained image: counted once on the baseline's model (same architecture on both sides).
    x, y = next(iter(torch.utils.data.DataLoader(baseline_sides[0].dataset, batch_size=args.batch_size)))
    flops_per_image = train_flops_per_image(baseline_sides[0].model, x.to(device), y.to(device))
    refs = matmul_references(device, {s.row.dtype for s in sides}, args.matmul_size)
    unit, unit_name = (1e12, "TFLOP/s") if cuda else (1e9, "GFLOP/s")
    print(f"  FLOPs     {flops_per_image / 1e9:.3f} GFLOP per trained image (forward + backward, conv/matmul)")
    for ref in refs.values():
        print(f"  matmul    {ref['label']}: {fmt_rate(ref['flops_per_s'], unit, unit_name)}")
    print()
    sys.stdout.flush()
    contention = CpuContention()

    for side in sides:
        if args.warmup_steps:
            side.run(args.warmup_steps)
    for r in range(args.rounds):
        for side in sides:
            side.row.add(*side.run(args.steps))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{side.row.label} {side.row.images[-1] / side.row.seconds[-1]:,.0f}" for side in sides) + " img/s")
        sys.stdout.flush()
    print()

    base = baseline_sides[0].row.img_per_s
    header = ("configuration", "img/s", "min-max", "ms/step", unit_name, "% matmul", "vs baseline")
    table = []
    for side in sides:
        r = side.row
        lo, hi = r.spread
        achieved = flops_per_image * r.img_per_s
        ms = 1000 * sum(r.seconds) / (args.steps * len(r.seconds))
        table.append((r.label, f"{r.img_per_s:,.0f}", f"{lo:,.0f}-{hi:,.0f}", f"{ms:.1f}",
                      f"{achieved / unit:.3g}", f"{100 * achieved / refs[r.dtype]['flops_per_s']:.1f}% {r.dtype}",
                      f"{r.img_per_s / base:.2f}x"))
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    def line(cells):
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print(line(row))

    pipes = None
    if args.pipeline_only:
        pipes = pipeline_only(reslab_sides[0], baseline_sides[0], args.steps)
        print(f"\ndata pipeline alone (no model, {args.steps} steps): "
              f"reslab train_batches {pipes['reslab']:,.0f} img/s, "
              f"baseline DataLoader (workers={args.worker_list[0]}) {pipes['baseline']:,.0f} img/s")

    contention_share, contention_text = contention.report()
    if contention_text:
        print(f"\n{contention_text}")
    if args.profile:
        for side in (reslab_sides[0], baseline_sides[0]):
            print("\n" + profile_side(side, args.profile, device))

    speedup = reslab_sides[0].row.img_per_s / base
    print(f"\nreslab/baseline speedup: {speedup:.2f}x  ({reslab_sides[0].row.label} vs {baseline_sides[0].row.label})")

    if args.json:
        result = {
            "device": device_name(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "threads": torch.get_num_threads(), "model": args.model, "stem": args.stem, "norm": args.norm,
            "init": args.init, "batch_size": args.batch_size, "images": args.images, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "rounds": args.rounds,
            "train_flops_per_image": flops_per_image,
            "matmul": {k: {"flops_per_s": v["flops_per_s"], "n": v["n"], "label": v["label"]} for k, v in refs.items()},
            "rows": [{"side": s.row.side, "label": s.row.label, "dtype": s.row.dtype, "img_per_s": s.row.img_per_s,
                      "window_img_per_s": [i / t for i, t in zip(s.row.images, s.row.seconds, strict=True)],
                      "achieved_flops_per_s": flops_per_image * s.row.img_per_s,
                      "fraction_of_matmul": flops_per_image * s.row.img_per_s / refs[s.row.dtype]["flops_per_s"],
                      "vs_baseline": s.row.img_per_s / base} for s in sides],
            "pipeline_only_img_per_s": pipes,
            "speedup": speedup, "cpu_contention": contention_share,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # a bad option reslab rejects (e.g. bf16 on the CPU): one line, not a traceback
        from reslab.errors import SpecError

        if isinstance(exc, SpecError):
            sys.exit(f"train_throughput: {exc}")
        raise
