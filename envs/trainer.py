"""Supervised training of a classifier on in-memory data: SGD + cosine, resumable, NaN-guarded.

Used by ``keepgym train`` and by ``RLPrune-Digits-v0`` to build its small baseline. One
:class:`Trainer` holds the model, the optimiser, the schedule and every random state, so
``state_dict()`` taken after any epoch resumes to exactly the result of an uninterrupted run.

Under ``torchrun`` (``distributed=True``) the model is wrapped in ``DistributedDataParallel`` and
every rank trains on its slice of each global batch (:class:`keepgym.envs.distributed.ShardedLoader`). On
CUDA, ``amp`` runs forward passes under bf16 autocast and CNNs use ``channels_last``; the hot loop
keeps loss and accuracy sums on the device and checks for NaN only every few steps, so it does not
wait for the GPU after each batch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from keepgym.envs.data import BatchLoader, DatasetSplits
from keepgym.envs.distributed import ShardedLoader, all_reduce_sum, broadcast_buffers
from keepgym.envs.metrics import evaluate_accuracy

__all__ = ["Trainer", "EpochStats", "train_loader"]

logger = logging.getLogger(__name__)

# On CUDA the NaN guard looks at the loss every this many steps (one host sync each), at the
# restore points; on CPU a sync is free, so it checks every step.
_CUDA_CHECK_EVERY = 10



def train_loader(
    data: DatasetSplits,
    batch_size: int,
    *,
    augment: bool,
    drop_last: bool,
    device: str | torch.device,
    generator: torch.Generator | None = None,
) -> BatchLoader:
    """Shuffled batches of ``data``'s train split (augmented with ``augment``), normalised as ``data`` says."""
    return BatchLoader(
        data.train_x,
        data.train_y,
        data,
        batch_size,
        shuffle=True,
        augment=augment,
        drop_last=drop_last,
        device=device,
        generator=generator,
    )

