"""Non-learning pruning baselines behind RLPruner's interface, so a comparison is one flag apart.

* :class:`UniformPruner`: every prunable group gives the same fraction of its current width per stage
  (the action is the current group widths, which the env's proportional split turns into equal fractions).
* :class:`GlobalPruner`: Torch-Pruning's *global* ranking (``global_pruning=True``): the per-channel
  importances of all groups (normalised within each group, ``env.unwrapped.stage_importance()``) are
  ranked together and the stage budget's ``M`` least important channels are removed, wherever they are.
  The action is the number of those channels in each group. With a compute target
  (``PruneEnv(target_macs=...)``/``target_params``) ``M`` is the shortest prefix of the global ranking
  whose removal meets the stage's MACs (params) goal (``env.stage_goal``, ``env.predict_cost``).

Both commit one stage per timestep with no search, log the same ``stage/*`` keys as :class:`RLPruner`
and keep the last committed distribution as their policy (what ``predict`` returns). They reach the raw
env exactly as :class:`RLPruner` does (``self.env.envs[0].unwrapped``; see ``agents/rl_pruner.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from keepgym.agents.rl_pruner import StagedPrunerBase, normalise_distribution

__all__ = ["GlobalPruner", "UniformPruner"]

logger = logging.getLogger(__name__)


def _stage_budget(raw: Any) -> int:
    """Channels per stage: ``env.stage_budget``, else ``round(stage_sparsity * sum(initial widths))``."""
    budget = getattr(raw, "stage_budget", None)
    if budget is not None:
        return int(budget)
    stage_sparsity = getattr(raw, "stage_sparsity", None)
    if stage_sparsity is not None:
        # Approximate when a group spans several layers; only the proportions of the action matter.
        return int(round(float(stage_sparsity) * float(np.sum(raw.initial_group_widths))))
    raise AttributeError(
        f"{type(raw).__name__} exposes neither stage_budget nor stage_sparsity: the global baseline "
        "cannot tell how many channels a stage removes"
    )


def _global_counts_to_goal(
    importances: list[np.ndarray], mask: np.ndarray, raw: Any, min_channels: int = 1
) -> np.ndarray:
    """Counts of the shortest prefix of the global ranking that meets the env's compute goal this stage.

    Bisection over the prefix length; costs come from ``raw.predict_cost(counts)`` (closed form).
    All offered channels if even they cannot meet the goal.
    """
    goal, k = int(raw.stage_goal), 0 if raw.compute_target == "macs" else 1
    offered = sum(
        max(np.asarray(imp).size - min_channels, 0) for imp, m in zip(importances, mask, strict=True) if m
    )

    def counts(n: int) -> np.ndarray:
        return _global_counts(importances, mask, n, min_channels)

    if offered == 0 or raw.predict_cost(counts(offered))[k] > goal:
        return counts(offered)
    lo, hi = 1, offered
    while lo < hi:
        mid = (lo + hi) // 2
        if raw.predict_cost(counts(mid))[k] <= goal:
            hi = mid
        else:
            lo = mid + 1
    return counts(lo)


def _global_counts(
    importances: list[np.ndarray], mask: np.ndarray, budget: int, min_channels: int = 1
) -> np.ndarray:
    """Per-group counts of the ``budget`` globally least important channels.

    A group offers at most ``len(importance) - min_channels`` channels (its least important ones) and
    groups outside ``mask`` offer none. Ties are broken by group then channel order (stable sort).
    """
    values, owners = [], []
    for g, importance in enumerate(importances):
        importance = np.asarray(importance, dtype=np.float64).reshape(-1)
        offer = max(importance.size - min_channels, 0) if mask[g] else 0
        if offer == 0:
            continue
        values.append(np.sort(importance, kind="stable")[:offer])
        owners.append(np.full(offer, g, dtype=np.int64))
    counts = np.zeros(len(importances), dtype=np.int64)
    if not values or budget <= 0:
        return counts
    all_values, all_owners = np.concatenate(values), np.concatenate(owners)
    chosen = np.argsort(all_values, kind="stable")[:budget]
    np.add.at(counts, all_owners[chosen], 1)
    return counts


class _FixedRulePruner(StagedPrunerBase):
    """A staged pruner whose per-stage action follows from the env's state by a fixed rule."""

    def _rule(self, raw: Any, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _plan_stage(self, raw: Any) -> tuple[np.ndarray, dict[str, Any]]:
        mask = np.asarray(raw.prunable_mask(), dtype=bool)
        if not mask.any():
            raise RuntimeError("no group can give channels any more, but the episode has not terminated")
        action = normalise_distribution(self._rule(raw, mask), mask)
        self.policy.set_distribution(action)
        return action.astype(np.float32), {"candidates": 0}


class UniformPruner(_FixedRulePruner):
    """Uniform baseline: each prunable group gives the same fraction of its current width per stage.

    Arguments: those of :class:`keepgym.agents.rl_pruner.StagedPrunerBase` (no hyperparameters of its own).
    """

    def _rule(self, raw: Any, mask: np.ndarray) -> np.ndarray:
        # Budget split proportionally to the widths = the same fraction from every group.
        return np.where(mask, np.asarray(raw.group_widths, dtype=np.float64), 0.0)


class GlobalPruner(_FixedRulePruner):
    """Global-ranking baseline (Torch-Pruning's ``global_pruning``) at the env's stage budget.

    Needs ``env.unwrapped.stage_importance()`` (per-group, per-channel importance of the current stage,
    normalised within each group) and ``stage_budget`` (else ``stage_sparsity``); respects the env's
    ``min_channels`` if it has one (default 1).

    Arguments: those of :class:`keepgym.agents.rl_pruner.StagedPrunerBase` (no hyperparameters of its own).
    """

    def _rule(self, raw: Any, mask: np.ndarray) -> np.ndarray:
        importances = list(raw.stage_importance())
        if len(importances) != mask.shape[0]:
            raise ValueError(
                f"stage_importance() returned {len(importances)} groups, expected {mask.shape[0]}"
            )
        min_channels = int(getattr(raw, "min_channels", 1))
        if getattr(raw, "stage_goal", None) is not None:  # a MACs/params target: rank until the goal is met
            counts = _global_counts_to_goal(importances, mask, raw, min_channels)
        else:
            counts = _global_counts(importances, mask, _stage_budget(raw), min_channels)
        if counts.sum() == 0:
            logger.warning("global ranking selected no channel; falling back to a uniform split")
            return mask.astype(np.float64)
        return counts.astype(np.float64)
