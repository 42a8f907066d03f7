#!/usr/bin/env python
"""Epoch time on a ``folder:PATH`` dataset against the same images as a built-in dataset.

Writes the images of the ``digits`` dataset as PNGs into a temporary ImageFolder
tree - ``train/<label>/`` and ``test/<label>/`` from ``load_dataset("digits")``'s
own splits, so both datasets hold the same 1,438 / 359 images of 1x8x8 - and
loads the tree once, filling the cache (the first-load time: decoding every
PNG).  Then, in one process, it times

* the cached load of each dataset (``load_dataset``, medians of ``--loads``),
* epochs of the same training config (``--model``, batch ``--batch-size``, on
  the CPU) through ``reslab.training.Trainer.train_epoch``, the loop ``reslab
  train`` runs, on ``--dataset digits`` and on ``--dataset folder:TMP``; each
  Trainer loads its dataset itself (the folder from the cache, its mean/std
  recomputed from the train split).  After one warm-up epoch each, the two
  take turns for ``--rounds`` rounds,

and prints the median seconds per epoch of each - wall time, and the CPU time
of this process, which another load on the machine disturbs less - and their
ratio folder/digits.
Once loaded, a folder dataset is the same device-resident uint8 tensor as any
other, so the ratio should be 1 within noise (the requirement: at most 1.1).

The caches go to a temporary ``$RESLAB_CACHE``, removed at the end with the tree.
Run ``python benchmarks/folder_epoch.py --help``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_tree(root: Path, splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Every image of ``splits`` (name -> (uint8 (N, 1, H, W), labels)) as ``root/<name>/<label>/<i>.png``."""
    from PIL import Image

    count = 0
    for split, (images, labels) in splits.items():
        for i, (img, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy()).save(folder / f"{i:05d}.png")
            count += 1
    return count


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def same_images(a, b) -> bool:
    """Whether two datasets hold the same (image, label) pairs in each split, in any order."""
    def rows(images: torch.Tensor, labels: torch.Tensor) -> list[tuple]:
        return sorted(zip(labels.tolist(), map(bytes, images.flatten(1).numpy()), strict=True))

    return (rows(a.train_images, a.train_labels) == rows(b.train_images, b.train_labels)
            and rows(a.eval_images, a.eval_labels) == rows(b.eval_images, b.eval_labels))


def trainer(spec: str, args, out: Path):
    from reslab.config import TrainConfig
    from reslab.training import Trainer, check_config, resolve_device

    cfg = TrainConfig(model=args.model, dataset=spec, batch_size=args.batch_size, optimizer="sgd", lr=0.05,
                      momentum=0.9, schedule="constant", epochs=1000, seed=0, device="cpu", progress="none",
                      out=str(out))
    check_config(cfg)
    return Trainer(cfg, out, resolve_device(cfg.device))


def epoch_seconds(t) -> tuple[float, float]:
    """Wall and CPU seconds (this process, every thread) of one training epoch."""
    cpu = time.process_time()
    stats = t.train_epoch()
    cpu = time.process_time() - cpu
    t.epoch += 1  # the next pass is a new epoch: a new shuffle
    return stats.seconds, cpu


def report(seconds: dict[str, list[float]], what: str) -> None:
    for name, values in seconds.items():
        print(f"  {name:6s}  median {statistics.median(values):.4f} s/epoch {what}  "
              f"(min {min(values):.4f}, max {max(values):.4f})")
    ratio = statistics.median(seconds["folder"]) / statistics.median(seconds["digits"])
    pairs = np.array(seconds["folder"]) / np.array(seconds["digits"])
    print(f"  ratio folder/digits, {what}: {ratio:.3f}x (per round: {', '.join(f'{r:.2f}' for r in pairs)}); "
          f"requirement <= 1.1x: {'met' if ratio <= 1.1 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cifar_resnet20", help="model name (default cifar_resnet20)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7, help="timed epochs of each dataset, taken in turns")
    parser.add_argument("--loads", type=int, default=5, help="cached loads of each dataset to time")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="reslab-folder-epoch-") as tmp:
        tmp_path = Path(tmp)
        os.environ["RESLAB_CACHE"] = str(tmp_path / "cache")
        from reslab.datasets import load_dataset

        digits = load_dataset("digits")
        root = tmp_path / "digits-png"
        n = write_tree(root, {"train": (digits.train_images, digits.train_labels),
                              "test": (digits.eval_images, digits.eval_labels)})
        spec = f"folder:{root}"
        first, folder = timed(lambda: load_dataset(spec))
        print(f"wrote {n:,} PNGs to {root}; first load of {spec} (decode + cache): {first:.3f} s")
        print(f"same images and labels as digits: {same_images(digits, folder)}; "
              f"mean {folder.mean[0]:.6f} vs {digits.mean[0]:.6f}")
        for name, s in (("digits", "digits"), ("folder", spec)):
            loads = [timed(lambda s=s: load_dataset(s))[0] for _ in range(args.loads)]
            print(f"cached load, {name}: median {statistics.median(loads) * 1e3:.1f} ms "
                  f"(min {min(loads) * 1e3:.1f}, max {max(loads) * 1e3:.1f}) over {args.loads}")

        trainers = {"digits": trainer("digits", args, tmp_path / "run-digits"),
                    "folder": trainer(spec, args, tmp_path / "run-folder")}
        for t in trainers.values():  # warm-up: first-touch allocations, oneDNN kernel choices
            epoch_seconds(t)
        wall: dict[str, list[float]] = {name: [] for name in trainers}
        cpu: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name, t in trainers.items():
                w, c = epoch_seconds(t)
                wall[name].append(w)
                cpu[name].append(c)
        print(f"\n{args.model}, batch {args.batch_size}, cpu ({torch.get_num_threads()} threads), "
              f"{args.rounds} rounds after a warm-up epoch each:")
        report(wall, "wall")
        report(cpu, "CPU")  # what this process computed: steadier than wall time on a busy machine


if __name__ == "__main__":
    main()