@dataclass
class EpochStats:
    """What one epoch produced."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    learning_rate: float
    seconds: float
    diverged: bool = False


@dataclass
class _GuardState:
    events: list[dict] = field(default_factory=list)
    lowered: bool = False


class Trainer:
    """Train ``model`` on ``data.train`` and score it on ``data.val`` after every epoch.

    Args:
        model: the classifier (moved to ``device``).
        data: in-memory splits; the test split is never touched here.
        epochs: total epochs of the cosine schedule.
        batch_size: images per step.
        learning_rate: peak SGD learning rate (linear warm-up over the first epoch).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        label_smoothing: cross-entropy label smoothing.
        augment: pad-crop + flip on the training batches.
        device: torch device.
        seed: seeds data order, augmentation and dropout.
        distributed: train with ``DistributedDataParallel`` over the open process group (see
            :func:`keepgym.envs.distributed.init_distributed`); ``batch_size`` is then the global batch, split
            between the ranks, so N ranks follow the single-process batch sequence. Every rank must
            build its Trainer identically and call :meth:`train_epoch` together.
        amp: bf16 autocast for forward passes and evaluation on CUDA (ignored on CPU).
        channels_last: ``channels_last`` memory format for 4-D inputs on CUDA (ignored on CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        data: DatasetSplits,
        *,
        epochs: int,
        batch_size: int = 128,
        learning_rate: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
        augment: bool = True,
        device: str | torch.device = "cpu",
        seed: int = 0,
        distributed: bool = False,
        amp: bool = False,
        channels_last: bool = True,
    ) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.amp = bool(amp) and cuda
        self.channels_last = bool(channels_last) and cuda and data.train_x.dim() == 4
        if amp and not cuda:
            logger.info("amp is only used on CUDA; training in float32 on %s", self.device)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.data = data
        self.epochs = epochs
        self.label_smoothing = label_smoothing
        self.generator = torch.Generator().manual_seed(seed)
        self.loader: BatchLoader | ShardedLoader = train_loader(
            data, batch_size, augment=augment, drop_last=len(data.train_y) > batch_size, device=self.device,
            generator=self.generator,
        )
        self.distributed = bool(distributed)
        self.rank, self.world_size = 0, 1
        self._net: nn.Module = self.model  # what the training forward pass calls
        if self.distributed:
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("distributed=True needs an open process group (envs.distributed.init_distributed)")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.loader = ShardedLoader(self.loader, self.rank, self.world_size)
            self._net = DistributedDataParallel(self.model, device_ids=[self.device.index] if cuda else None)
        self._check_every = _CUDA_CHECK_EVERY if cuda else 1
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay, nesterov=True
        )
        steps = epochs * len(self.loader)
        warm = min(len(self.loader), max(1, steps // 10))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))),
        )
        self.epoch = 0
        self.train_seconds = 0.0
        self.best_val = -1.0
        self._guard = _GuardState()

    @property
    def divergence_events(self) -> list[dict]:
        """NaN/inf events the guard handled (epoch, step, action)."""
        return list(self._guard.events)

    def state_dict(self) -> dict:
        """Everything needed to resume after the current epoch (tensors and plain values only)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "train_seconds": self.train_seconds,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "guard": {"events": list(self._guard.events), "lowered": self._guard.lowered},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (same model architecture and settings)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.train_seconds = float(state["train_seconds"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self._guard = _GuardState(list(state["guard"]["events"]), bool(state["guard"]["lowered"]))

    def train_epoch(self, progress: Callable[[int, float], None] | None = None) -> EpochStats:
        """One pass over the training split; returns its statistics.

        A NaN/inf loss stops the epoch, restores the weights of the last good step, lowers the
        learning rate (once, by 10x) and lets training go on; the event is recorded.
        """
        start = time.perf_counter()
        self.model.train()
        # running sums stay on the device: no host sync per batch
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        nonfinite = torch.zeros((), device=self.device)
        total = 0
        good = copy.deepcopy(self.model.state_dict())
        diverged = False
        last = len(self.loader) - 1
        for i, (xb, yb) in enumerate(self.loader):
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = self._net(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=self.label_smoothing)
            finite = torch.isfinite(loss.detach())
            nonfinite += (~finite).float()
            if self._check_every == 1 or i % self._check_every == self._check_every - 1 or i == last:
                # all ranks must agree, or one would stop while the others wait in the all-reduce
                flag = all_reduce_sum(nonfinite.clone()) if self.distributed else nonfinite
                if flag.item() > 0:
                    diverged = True
                    self._on_divergence(good, step=i)
                    break
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if i % 10 == 9:  # a cheap restore point; copying every step would dominate on CPU
                good = copy.deepcopy(self.model.state_dict())
            n = len(yb)
            total += n
            loss_sum += torch.where(finite, loss.detach(), 0.0) * n
            correct += (logits.detach().argmax(1) == yb).sum()
            if progress is not None:
                progress(i, float(loss.detach()))
        self.epoch += 1
        if self.distributed:
            broadcast_buffers(self.model)  # batch-norm statistics of rank 0 everywhere: one model
        val_correct, val_n = self._val_correct()
        extra = torch.tensor([float(total), float(val_correct)], dtype=torch.float64, device=self.device)
        sums = torch.cat([torch.stack([loss_sum.double(), correct.double()]), extra])
        if self.distributed:
            all_reduce_sum(sums)
        loss_sum_f, correct_f, total_f, val_correct_f = sums.tolist()
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        return EpochStats(
            epoch=self.epoch,
            train_loss=loss_sum_f / max(1.0, total_f),
            train_accuracy=correct_f / max(1.0, total_f),
            val_accuracy=val_correct_f / max(1, val_n),
            learning_rate=self.optimizer.param_groups[0]["lr"],
            seconds=seconds,
            diverged=diverged,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _val_correct(self) -> tuple[int, int]:
        """Correct validation predictions of this rank's share (all of them when not distributed)."""
        x, y = self.data.val_x, self.data.val_y
        if self.distributed:  # each rank scores a contiguous slice; the counts are summed
            x, y = x.tensor_split(self.world_size)[self.rank], y.tensor_split(self.world_size)[self.rank]
        if len(y) == 0:
            return 0, len(self.data.val_y)
        normalize = self.data.normalize
        if self.channels_last:
            normalize = lambda u: self.data.normalize(u).contiguous(memory_format=torch.channels_last)  # noqa: E731
        with self._autocast():
            acc = evaluate_accuracy(self.model, x, y, normalize, device=self.device)
        return int(round(acc * len(y))), len(self.data.val_y)

    def _on_divergence(self, good: dict, step: int) -> None:
        self.model.load_state_dict(good)
        self.optimizer.state.clear()  # momentum buffers may hold inf/NaN
        action = "restored last good weights"
        if not self._guard.lowered:
            self._guard.lowered = True
            self.scheduler.base_lrs = [lr * 0.1 for lr in self.scheduler.base_lrs]
            action += ", learning rate lowered 10x"
        self._guard.events.append({"epoch": self.epoch + 1, "step": step, "action": action})
        logger.warning("non-finite loss at epoch %d step %d: %s", self.epoch + 1, step, action)
