"""Data-parallel training helpers for ``torchrun --nproc-per-node N`` (DistributedDataParallel).

``torchrun`` starts ``N`` copies of the program with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and a
rendezvous address in the environment. :func:`init_distributed` reads them and opens the process
group (``gloo`` on CPU, ``nccl`` on CUDA, one GPU per local rank); without them it returns a
single-process :class:`DistributedInfo` and nothing changes. :class:`ShardedLoader` splits every batch
of an in-memory :class:`keepgym.envs.data.BatchLoader` between the ranks: all ranks draw the same shuffled
(and augmented) global batch from identically seeded generators and each keeps its contiguous
slice, so ``N`` ranks with global batch ``B`` follow the same batch sequence as one process with
batch ``B`` (DDP's gradient averaging then equals the global-batch mean for equal shards).
:func:`all_reduce_sum`, :func:`broadcast_buffers` and :func:`main_first` are the few collectives a
training loop needs; only rank 0 writes files (:func:`is_main_process`).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from keepgym.envs.data import BatchLoader

__all__ = [
    "DistributedInfo",
    "ShardedLoader",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "cleanup_distributed",
    "init_distributed",
    "is_main_process",
    "main_first",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 writes outputs).
        world_size: number of processes (1 = not distributed).
        local_rank: rank on this machine (selects the GPU).
        device: the device this rank computes on.
        backend: ``"gloo"``, ``"nccl"`` or ``None`` when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str = "cpu") -> DistributedInfo:
    """Open the process group from ``torchrun``'s environment variables (no-op without them).

    Args:
        device: the requested device (``cpu``, ``cuda``, ``cuda:N``). Under ``torchrun`` a CUDA
            device becomes ``cuda:LOCAL_RANK`` and the backend ``nccl``; CPU uses ``gloo``.

    Returns:
        This process's :class:`DistributedInfo` (``world_size == 1`` outside ``torchrun``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistributedInfo(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    logger.info("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistributedInfo(rank, world, local_rank, device, backend)


def cleanup_distributed() -> None:
    """Wait for every rank, then close the process group (if one is open).

    Without the barrier a rank that finishes first tears its connections down while another is
    still using them, and gloo aborts that process ("terminate called without an active exception").
    The barrier is bounded, so a rank that failed does not hang the others' exit for long.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
        else:
            dist.barrier()
    except RuntimeError as err:  # a rank died or timed out: close anyway
        logger.warning("ranks did not all reach the end of the run: %s", err)
    dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 or when not distributed: the process that writes files."""
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (unchanged when not distributed)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm statistics) to every rank, so all hold the same model."""
    if not _active():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src)


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its exception) to every rank.

    For steps that touch the file system once per job (creating the run folder): other ranks do not
    run ``fn``; they receive its return value, or raise the same exception, so a user error ends every
    rank instead of leaving them waiting in a collective.
    """
    if not _active():
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # handed to every rank below
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


class ShardedLoader:
    """This rank's slice of every batch of a :class:`BatchLoader` (DistributedSampler for in-memory data).

    Every rank must build its ``BatchLoader`` with the same data, batch size and an identically
    seeded generator; ``len()`` is the number of (global) steps per epoch, the same on every rank.

    Args:
        loader: the global-batch loader.
        rank: this rank.
        world_size: number of ranks.
    """

    def __init__(self, loader: BatchLoader, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if loader.batch_size < world_size:
            raise ValueError(f"batch_size {loader.batch_size} is smaller than the world size {world_size}")
        self.loader = loader
        self.rank = rank
        self.world_size = world_size

    @property
    def batch_size(self) -> int:
        """The global batch size."""
        return self.loader.batch_size

    @property
    def generator(self) -> torch.Generator:
        """The shared shuffling/augmentation generator."""
        return self.loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in self.loader:
            if len(yb) < self.world_size:  # a tail too small to split: every rank skips it
                continue
            yield xb.tensor_split(self.world_size)[self.rank], yb.tensor_split(self.world_size)[self.rank]
