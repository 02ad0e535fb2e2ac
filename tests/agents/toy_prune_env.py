"""A tiny PruneEnv stand-in for agent tests: same surface, closed-form reward, no model.

The "accuracy" of a stage is ``1 - 0.1 * ||p - target||_1`` where ``p`` is the normalised action over
the prunable groups, so the best allocation is known (``target``) and an agent's ``pi`` should converge
to it. Options make it collapse at a given stage (accuracy halved for every candidate) and give
group importances with a known global order (for the ``global`` baseline).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["ToyPruneEnv"]


class ToyPruneEnv(gym.Env):
    """Toy staged-pruning env with PruneEnv's agent-facing API.

    Args:
        widths: Initial width of each coupling group.
        stage_budget: Channels removed per stage (``M``).
        num_stages: Stages per episode (``T``).
        target: Best allocation (defaults to a fixed non-uniform distribution).
        unprunable: Indices of groups that can never give channels.
        min_channels: Channels a group always keeps.
        collapse_stage: Stage index at which every candidate's accuracy is halved (None: never).
        importance_scale: Per-group multiplier of the channel importances (defaults to 1 for all).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        widths: tuple[int, ...] = (64, 128, 256, 64),
        stage_budget: int = 8,
        num_stages: int = 5,
        target: tuple[float, ...] | None = None,
        unprunable: tuple[int, ...] = (),
        min_channels: int = 1,
        collapse_stage: int | None = None,
        importance_scale: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.initial_group_widths = np.asarray(widths, dtype=np.int64)
        g = len(widths)
        self.stage_budget = int(stage_budget)
        self.num_stages = int(num_stages)
        self.min_channels = int(min_channels)
        self.unprunable = tuple(unprunable)
        self.collapse_stage = collapse_stage
        base = np.asarray(target if target is not None else np.linspace(1.0, 2.0, g)[::-1], dtype=np.float64)
        base[list(self.unprunable)] = 0.0
        self.target = base / base.sum()
        self.importance_scale = (
            np.ones(g) if importance_scale is None else np.asarray(importance_scale, float)
        )
        self.observation_space = spaces.Box(0.0, 1.0, (g + 4,), dtype=np.float32)
        self.action_space = spaces.Box(0.0, 1.0, (g,), dtype=np.float32)
        self.num_evaluations = 0
        self._set_state(self.initial_group_widths.copy(), 0, 1.0)

    # -- state --------------------------------------------------------------------------------------

    def _set_state(self, widths: np.ndarray, stage: int, accuracy: float) -> None:
        self.group_widths = widths
        self.stage = stage
        self.last_accuracy = accuracy

    def snapshot(self) -> tuple[np.ndarray, int, float]:
        return self.group_widths.copy(), self.stage, self.last_accuracy

    def restore(self, snapshot: tuple[np.ndarray, int, float]) -> None:
        widths, stage, accuracy = snapshot
        self._set_state(widths.copy(), stage, accuracy)

    def prunable_mask(self) -> np.ndarray:
        mask = self.group_widths > self.min_channels
        mask[list(self.unprunable)] = False
        return mask

    def stage_importance(self) -> list[np.ndarray]:
        # Channel c of group g: (c + 1) / width * scale_g, i.e. a known order within and across groups.
        return [
            (np.arange(w, dtype=np.float64) + 1.0) / w * s
            for w, s in zip(self.group_widths, self.importance_scale, strict=True)
        ]

    # -- maths ----------------------------------------------------------------------------------------

    def _distribution(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape or not np.all(np.isfinite(action)):
            raise ValueError(f"bad action {action!r}")
        mask = self.prunable_mask()
        p = np.where(mask, np.maximum(action, 0.0), 0.0)
        if p.sum() <= 0.0:
            p = mask.astype(np.float64)
        return p / p.sum()

    def _allocate(self, p: np.ndarray) -> np.ndarray:
        """Largest-remainder split of the budget, capped by what each group can give."""
        room = np.maximum(self.group_widths - self.min_channels, 0)
        room[list(self.unprunable)] = 0
        budget = min(self.stage_budget, int(room.sum()))
        exact = p * budget
        counts = np.minimum(np.floor(exact).astype(np.int64), room)
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        while counts.sum() < budget:
            progressed = False
            for g in order:
                if counts.sum() >= budget:
                    break
                if counts[g] < room[g]:
                    counts[g] += 1
                    progressed = True
            if not progressed:
                break
        return counts

    def _accuracy(self, p: np.ndarray) -> float:
        # Mild enough that no ordinary stage trips the collapse guard (a 10 % relative drop).
        accuracy = 1.0 - 0.1 * float(np.abs(p - self.target).sum())
        if self.collapse_stage is not None and self.stage == self.collapse_stage:
            accuracy *= 0.5
        return accuracy

    def _ratios(self, widths: np.ndarray) -> dict[str, Any]:
        w0 = self.initial_group_widths.astype(np.float64)
        w = widths.astype(np.float64)
        return {
            "macs_ratio": float((w**2).sum() / (w0**2).sum()),
            "params_ratio": float((w**2).sum() / (w0**2).sum()),
            "sparsity": float(1.0 - w.sum() / w0.sum()),
        }

    def _obs(self) -> np.ndarray:
        w0 = self.initial_group_widths.astype(np.float64)
        r = self._ratios(self.group_widths)
        group_sparsity = 1.0 - self.group_widths / w0
        extra = [r["sparsity"], r["macs_ratio"], r["params_ratio"], self.last_accuracy]
        return np.concatenate([group_sparsity, extra]).astype(np.float32)

    # -- API ----------------------------------------------------------------------------------------------

    def evaluate(self, action: np.ndarray) -> tuple[float, dict[str, Any]]:
        self.num_evaluations += 1
        p = self._distribution(action)
        widths = self.group_widths - self._allocate(p)
        accuracy = self._accuracy(p)
        info = {"accuracy": accuracy, "stage": self.stage, "widths": widths, **self._ratios(widths)}
        return accuracy, info

    def evaluate_many(self, actions: list[np.ndarray]) -> list[tuple[float, dict[str, Any]]]:
        return [self.evaluate(a) for a in actions]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._set_state(self.initial_group_widths.copy(), 0, 1.0)
        return self._obs(), {}

    def step(self, action: np.ndarray):
        p = self._distribution(action)
        accuracy = self._accuracy(p)
        widths = self.group_widths - self._allocate(p)
        self._set_state(widths, self.stage + 1, accuracy)
        terminated = self.stage >= self.num_stages
        info = {"accuracy": accuracy, "stage": self.stage, "widths": widths.copy(), **self._ratios(widths)}
        return self._obs(), accuracy, terminated, False, info
