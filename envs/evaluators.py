"""Candidate evaluators of :meth:`keepgym.envs.prune_env.PruneEnv.evaluate_many`.

RL-Pruner's search (arXiv 2411.06463) scores many candidate stage allocations per stage without
committing them. ``PruneEnv.evaluate_many(actions)`` checks and allocates every action, then hands the
channel counts to its injected :class:`Evaluator` (``PruneEnv(evaluator=...)`` or the ``env.evaluator``
attribute), in the manner of sb3-contrib ARS's ``AsyncEval``:

* :class:`SerialEvaluator` (the default) scores them one after another in the env's own process;
* ``RayEvaluator`` (:mod:`keepgym.envs.ray_backend`, the ``ray`` extra) spreads them over a Ray
  ``ActorPool``.

:func:`make_evaluator` builds one by name (what the CLI's ``--backend`` selects)::

    env = PruneEnv(..., evaluator=make_evaluator("ray", workers=4))
    results = env.evaluate_many(actions)   # one (reward, info) per action, in order
    env.close()                            # closes the evaluator too

An evaluator reads the env only through its public API (``evaluate_allocation``, ``scoring_inputs``,
``candidate_result``, ``group_widths``), never its private state. This module imports no env, so the
env can import it; the Ray evaluator is imported only when asked for.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

if TYPE_CHECKING:  # annotations only: prune_env imports this module
    from keepgym.envs.prune_env import PruneEnv

__all__ = ["EVALUATORS", "CountingEvaluator", "Evaluator", "ScoringInputs", "SerialEvaluator", "make_evaluator"]

#: Names :func:`make_evaluator` accepts.
EVALUATORS = ("serial", "ray")
_RAY_OPTIONS = frozenset({"address", "num_cpus", "num_gpus", "init_kwargs"})


@dataclass(frozen=True, eq=False)
class ScoringInputs:
    """What scoring a candidate of the env's current stage needs (``PruneEnv.scoring_inputs()``).

    The tensors and the model are the env's own objects, not copies: read them, never modify them.
    Their identities change whenever the env prepares a new stage (``reset``, ``step``,
    ``model_changed``, ``restore``), so an evaluator that ships them elsewhere can tell when to ship again.

    Attributes:
        model: the current (pruned) model, in eval mode while scoring.
        val_x: normalised validation images every candidate is scored on.
        val_y: their labels.
        ranking: per-group channel importance of this stage (the order in which channels go).
        bn_x: normalised BatchNorm calibration images under ``candidate_scoring="adaptive_bn"``, else None.
        calib_x: normalised calibration images the ranking was computed from (training split).
        calib_y: their labels.
        input_size: ``(1, C, H, W)`` of one input, for rebuilding the coupling groups.
        batch_size: evaluation batch size.
        criterion: the importance criterion (``taylor``, ``l1``, ``l2``, ``random``).
    """

    model: nn.Module
    val_x: torch.Tensor
    val_y: torch.Tensor
    ranking: list[torch.Tensor]
    bn_x: torch.Tensor | None
    calib_x: torch.Tensor
    calib_y: torch.Tensor
    input_size: tuple[int, ...]
    batch_size: int
    criterion: str


class Evaluator(abc.ABC):
    """Scores candidate allocations of a :class:`~keepgym.envs.prune_env.PruneEnv`'s current stage.

    Subclasses implement :meth:`evaluate_many`; :meth:`close` releases what they hold (processes,
    actors). An evaluator is a context manager that closes itself on exit.
    """

    @abc.abstractmethod
    def evaluate_many(
        self, env: PruneEnv, counts: list[np.ndarray], images: slice | None = None
    ) -> list[tuple[float, dict]]:
        """Score already allocated candidates; must leave ``env`` exactly as it was.

        Args:
            env: the (unwrapped) env, started and not terminated.
            counts: per candidate, the channels each group would lose (``env.allocate(action)``).
            images: score on these positions of ``env.scoring_order()`` only (racing); None = all images.
                An evaluator that cannot raises ``ValueError``.

        Returns:
            One ``(reward, info)`` per candidate, in order, equal to ``env.evaluate_allocation(c)``'s.
        """

    def close(self) -> None:
        """Release resources; a later :meth:`evaluate_many` may start them again."""
        return None  # nothing to release by default

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SerialEvaluator(Evaluator):
    """Scores candidates one after another in the env's process (``env.evaluate_allocation``)."""

    def evaluate_many(
        self, env: PruneEnv, counts: list[np.ndarray], images: slice | None = None
    ) -> list[tuple[float, dict]]:
        return [env.evaluate_allocation(c, images=images) for c in counts]

    def __repr__(self) -> str:
        return "SerialEvaluator()"


class CountingEvaluator(Evaluator):
    """Wraps another evaluator and counts the candidates it scores (equal-budget comparisons).

    ``env.evaluator = CountingEvaluator(env.evaluator)``; :attr:`count` then grows by one per candidate
    of every ``env.evaluate_many`` call. :meth:`close` closes the wrapped evaluator.

    Args:
        inner: the evaluator that does the scoring.
    """

    def __init__(self, inner: Evaluator) -> None:
        self.inner = inner
        #: candidates scored so far
        self.count = 0

    def evaluate_many(
        self, env: PruneEnv, counts: list[np.ndarray], images: slice | None = None
    ) -> list[tuple[float, dict]]:
        results = self.inner.evaluate_many(env, counts, images=images)
        self.count += len(counts)
        return results

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"CountingEvaluator({self.inner!r})"


def make_evaluator(name: str = "serial", workers: int | None = None, **kwargs: Any) -> Evaluator:
    """Build the evaluator called ``name``.

    Args:
        name: ``"serial"`` (:class:`SerialEvaluator`) or ``"ray"`` (``keepgym.envs.ray_backend.RayEvaluator``,
            needs ``pip install -e .[ray]``).
        workers: number of parallel evaluators (``ray``; None = as many as the cluster allows). ``serial``
            accepts only None or 1.
        **kwargs: further ``RayEvaluator`` arguments (``address``, ``num_cpus``, ``num_gpus``,
            ``init_kwargs``); none for ``serial``.

    Raises:
        ValueError: unknown name, bad ``workers`` or arguments the evaluator does not take.
        ImportError: ``ray`` without Ray installed (the message gives the install command).
    """
    if workers is not None and (int(workers) != workers or workers < 1):
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if name == "serial":
        if workers not in (None, 1):
            raise ValueError(f"the serial evaluator scores one candidate at a time; got workers={workers} (use 'ray')")
        if kwargs:
            raise ValueError(f"the serial evaluator takes no options, got {', '.join(sorted(kwargs))}")
        return SerialEvaluator()
    if name == "ray":
        unknown = set(kwargs) - _RAY_OPTIONS
        if unknown:
            raise ValueError(
                f"unknown ray evaluator option(s) {', '.join(sorted(unknown))}; valid: "
                f"{', '.join(sorted(_RAY_OPTIONS))}"
            )
        from keepgym.envs.ray_backend import RayEvaluator, require_ray

        require_ray()  # fail now, with the install command, rather than at the first search
        return RayEvaluator(workers=workers, **kwargs)
    raise ValueError(f"unknown evaluator {name!r}; valid: {', '.join(EVALUATORS)}")
