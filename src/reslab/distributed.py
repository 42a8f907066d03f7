"""Where this process stands in a torchrun job, and the job's process group.

Run plainly, a process is rank 0 of 1 and nothing here does any work.  Under
``torchrun`` each process reads its rank from the environment
(:meth:`Dist.from_env`), takes one GPU of its node (:meth:`Dist.device_for`),
joins the process group for the run (:meth:`Dist.process_group`: nccl on GPUs,
gloo on CPUs) and sums its numbers with the other ranks'.  A rank whose run
breaks tears the group down at once (:meth:`Dist.abort`) instead of leaving the
other ranks blocked in a collective until the timeout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .config import TrainConfig
from .errors import SpecError


@dataclass
class Dist:
    """Where this process stands in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    aborted: bool = field(default=False, repr=False, compare=False)  # the group was torn down by abort()

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

    def device_for(self, device: torch.device) -> torch.device:
        """The device this process runs on: under torchrun on GPUs its own one (``cuda:LOCAL_RANK``),
        made the current device; ``device`` itself otherwise."""
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", self.local_rank)  # one GPU per process
            torch.cuda.set_device(device)
        return device

    def init(self, device: torch.device) -> bool:
        """Join the process group (nccl on GPUs, gloo on CPUs); True if this call created it."""
        if self.world_size <= 1 or torch.distributed.is_initialized():
            return False
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                             device_id=device if device.type == "cuda" else None)
        return True

    @contextmanager
    def process_group(self, device: torch.device) -> Iterator[None]:
        """Be in the job's process group for the block: join it unless this process is in one
        already, and destroy the group made here on the way out (one torn down by
        :meth:`abort` is gone already)."""
        created = self.init(device)
        try:
            yield
        finally:
            if created and not self.aborted:
                torch.distributed.destroy_process_group()

    def abort(self) -> None:
        """Tear the process group down without waiting for peers (they may be stuck in a collective)."""
        self.aborted = True
        try:
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        except Exception:  # noqa: BLE001 - an older torch, or a group already gone: exiting is enough
            pass

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
