"""The device-resident dataset: splits held once on the training device as uint8 tensors.

A :class:`Dataset` (made by :func:`reslab.datasets.load_dataset`) keeps its
train and eval splits each *once* on the device as one uint8 tensor
``(N, C, H, W)``.  Batches are gathered, augmented (random crop with zero
padding, horizontal flip) and normalized there, in a handful of batched tensor
ops per step - no DataLoader workers, no per-sample PIL, no per-sample Python.
The idea is airbench's (Keller Jordan, https://github.com/KellerJordan/cifar10-airbench,
``airbench94.py``: the CIFAR-10 loader keeps the whole set on the GPU and
crops/flips it batch-wise), which removes the input pipeline from the profile of
small-image training.

Batching contract (see :meth:`Dataset.train_batches`): the order and the
augmentation of an epoch depend only on ``(seed, epoch)`` through a private
``torch.Generator`` - never on global RNG state - so a run resumed at epoch k
sees exactly the batches an uninterrupted run would.  Randomness is drawn on
the CPU and moved to the device, so it is also identical on CPU and GPU.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .errors import SpecError

# --- the Dataset --------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation, applied batch-wise on the device."""

    crop_padding: int = 0  # random crop of the original size from the image zero-padded by this many pixels; 0 = off
    flip: bool = False  # random horizontal flip with probability 1/2 (wrong for digits: a flipped 2 is not a 2)

    def describe(self) -> str:
        parts = ([f"crop{self.crop_padding}"] if self.crop_padding else []) + (["flip"] if self.flip else [])
        return "+".join(parts) or "none"


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous; compare fields explicitly
class Dataset:
    """A dataset resident on one device: uint8 images, int64 labels, and how to batch them."""

    name: str  # registry name, e.g. "cifar10"
    spec: str  # the full spec string it was loaded from, for run records
    train_images: torch.Tensor  # (N, C, H, W) uint8 on the device
    train_labels: torch.Tensor  # (N,) int64 on the device
    eval_images: torch.Tensor  # (M, C, H, W) uint8: the test split, or the held-out val split
    eval_labels: torch.Tensor  # (M,) int64
    eval_split: str  # "test" or "val": what eval_* holds, so reports never call test accuracy validation
    num_classes: int
    in_channels: int
    image_size: int  # H (= W for every registered dataset)
    mean: tuple[float, ...]  # per channel, [0, 1] pixel units
    std: tuple[float, ...]  # per channel, [0, 1] pixel units
    augment: Augment = field(default_factory=Augment)
    classes: tuple[str, ...] | None = None  # the name of every label, when the data has them (folder names ...)

    # -- sizes --

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])

    @property
    def num_eval(self) -> int:
        return int(self.eval_labels.shape[0])

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    def steps_per_epoch(self, batch_size: int, drop_last: bool = False) -> int:
        """Number of (global) batches :meth:`train_batches` yields per epoch."""
        _check_batch_size(batch_size)
        return self.num_train // batch_size if drop_last else math.ceil(self.num_train / batch_size)

    def describe(self) -> str:
        """One line: sizes, shape, classes, augmentation, device."""
        return (
            f"{self.spec}: {self.num_train:,} train / {self.num_eval:,} {self.eval_split}, "
            f"{self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes, "
            f"augment {self.augment.describe()}, on {self.device}"
        )

    def to(self, device: str | torch.device) -> Dataset:
        """The same dataset with its four tensors on ``device``."""
        return replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            eval_images=self.eval_images.to(device),
            eval_labels=self.eval_labels.to(device),
        )

    # -- batching --

    def train_batches(
        self,
        batch_size: int,
        *,
        epoch: int,
        seed: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield one epoch of shuffled, augmented, normalized ``(x, y)`` batches.

        ``x`` is ``(b, C, H, W)`` in ``dtype``, ``y`` is ``(b,)`` int64, both on
        the dataset's device.  The permutation, crop offsets and flip coins
        come from a ``torch.Generator`` seeded by ``(seed, epoch)`` alone.

        ``batch_size`` is the *global* batch.  Under data parallelism every
        rank iterates the same global batches ``perm[b*B:(b+1)*B]`` and takes
        the ``rank``-th of ``world_size`` contiguous slices of each (size
        ``B / world_size``; ``torch.tensor_split`` sizes for a short last
        batch), so the union over ranks is exactly the single-process batch,
        augmentation included, and every rank takes the same number of steps.
        Use ``drop_last=True`` under DDP to keep every step full-sized.
        """
        _check_batch_size(batch_size)
        _check_rank(batch_size, rank, world_size)
        n = self.num_train
        gen = torch.Generator().manual_seed(derive_seed("train", seed, epoch))
        # Fixed draw order, always all four, so toggling one augmentation
        # leaves the shuffle (and the other augmentation) unchanged.
        pad = self.augment.crop_padding
        perm = torch.randperm(n, generator=gen)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        device = self.device
        perm, dy, dx, flip = (t.to(device) for t in (perm, dy, dx, flip))
        scale, shift = self._norm_affine(device)
        for start in range(0, self.steps_per_epoch(batch_size, drop_last) * batch_size, batch_size):
            positions = _rank_slice(torch.arange(start, min(start + batch_size, n), device=device), rank, world_size)
            idx = perm[positions]
            x = self.train_images[idx]  # (b, C, H, W) uint8
            if pad:
                x = random_crop(x, dy[positions], dx[positions], pad)
            if self.augment.flip:
                x = random_flip(x, flip[positions])
            yield self._finish(x, scale, shift, dtype, channels_last), self.train_labels[idx]

    def eval_batches(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the eval split in order, normalized, without augmentation.

        Sharded like :meth:`train_batches` (rank r takes the r-th slice of each
        batch), so summing per-rank correct counts gives the full-set accuracy.
        """
        _check_batch_size(batch_size)
        _check_rank(batch_size, rank, world_size)
        scale, shift = self._norm_affine(self.device)
        for start in range(0, self.num_eval, batch_size):
            idx = _rank_slice(torch.arange(start, min(start + batch_size, self.num_eval), device=self.device),
                              rank, world_size)
            yield (self._finish(self.eval_images[idx], scale, shift, dtype, channels_last),
                   self.eval_labels[idx])

    def normalize(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> ``(x / 255 - mean) / std`` in ``dtype``."""
        scale, shift = self._norm_affine(x.device)
        return self._finish(x, scale, shift, dtype, False)

    def _norm_affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # (x/255 - mean)/std == x * scale + shift, folded once per epoch; (1, C, 1, 1) each.
        mean = torch.tensor(self.mean, dtype=torch.float64)
        std = torch.tensor(self.std, dtype=torch.float64)
        scale = (1.0 / (255.0 * std)).float().view(1, -1, 1, 1).to(device)
        shift = (-mean / std).float().view(1, -1, 1, 1).to(device)
        return scale, shift

    @staticmethod
    def _finish(x, scale, shift, dtype, channels_last) -> torch.Tensor:
        # Normalize in fp32 and cast after, so bf16/fp16 batches lose no more than one rounding.
        x = torch.addcmul(shift, x.float(), scale).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def random_crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample crops of ``x`` zero-padded by ``pad``: sample i is ``padded[i, :, dy[i]:dy[i]+H, dx[i]:dx[i]+W]``.

    ``x`` is ``(B, C, H, W)``; ``dy``, ``dx`` are ``(B,)`` offsets in ``[0, 2*pad]``.
    Two ``gather``s (rows, then columns) do all samples at once.
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zeros outside
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    xp = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))  # (B, C, H, W+2p)
    return xp.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


def random_flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the samples of ``x`` ``(B, C, H, W)`` where ``mask`` ``(B,)`` is true."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError(f"batch size must be a positive integer, got {batch_size!r}")


def _check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise SpecError(f"rank {rank} is not valid for world size {world_size}")
    if batch_size % world_size:
        raise SpecError(f"global batch size {batch_size} is not divisible by world size {world_size}")


def _rank_slice(positions: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    return positions if world_size == 1 else torch.tensor_split(positions, world_size)[rank]


def derive_seed(stream: str, *parts: int) -> int:
    """A 63-bit seed from a stream name and integers; distinct inputs give unrelated seeds."""
    digest = hashlib.blake2b(":".join([stream, *map(str, parts)]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


__all__ = ["Augment", "Dataset", "derive_seed", "random_crop", "random_flip"]
