"""Supervised training of a classifier on in-memory data: SGD + cosine, resumable, NaN-guarded.

Used by ``keepgym train`` and by ``RLPrune-Digits-v0`` to build its small baseline. One
:class:`Trainer` holds the model, the optimiser, the schedule and every random state, so
``state_dict()`` taken after any epoch resumes to exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from envs.data import BatchLoader, DatasetSplits
from envs.metrics import evaluate_accuracy

__all__ = ["Trainer", "EpochStats"]

logger = logging.getLogger(__name__)


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
    ) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.data = data
        self.epochs = epochs
        self.label_smoothing = label_smoothing
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = BatchLoader(
            data.train_x, data.train_y, data, batch_size, shuffle=True, augment=augment,
            drop_last=len(data.train_y) > batch_size, device=self.device, generator=self.generator,
        )
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
        total, correct, loss_sum = 0, 0, 0.0
        good = copy.deepcopy(self.model.state_dict())
        diverged = False
        for i, (xb, yb) in enumerate(self.loader):
            logits = self.model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=self.label_smoothing)
            if not torch.isfinite(loss):
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
            loss_sum += loss.detach() * n
            correct += (logits.detach().argmax(1) == yb).sum()
            if progress is not None:
                progress(i, float(loss.detach()))
        self.epoch += 1
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        val = evaluate_accuracy(self.model, self.data.val_x, self.data.val_y, self.data.normalize, device=self.device)
        return EpochStats(
            epoch=self.epoch,
            train_loss=float(loss_sum) / max(1, total),
            train_accuracy=float(correct) / max(1, total),
            val_accuracy=val,
            learning_rate=self.optimizer.param_groups[0]["lr"],
            seconds=seconds,
            diverged=diverged,
        )

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
