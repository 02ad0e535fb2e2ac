"""Knowledge-distillation fine-tuning of a pruned student against its unpruned teacher.

RL-Pruner (arXiv 2411.06463) recovers accuracy after every pruning stage with Hinton et al.'s
distillation loss::

    loss = kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - kd_weight) * CE(student, y)

with T = 2 and kd_weight = 0.75, SGD (lr 1e-3, momentum 0.9, weight decay 5e-4) and a cosine decay.
Unlike the reference code there is no warm-up that can zero the learning rate for short runs, and a
NaN/inf guard stops the run and restores the last good weights instead of propagating garbage.

Under ``torchrun`` (``distributed=True``) the student is wrapped in ``DistributedDataParallel``: all
ranks draw the same seeded global batch, each distils on its contiguous slice of it
(:class:`keepgym.envs.distributed.ShardedLoader`) and the gradients are averaged over the ranks. The guard
looks at the loss summed over the ranks, so every rank stops at the same step, and rank 0's batch-norm
statistics are copied to every rank at the end: all ranks leave with the same student.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from keepgym.envs.data import DatasetSplits
from keepgym.envs.distributed import ShardedLoader, all_reduce_sum, broadcast_buffers
from keepgym.envs.trainer import train_loader

__all__ = ["DistillStats", "distill", "distill_epochs", "distill_epochs_checkpointed", "kd_loss", "kd_seed"]

logger = logging.getLogger(__name__)


@dataclass
class DistillStats:
    """What one :func:`distill` call did.

    Attributes:
        steps: optimiser steps taken (fewer than asked when the guard stopped the run).
        mean_loss: mean training loss over the steps taken (nan if none).
        last_loss: loss of the last finite step (nan if none).
        learning_rate: learning rate of the last step.
        diverged: a non-finite loss was met; the weights were restored to ``restored_step``.
        restored_step: the step whose weights the guard restored (0 = the weights on entry).
        seconds: wall time.
    """

    steps: int
    mean_loss: float
    last_loss: float
    learning_rate: float
    diverged: bool
    restored_step: int | None
    seconds: float


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 2.0,
    kd_weight: float = 0.75,
) -> torch.Tensor:
    """``kd_weight * T^2 * KL(p_teacher || p_student) + (1 - kd_weight) * CE(student, targets)``.

    The KL divergence is averaged over the batch (``batchmean``), the T^2 factor keeps the soft
    term's gradient scale independent of T (Hinton et al., 2015).
    """
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, targets)
    return kd_weight * t * t * soft + (1.0 - kd_weight) * hard


def _batches(
    source: DatasetSplits | Iterable,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None,
    augment: bool,
    distributed: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of (x, y) batches: a train-split loader or a re-iterated iterable.

    With ``distributed``, a dataset's global batches are split between the ranks (this rank's slice).
    """
    if isinstance(source, DatasetSplits):
        drop_last = len(source.train_y) > batch_size
        source = train_loader(
            source, batch_size, augment=augment, drop_last=drop_last, device=device, generator=generator
        )
        if distributed:
            import torch.distributed as dist

            source = ShardedLoader(source, dist.get_rank(), dist.get_world_size())
    while True:
        empty = True
        for x, y in source:
            empty = False
            yield x.to(device), y.to(device)
        if empty:
            raise ValueError("distill: the data source yielded no batches")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader_or_data: DatasetSplits | Iterable,
    steps: int,
    *,
    temperature: float = 2.0,
    kd_weight: float = 0.75,
    learning_rate: float = 1e-3,
    min_learning_rate: float = 1e-6,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    augment: bool = True,
    device: str | torch.device | None = None,
    seed: int | None = None,
    guard_interval: int = 50,
    distributed: bool = False,
) -> DistillStats:
    """Fine-tune ``student`` for ``steps`` SGD steps with the distillation loss, in place.

    Args:
        student: the (pruned) model to train; left in eval mode afterwards.
        teacher: the unpruned model; run in eval mode under ``no_grad``, never changed.
        loader_or_data: a :class:`keepgym.envs.data.DatasetSplits` (its train split is used, shuffled and,
            with ``augment``, pad-cropped and flipped) or any iterable of ``(x, y)`` batches of
            normalised images, re-iterated as often as needed.
        steps: optimiser steps (0 does nothing).
        temperature: softmax temperature T.
        kd_weight: weight of the soft (teacher) term; ``1 - kd_weight`` weighs the label CE.
        learning_rate: initial SGD learning rate, decayed by a cosine to ``min_learning_rate``.
        min_learning_rate: learning rate of the last step.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: images per step when ``loader_or_data`` is a dataset.
        augment: augment the training batches when ``loader_or_data`` is a dataset.
        device: where to train (default: the student's device).
        seed: seeds batch order, augmentation and dropout (the global torch RNG is forked, so the
            caller's random state is left alone); None uses the current global state.
        guard_interval: keep a copy of the weights every this many good steps for the NaN guard.
        distributed: data-parallel over the open process group (see the module docstring); every
            rank calls with the same arguments, ``loader_or_data`` must then be a dataset and
            ``batch_size`` is the global batch. ``mean_loss``/``last_loss`` are global-batch means.

    Returns:
        :class:`DistillStats`.

    Raises:
        ValueError: bad hyperparameters.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
    if learning_rate <= 0 or min_learning_rate < 0:
        raise ValueError("learning_rate must be > 0 and min_learning_rate >= 0")
    if guard_interval < 1:
        raise ValueError(f"guard_interval must be >= 1, got {guard_interval}")
    if distributed and not isinstance(loader_or_data, DatasetSplits):
        raise ValueError("distributed=True needs a DatasetSplits (its global batches are split between ranks)")
    start = time.perf_counter()
    if steps == 0:
        return DistillStats(0, math.nan, math.nan, learning_rate, False, None, 0.0)
    device = torch.device(device) if device is not None else next(student.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        generator = None
        if seed is not None:
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.SGD(
            student.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay
        )
        good_state = copy.deepcopy(student.state_dict())
        good_step = 0
        teacher.eval()
        student.train()
        batches = _batches(loader_or_data, batch_size, device, generator, augment, distributed)
        net = student  # what the training forward pass calls
        world = 1
        if distributed:
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel

            world = dist.get_world_size()
            # DDP copies rank 0's weights to every rank here and averages the gradients in backward()
            net = DistributedDataParallel(student, device_ids=[device.index or 0] if device.type == "cuda" else None)
        total, last, done, current_lr = 0.0, math.nan, 0, learning_rate
        diverged = False
        try:
            for step in range(steps):
                # cosine decay from learning_rate (first step) to min_learning_rate (last step)
                current_lr = _cosine(learning_rate, min_learning_rate, step / max(1, steps - 1))
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                x, y = next(batches)
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = kd_loss(net(x), t_logits, y, temperature, kd_weight)
                # the global-batch loss: every rank takes the same NaN decision (no rank left waiting)
                global_loss = all_reduce_sum(loss.detach().clone()) / world if distributed else loss.detach()
                if not torch.isfinite(global_loss):
                    diverged = True
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(global_loss)
                total += value
                last = value
                done = step + 1
                if done % guard_interval == 0:
                    if all(torch.isfinite(p).all() for p in student.parameters()):
                        good_state = copy.deepcopy(student.state_dict())
                        good_step = done
                    else:
                        diverged = True
                        break
            if not diverged and not all(torch.isfinite(p).all() for p in student.parameters()):
                diverged = True
        finally:
            optimizer.zero_grad(set_to_none=True)
            student.eval()
            del net  # drop DDP's gradient hooks: later backward passes (Taylor importance) stay local
        if distributed:
            broadcast_buffers(student)  # each rank's BN statistics saw only its slice; keep rank 0's
        if diverged:
            student.load_state_dict(good_state)
            logger.warning(
                "distill: non-finite loss or weights after %d steps; restored the weights of step %d",
                done,
                good_step,
            )
        return DistillStats(
            steps=done,
            mean_loss=total / done if done else math.nan,
            last_loss=last,
            learning_rate=current_lr,
            diverged=diverged,
            restored_step=good_step if diverged else None,
            seconds=time.perf_counter() - start,
        )


def kd_seed(seed: int, stage: int, epoch: int) -> int:
    """A distinct, reproducible distillation seed for every (run seed, stage, epoch)."""
    return (seed * 1_000_003 + stage * 1_009 + epoch) % (2**31 - 1)


def _cosine(lr: float, min_lr: float, frac: float) -> float:
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def distill_epochs(
    student: nn.Module,
    teacher: nn.Module,
    data: DatasetSplits,
    epochs: int,
    *,
    evaluate: Callable[[nn.Module], float],
    seed: int,
    stage: int,
    learning_rate: float = 1e-3,
    min_learning_rate: float = 1e-6,
    batch_size: int = 128,
    temperature: float = 2.0,
    kd_weight: float = 0.75,
    device: str | torch.device | None = None,
    start_epoch: int = 0,
    best: tuple[float, dict] | None = None,
    keep_best: bool = True,
    on_epoch: Callable[[int, float, dict, list[dict]], None] | None = None,
    distributed: bool = False,
) -> tuple[float, list[dict]]:
    """Distil ``student`` for ``epochs`` epochs of ``data``'s train split under one cosine schedule.

    Each epoch is one :func:`distill` call with its own seed (:func:`kd_seed` of ``seed``, ``stage``, epoch)
    and its slice of the global cosine, so a run resumed between epochs is bit-identical to one that was not.
    With ``keep_best`` the student ends with the weights of its best epoch by ``evaluate`` (or its entry
    weights, if no epoch beat ``best``).

    Args:
        evaluate: ``evaluate(model) -> accuracy`` on the validation split (never the test split).
        seed, stage: pick the per-epoch seeds.
        start_epoch: first epoch to run (resume); ``best`` then carries what the earlier epochs kept.
        best: ``(accuracy, state_dict)`` to beat (default: the student's entry weights and accuracy).
        keep_best: end with the best epoch's weights (False: the last epoch's).
        on_epoch: ``on_epoch(epoch, best_accuracy, best_state, records)`` after every epoch (checkpoints).
        distributed: data-parallel over the open process group; all ranks end with the same student.

    Returns:
        ``(accuracy of the weights the student ends with, per-epoch records)``; a record holds ``epoch``,
        ``val_accuracy``, ``loss``, ``diverged``, ``seconds``.
    """
    steps = max(1, math.ceil(len(data.train_y) / batch_size))
    if best is None:
        best = (evaluate(student), copy.deepcopy(student.state_dict()))
    best_acc, best_state = best
    acc = best_acc
    records: list[dict] = []
    for epoch in range(start_epoch, epochs):
        stats = distill(
            student,
            teacher,
            data,
            steps,
            temperature=temperature,
            kd_weight=kd_weight,
            learning_rate=_cosine(learning_rate, min_learning_rate, epoch / epochs),
            min_learning_rate=_cosine(learning_rate, min_learning_rate, (epoch + 1) / epochs),
            batch_size=batch_size,
            device=device,
            seed=kd_seed(seed, stage, epoch),
            distributed=distributed,
        )
        acc = evaluate(student)
        records.append(
            {"epoch": epoch, "val_accuracy": acc, "loss": stats.mean_loss, "diverged": stats.diverged,
             "seconds": stats.seconds}
        )
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(student.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, best_acc, best_state, records)
    if not keep_best:
        return acc, records
    student.load_state_dict(best_state)
    return best_acc, records


def distill_epochs_checkpointed(
    student: nn.Module,
    teacher: nn.Module,
    data: DatasetSplits,
    epochs: int,
    folder: str | Path,
    *,
    evaluate: Callable[[nn.Module], float],
    seed: int,
    stage: int = 10_000,
    learning_rate: float = 1e-3,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    save: bool = True,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    on_resume: Callable[[dict[str, Any]], None] | None = None,
    distributed: bool = False,
) -> tuple[nn.Module, list[dict]]:
    """:func:`distill_epochs` with a checkpoint in ``folder`` after every epoch, resumed from it if there is one.

    ``folder`` holds ``model.pt`` (the student), ``best.pt`` (its best weights so far, both
    :func:`keepgym.models.save_model`) and ``state.pt`` (``epoch``, ``best_val``, the global RNG states,
    the records so far and ``extra_state()``; ``torch.load(weights_only=True)``), written atomically. A run
    resumed from it ends bit-identical to one that was not interrupted. ``save=False`` (data-parallel ranks
    other than 0) writes nothing; ``on_resume(state)`` is called with the state resumed from (e.g. to read
    back what ``extra_state`` saved).

    Returns:
        ``(student, records of every epoch)``; the student is a new module when the run was resumed, and
        holds its best epoch's weights.
    """
    from keepgym.models import load_model, save_model
    from keepgym.models.checkpoints import global_rng_state, set_global_rng_state, write_dir_atomically
    from keepgym.models.serialization import ModelLoadError, atomic_save

    folder, state_file = Path(folder), Path(folder) / "state.pt"
    start_epoch, best_acc, best_state = 0, evaluate(student), copy.deepcopy(student.state_dict())
    done: list[dict] = []
    if state_file.exists():
        try:
            resumed = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, zip errors, ...
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise ModelLoadError(f"{state_file}: not a readable checkpoint state: {reason}") from None
        start_epoch, best_acc = int(resumed["epoch"]) + 1, float(resumed["best_val"])
        done = json.loads(resumed["records_json"])
        student = load_model(folder / "model.pt").to(device)
        best_state = load_model(folder / "best.pt").to(device).state_dict()
        set_global_rng_state(resumed["rng"])
        if on_resume is not None:
            on_resume(resumed)

    def on_epoch(epoch: int, best_val: float, state: dict, records: list[dict]) -> None:
        def write(tmp: Path) -> None:
            save_model(student, tmp / "model.pt", epoch=epoch)
            best_model = copy.deepcopy(student)
            best_model.load_state_dict(state)
            save_model(best_model, tmp / "best.pt", epoch=epoch)
            extra = extra_state() if extra_state is not None else {}
            blob = json.dumps(done + records, default=float)
            atomic_save(
                {"epoch": epoch, "best_val": best_val, "rng": global_rng_state(), **extra, "records_json": blob},
                tmp / "state.pt",
            )

        if save:
            write_dir_atomically(folder, write)

    if start_epoch >= epochs:
        student.load_state_dict(best_state)
        return student, done
    _, records = distill_epochs(
        student,
        teacher,
        data,
        epochs,
        evaluate=evaluate,
        seed=seed,
        stage=stage,
        learning_rate=learning_rate,
        batch_size=batch_size,
        device=device,
        start_epoch=start_epoch,
        best=(best_acc, best_state),
        on_epoch=on_epoch,
        distributed=distributed,
    )
    return student, done + records
