"""Accuracy recovery after a pruning stage: the strategy object :class:`keepgym.envs.prune_env.PruneEnv` runs.

RL-Pruner (arXiv 2411.06463) recovers the accuracy of the pruned model after every stage by knowledge
distillation from a teacher (the unpruned model, replaced by a pruned one whenever the latter beats it on
validation). :class:`KDRecovery` is that step, in two sizes:

* ``steps=N``: N distillation steps (``PruneEnv(finetune_steps=N)`` builds this one), the seed drawn from the
  env's ``np_random``; a NaN/inf loss restores the last good weights and lowers the learning rate 10x for the
  rest of the episode.
* ``epochs=N``: N epochs over the training split under one cosine schedule, the best validation epoch kept
  (:func:`keepgym.envs.distill.distill_epochs`, the same function ``keepgym prune`` runs for its final
  distillation), seeds derived from ``seed`` and the stage, so a resumed run is bit-identical.

Under ``torchrun`` (``distributed=True``) every rank commits rank 0's action and the ranks check after the
surgery that they hold the same widths; the distillation is data-parallel.

:class:`KeepBestEpisode` keeps a copy of the best finished episode's model, for agents whose vectorised env
resets as soon as an episode ends (Stable-Baselines3's PPO, SAC, A2C).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

from keepgym.envs.distill import distill, distill_epochs
from keepgym.envs.distributed import all_gather_objects, main_first
from keepgym.envs.metrics import evaluate_accuracy

if TYPE_CHECKING:  # the env imports this module; only the type is needed here
    from keepgym.envs.prune_env import PruneEnv

__all__ = ["KDRecovery", "KeepBestEpisode", "Recovery", "RecoveryResult"]

logger = logging.getLogger(__name__)


@dataclass
class RecoveryResult:
    """What :meth:`Recovery.recover` did to the env's model.

    Attributes:
        changed: whether the weights changed (the env then measures the accuracy again).
        info: entries for the step's ``info`` (plain values).
        record: entries for the stage's record (:attr:`Recovery.stage_records`; plain values).
    """

    changed: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    """``value`` with NumPy scalars/arrays and tensors turned into Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.tolist()
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


class Recovery:
    """No recovery; the base of every recovery strategy :class:`~keepgym.envs.prune_env.PruneEnv` accepts.

    The env calls :meth:`reset` from its ``reset``, :meth:`prepare_action` before it allocates a stage,
    :meth:`recover` after the surgery (on ``env.model``, in place) and :meth:`record_stage` once the stage's
    figures are known. :attr:`stage_records` is the per-stage history over the episodes (it survives
    ``reset``); :meth:`state_dict` / :meth:`load_state_dict` hold all of it as tensors and plain values.
    """

    def __init__(self) -> None:
        self._original: nn.Module | None = None
        self._teacher: nn.Module | None = None  # None: the original model
        self._teacher_widths: list[int] | None = None  # the swapped teacher's group widths
        #: one plain dict per committed stage, over every episode
        self.stage_records: list[dict[str, Any]] = []
        #: stages (1-based) at which the teacher was replaced by the pruned model
        self.teacher_swaps: list[int] = []
        #: episodes finished so far
        self.episode = 0

    @property
    def teacher(self) -> nn.Module | None:
        """The current distillation teacher (the env's original model until a swap; None before reset)."""
        return self._original if self._teacher is None else self._teacher

    def reset(self, env: PruneEnv) -> None:
        """A new episode: the teacher is the env's original model again."""
        self._original = env.original_model
        self._teacher, self._teacher_widths = None, None

    def prepare_action(self, action: Any) -> Any:
        """The action the env commits (the distributed variant hands rank 0's to every rank)."""
        return action

    def recover(self, env: PruneEnv, stage: int) -> RecoveryResult:
        """Recover ``env.model`` after the surgery of ``stage`` (0-based). The base class does nothing."""
        return RecoveryResult()

    def record_stage(self, info: dict[str, Any], reward: float, done: bool, result: RecoveryResult) -> None:
        """Append the committed stage's record (from the step's ``info``) to :attr:`stage_records`."""
        record = {
            "episode": self.episode,
            "stage": int(info["stage"]),
            "reward": float(reward),
            "accuracy_before_kd": float(info["accuracy_before_recovery"]),
            "macs_ratio": float(info["macs_ratio"]),
            "params_ratio": float(info["params_ratio"]),
            "sparsity": float(info["sparsity"]),
            "widths": list(info["widths"]),
            "val_accuracy": float(info["accuracy"]),
            "seconds": float(info["wall_times"].total_s) if "wall_times" in info else 0.0,
        }
        record.update(_plain(result.record))
        self.stage_records.append(record)
        if done:
            self.episode += 1

    # -- state -------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A cheap in-memory copy of the state (for look-ahead: :meth:`PruneEnv.snapshot`)."""
        return {"__dict__": {k: copy.copy(v) if isinstance(v, list | dict) else v for k, v in vars(self).items()}}

    def restore(self, snap: dict[str, Any]) -> None:
        """Return to a :meth:`snapshot`."""
        for key, value in snap["__dict__"].items():
            setattr(self, key, copy.copy(value) if isinstance(value, list | dict) else value)

    def state_dict(self) -> dict[str, Any]:
        """The state as tensors and plain values (``torch.load(weights_only=True)`` reads it back)."""
        teacher = None
        if self._teacher is not None:
            teacher = {
                "widths": list(self._teacher_widths),
                "state_dict": {k: v.detach().cpu().clone() for k, v in self._teacher.state_dict().items()},
            }
        return {
            "stage_records": _plain(self.stage_records),
            "teacher_swaps": list(self.teacher_swaps),
            "episode": self.episode,
            "teacher": teacher,
        }

    def load_state_dict(self, state: dict[str, Any], env: PruneEnv) -> None:
        """Load a :meth:`state_dict`; ``env`` rebuilds a swapped teacher's architecture from its widths."""
        self.stage_records = [dict(r) for r in state["stage_records"]]
        self.teacher_swaps = [int(s) for s in state["teacher_swaps"]]
        self.episode = int(state["episode"])
        self._original = env.original_model
        self._teacher, self._teacher_widths = None, None
        if state.get("teacher") is not None:
            self._teacher_widths = [int(w) for w in state["teacher"]["widths"]]
            teacher = env.model_with_widths(state["teacher"]["widths"])
            teacher.load_state_dict(state["teacher"]["state_dict"])
            self._teacher = _frozen(teacher.to(env.device))


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class KDRecovery(Recovery):
    """Knowledge distillation after every stage (RL-Pruner's recovery), by steps or by epochs.

    Loss ``kd_weight * T^2 * KL(teacher/T || student/T) + (1 - kd_weight) * CE`` (:func:`keepgym.envs.distill.distill`),
    SGD with momentum 0.9 and weight decay 5e-4, cosine decay to 1e-6.

    Args:
        epochs: epochs over the training split per stage (one cosine over them); the best validation epoch
            is kept with ``keep_best_epoch``. Seeds come from ``seed`` and the stage.
        steps: distillation steps per stage instead (``PruneEnv(finetune_steps=...)``); the seed is drawn
            from the env's ``np_random``. Give ``epochs`` or ``steps`` (both 0: no distillation).
        learning_rate: initial SGD learning rate.
        batch_size: distillation batch size (None: the env's ``batch_size``).
        temperature: softmax temperature T.
        kd_weight: weight of the soft (teacher) term.
        teacher_swap: a pruned model that beats the teacher on validation becomes the teacher (RL-Pruner).
        keep_best_epoch: with ``epochs``, end with the best validation epoch's weights.
        seed: seeds the per-epoch distillation (``epochs``).
        distributed: under ``torchrun``: commit rank 0's action, check the ranks' widths agree, distil
            data-parallel.
    """

    def __init__(
        self,
        epochs: int = 0,
        steps: int = 0,
        learning_rate: float = 1e-3,
        batch_size: int | None = None,
        temperature: float = 2.0,
        kd_weight: float = 0.75,
        teacher_swap: bool = True,
        keep_best_epoch: bool = True,
        seed: int = 0,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        checks = [
            (int(epochs) == epochs and epochs >= 0, f"epochs must be an int >= 0, got {epochs}"),
            (int(steps) == steps and steps >= 0, f"steps (finetune_steps) must be an int >= 0, got {steps}"),
            (not (epochs and steps), "give epochs or steps, not both"),
            (
                learning_rate > 0 and math.isfinite(learning_rate),
                f"learning_rate (finetune_lr) must be > 0, got {learning_rate}",
            ),
            (batch_size is None or batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
            (temperature > 0, f"temperature (kd_temperature) must be > 0, got {temperature}"),
            (0.0 <= kd_weight <= 1.0, f"kd_weight must be in [0, 1], got {kd_weight}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.epochs, self.steps = int(epochs), int(steps)
        self.learning_rate = float(learning_rate)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.temperature, self.kd_weight = float(temperature), float(kd_weight)
        self.teacher_swap, self.keep_best_epoch = bool(teacher_swap), bool(keep_best_epoch)
        self.seed, self.distributed = int(seed), bool(distributed)
        #: the teacher's validation accuracy (None until a swap test needs it)
        self.teacher_val: float | None = None
        self._original_val: float | None = None
        self._lr_scale = 1.0  # 0.1 once the distillation diverged in this episode

    def reset(self, env: PruneEnv) -> None:
        super().reset(env)
        self.teacher_val = self._original_val
        self._lr_scale = 1.0

    def prepare_action(self, action: Any) -> Any:
        return main_first(lambda: action) if self.distributed else action

    @staticmethod
    def validation_accuracy(env: PruneEnv, model: nn.Module) -> float:
        """``model``'s accuracy on the env's whole validation split."""
        data = env.data
        return evaluate_accuracy(model, data.val_x, data.val_y, data.normalize, device=env.device)

    def recover(self, env: PruneEnv, stage: int) -> RecoveryResult:
        t0 = time.perf_counter()
        if self.distributed:
            widths = all_gather_objects(np.asarray(env.group_widths).tolist())
            if any(w != widths[0] for w in widths):
                raise RuntimeError(f"ranks pruned different channels (group widths {widths}); stopping")
        model = env.model
        result = RecoveryResult(
            info={"finetune_steps_done": 0, "finetune_learning_rate": 0.0, "finetune_diverged": False}
        )
        batch_size = self.batch_size or env.batch_size
        acc = None
        if self.steps > 0:
            for p in model.parameters():
                p.requires_grad_(True)
            lr = self.learning_rate * self._lr_scale
            stats = distill(
                model,
                self.teacher,
                env.data,
                self.steps,
                temperature=self.temperature,
                kd_weight=self.kd_weight,
                learning_rate=lr,
                batch_size=batch_size,
                device=env.device,
                seed=int(env.np_random.integers(2**62)),
                distributed=self.distributed,
            )
            result.changed = True
            result.info.update(finetune_steps_done=stats.steps, finetune_learning_rate=lr)
            if stats.diverged:
                # distill restored the last good weights; later stages of this episode use a 10x lower rate (once)
                result.info["finetune_diverged"] = True
                self._lr_scale = 0.1
                logger.warning(
                    "stage %d: KD diverged after %d steps; weights of step %s restored; KD lr now %g",
                    stage + 1,
                    stats.steps,
                    stats.restored_step,
                    self.learning_rate * self._lr_scale,
                )
        elif self.epochs > 0:
            for p in model.parameters():
                p.requires_grad_(True)
            acc, epochs = distill_epochs(
                model,
                self.teacher,
                env.data,
                self.epochs,
                evaluate=functools.partial(self.validation_accuracy, env),
                seed=self.seed,
                stage=stage + 1,
                learning_rate=self.learning_rate,
                batch_size=batch_size,
                temperature=self.temperature,
                kd_weight=self.kd_weight,
                device=env.device,
                keep_best=self.keep_best_epoch,
                distributed=self.distributed,
            )
            result.changed = True
            result.info["finetune_learning_rate"] = self.learning_rate
            result.record["kd_val_accuracies"] = [e["val_accuracy"] for e in epochs]
            result.info["finetune_diverged"] = any(e["diverged"] for e in epochs)
        if self.teacher_swap:
            if acc is None:
                acc = self.validation_accuracy(env, model)
            if self._original_val is None:
                self._original_val = self.validation_accuracy(env, env.original_model)
            if self.teacher_val is None:
                self.teacher_val = self._original_val
            result.record["teacher_swapped"] = False
            if acc > self.teacher_val:
                self._teacher = _frozen(copy.deepcopy(model))
                self._teacher_widths = np.asarray(env.group_widths).tolist()
                self.teacher_val = acc
                self.teacher_swaps.append(stage + 1)
                result.record["teacher_swapped"] = True
        if acc is not None:
            result.record["val_accuracy"] = acc
        result.record["kd_seconds"] = time.perf_counter() - t0
        return result

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(teacher_val=self.teacher_val, original_val=self._original_val, lr_scale=self._lr_scale)
        return state

    def load_state_dict(self, state: dict[str, Any], env: PruneEnv) -> None:
        super().load_state_dict(state, env)
        self.teacher_val = None if state["teacher_val"] is None else float(state["teacher_val"])
        self._original_val = None if state["original_val"] is None else float(state["original_val"])
        self._lr_scale = float(state["lr_scale"])


class KeepBestEpisode(gym.Wrapper):
    """Keeps a copy of the best finished episode's final model (by ``info["accuracy"]``, after recovery).

    For agents whose vectorised env resets as soon as an episode ends (SB3's PPO, SAC, A2C): after
    ``learn``, :attr:`best` holds ``{"episode", "accuracy", "model", "widths", "info"}`` (None before the
    first episode ends). The env must be a :class:`~keepgym.envs.prune_env.PruneEnv` (``unwrapped.model``).
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        #: the best finished episode so far, or None
        self.best: dict[str, Any] | None = None
        self.episodes = 0

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            acc = float(info["accuracy"])
            if self.best is None or acc > self.best["accuracy"]:
                raw = self.env.unwrapped
                self.best = {
                    "episode": self.episodes,
                    "accuracy": acc,
                    "model": copy.deepcopy(raw.model).eval(),
                    "widths": np.asarray(raw.group_widths).tolist(),
                    "info": _plain(info),
                }
            self.episodes += 1
        return obs, reward, terminated, truncated, info
