"""Ray evaluator of :meth:`keepgym.envs.prune_env.PruneEnv.evaluate_many`: candidates scored by an ``ActorPool``.

RL-Pruner's search (arXiv 2411.06463) scores ``K x E`` candidate allocations per stage, each one a
forward pass of the masked model over the validation images. :class:`RayEvaluator` spreads them over
a Ray ``ActorPool`` of scoring actors. Every actor holds its own copy of the current (pruned) model,
the validation tensors and the stage's channel ranking (``env.scoring_inputs()``); they are shipped
once per stage (whenever the env prepared a new stage: ``reset``, ``step``,
``restore``), not once per candidate. The env allocates each candidate, an actor masks and scores it
exactly as :meth:`PruneEnv.evaluate_allocation` does, and the env assembles ``(reward, info)``
(``env.candidate_result``), so rewards are identical to the serial evaluator's for the same candidates
(same device and thread count).

Inject it into the env (local Ray is started on first use)::

    from keepgym.envs.evaluators import make_evaluator
    env = PruneEnv(..., evaluator=make_evaluator("ray", workers=4))
    # a cluster: make_evaluator("ray", workers=16, address="ray://head:10001", num_gpus=0.25)
    env.evaluate_many(actions)
    env.close()   # kills the actors (and stops Ray if this evaluator started it)

Ray is an optional extra: ``pip install -e .[ray]``. On a cluster every node needs keepgym installed
(or pass ``init_kwargs={"runtime_env": {...}}``).

:func:`benchmark_ray_search` times one stage of candidate search, serial vs Ray.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from keepgym.envs.evaluators import Evaluator, SerialEvaluator
from keepgym.envs.prune_env import PruneEnv, WallTimes, accuracy, adaptive_bn
from keepgym.envs.pruning import GroupPruner
from keepgym.models import get_classifier

__all__ = ["RAY_INSTALL_HINT", "RayEvaluator", "benchmark_ray_search", "require_ray"]

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = (
    "the 'ray' evaluator needs Ray, which is an optional extra: "
    "pip install -e .[ray]   (or: pip install 'ray[default]>=2.9')"
)


def require_ray() -> Any:
    """The ``ray`` module; ``ImportError`` with the install command when Ray is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(RAY_INSTALL_HINT) from exc
    return ray


# --------------------------------------------------------------------------- the actor
class _ScoringActor:
    """What runs inside one Ray actor: a model copy, the validation tensors and the stage ranking."""

    def __init__(self, device: str, num_threads: int | None) -> None:
        self.device = torch.device(device)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.version = -1
        self.model: nn.Module | None = None
        self.pruner: GroupPruner | None = None
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None
        self.bn_x: torch.Tensor | None = None
        self.batch_size = 256

    def load(
        self,
        version: int,
        model: nn.Module,
        val_x: torch.Tensor,
        val_y: torch.Tensor,
        ranking: list[torch.Tensor],
        input_size: tuple[int, ...],
        batch_size: int,
        bn_x: torch.Tensor | None = None,
    ) -> list[int]:
        """Take this stage's model and ranking; returns the group widths (checked by the driver).

        ``bn_x``: the stage's BatchNorm calibration images for ``adaptive_bn`` scoring (None: vanilla).
        """
        self.model = model.to(self.device).eval()
        example = torch.zeros(input_size, device=self.device)
        self.pruner = GroupPruner(self.model, example, ignored_layers=[get_classifier(self.model)])
        self.pruner.set_ranking(ranking)
        self.val = (val_x.to(self.device), val_y.to(self.device))
        self.bn_x = None if bn_x is None else bn_x.to(self.device)
        self.batch_size = batch_size
        self.version = version
        return [int(w) for w in self.pruner.widths]

    def score(self, version: int, counts: np.ndarray) -> tuple[float, float]:
        """Validation accuracy with ``counts`` channels masked (see ``PruneEnv.evaluate``) and seconds."""
        if version != self.version:
            raise RuntimeError(f"scoring actor holds stage version {self.version}, asked for {version}")
        t0 = time.perf_counter()
        with self.pruner.masked(counts):
            if self.bn_x is None:
                acc = accuracy(self.model, *self.val, self.batch_size)
            else:
                with adaptive_bn(self.model, self.bn_x, self.batch_size):
                    acc = accuracy(self.model, *self.val, self.batch_size)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return acc, time.perf_counter() - t0

    def pid(self) -> int:
        return os.getpid()


# --------------------------------------------------------------------------- the evaluator
class RayEvaluator(Evaluator):
    """Score :class:`PruneEnv` candidates on a Ray ``ActorPool`` (``env.evaluator``; see the module doc).

    Ray is started (or joined) and the pool created on the first :meth:`evaluate_many`, then kept.
    Before scoring, the actors' state is refreshed if the env has prepared a new stage since the last
    call (tracked by object identity of the env and its ``scoring_inputs()``: model, ranking, validation
    and BatchNorm calibration tensors; each refresh bumps :attr:`version`).

    Args:
        workers: number of scoring actors (None: as many as the cluster's CPUs, or GPUs / ``num_gpus``, allow).
        address: Ray cluster address for ``ray.init(address=...)``; None starts (or reuses) a local Ray.
        num_cpus: CPUs reserved per actor (also its torch thread count when whole).
        num_gpus: GPUs per actor; fractional values share a GPU (0.25 = four actors per GPU).
            With ``num_gpus > 0`` actors score on ``cuda``, otherwise on ``cpu``.
        init_kwargs: extra ``ray.init`` keyword arguments (e.g. ``runtime_env``).
    """

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        init_kwargs: dict | None = None,
    ) -> None:
        if workers is not None and (int(workers) != workers or workers < 1):
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if num_cpus < 0 or num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {num_cpus} and {num_gpus}")
        self.workers = None if workers is None else int(workers)
        self.address = address
        self.num_cpus = float(num_cpus)
        self.num_gpus = float(num_gpus)
        self.init_kwargs = dict(init_kwargs or {})
        #: bumped whenever a new stage is shipped to the actors
        self.version = 0
        #: how many times the actors were sent a stage (model, tensors, ranking)
        self.refreshes = 0
        #: the Ray actor handles (empty until the first call and after :meth:`close`)
        self.actors: list = []
        self._pool = None
        self._key: tuple | None = None
        self._started_ray = False

    def __repr__(self) -> str:
        return (
            f"RayEvaluator(workers={self.workers}, address={self.address!r}, "
            f"num_cpus={self.num_cpus:g}, num_gpus={self.num_gpus:g})"
        )

    # ------------------------------------------------------------------ lifecycle
    def _ray(self) -> Any:
        ray = require_ray()
        if not ray.is_initialized():
            kwargs = dict(self.init_kwargs)
            if self.address is None:
                kwargs.setdefault("include_dashboard", False)
            ray.init(address=self.address, **kwargs)
            self._started_ray = True
            logger.info("ray started: %s", ray.cluster_resources())
        return ray

    def _default_workers(self, ray: Any) -> int:
        res = ray.cluster_resources()
        if self.num_gpus > 0:
            return max(1, int(res.get("GPU", 0) / self.num_gpus))
        return max(1, int(res.get("CPU", 1) / max(self.num_cpus, 1e-9)))

    def _ensure_pool(self, ray: Any, workers: int) -> None:
        if self._pool is not None and len(self.actors) == workers:
            return
        self.close_actors()
        from ray.util import ActorPool

        remote_cls = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(_ScoringActor)
        device = "cuda" if self.num_gpus > 0 else "cpu"
        threads = int(self.num_cpus) if self.num_cpus >= 1 and float(self.num_cpus).is_integer() else None
        self.actors = [remote_cls.remote(device, threads) for _ in range(workers)]
        self._pool = ActorPool(self.actors)
        self._key = None
        logger.info("ray: %d scoring actors (%s CPU, %s GPU each)", workers, self.num_cpus, self.num_gpus)

    def close_actors(self) -> None:
        """Kill the scoring actors (a later call starts new ones); Ray keeps running."""
        if self.actors:
            ray = require_ray()
            for actor in self.actors:
                ray.kill(actor)
        self.actors, self._pool, self._key = [], None, None

    def close(self) -> None:
        """Kill the actors and, if this evaluator started Ray, stop it."""
        self.close_actors()
        if self._started_ray:
            require_ray().shutdown()
            self._started_ray = False

    # ------------------------------------------------------------------ stage refresh
    def _refresh(self, ray: Any, env: PruneEnv) -> None:
        # A new stage (reset/step/restore) always makes a new ranking list, and a
        # reset new validation tensors; holding the objects keeps their identities from being reused.
        # The BatchNorm calibration batch is one tensor per stage (None with vanilla scoring), so a change
        # of ``env.candidate_scoring`` also ships the stage again.
        inputs = env.scoring_inputs()
        key = (env, inputs.model, inputs.ranking, inputs.val_x, inputs.val_y, inputs.bn_x)
        if self._key is not None and all(a is b for a, b in zip(key, self._key, strict=True)):
            return
        self.version += 1
        model = copy.deepcopy(inputs.model).cpu().eval()
        refs = [
            ray.put(model),
            ray.put(inputs.val_x.detach().cpu()),
            ray.put(inputs.val_y.detach().cpu()),
            ray.put([s.detach().cpu() for s in inputs.ranking]),
        ]
        bn_ref = None if inputs.bn_x is None else ray.put(inputs.bn_x.detach().cpu())
        widths = ray.get(
            [a.load.remote(self.version, *refs, inputs.input_size, inputs.batch_size, bn_ref) for a in self.actors]
        )
        expected = [int(w) for w in env.group_widths]
        if any(w != expected for w in widths):
            raise RuntimeError("a scoring actor rebuilt different coupling groups than the env's")
        self._key = key
        self.refreshes += 1

    # ------------------------------------------------------------------ scoring
    def evaluate_many(
        self, env: PruneEnv, counts: list[np.ndarray], images: slice | None = None
    ) -> list[tuple[float, dict]]:
        """Score allocated candidates of ``env``'s current stage; one ``(reward, info)`` per candidate."""
        if images is not None:
            raise ValueError("the Ray evaluator scores on all validation images; racing needs the serial evaluator")
        if not counts:
            return []
        ray = self._ray()
        self._ensure_pool(ray, self.workers or self._default_workers(ray))
        self._refresh(ray, env)
        version = self.version
        scored = list(self._pool.map(lambda actor, c: actor.score.remote(version, c), counts))
        return [
            env.candidate_result(c, acc, WallTimes(eval_s=eval_s, total_s=eval_s))
            for c, (acc, eval_s) in zip(counts, scored, strict=True)
        ]


# --------------------------------------------------------------------------- benchmark
def benchmark_ray_search(workers: int = 2, candidates: int = 20, quick: bool = False) -> dict:
    """Wall time of one stage of candidate search, serial vs :class:`RayEvaluator` with ``workers`` actors.

    VGG-11 (width 0.5; 0.25 with ``quick``) with random weights on 500 (200) synthetic validation
    images, ``candidates`` (6 with ``quick``) seeded random allocations. The Ray pool is warmed on a
    first call (Ray start, actor start, model shipping: ``ray_startup_s``); ``serial_s`` and ``ray_s``
    are the best of two calls over the same candidates, taken alternately; ``serial_one_thread_s`` is
    the serial search with one torch thread. ``ray_refresh_s`` is a call right after a ``step``
    (includes shipping the new stage's model to every actor). The serial search uses torch's
    default thread count, each actor one thread.

    Returns:
        ``serial_s``, ``serial_one_thread_s``, ``ray_s``, ``speedup`` (serial / ray),
        ``speedup_vs_one_thread``, ``ray_startup_s``, ``ray_refresh_s``, ``identical`` (Ray rewards ==
        serial rewards), settings and ``cpu_count``.
    """
    from keepgym.envs.data import load_dataset

    require_ray()  # fail early with the install hint
    width, n_val, n_cand = (0.25, 200, min(candidates, 6)) if quick else (0.5, 500, candidates)
    data = load_dataset("synthetic", val_size=n_val, train_size=n_val + 300, test_size=50)
    serial_eval, ray_eval = SerialEvaluator(), RayEvaluator(workers=workers)
    env = PruneEnv(
        model_name="vgg11",
        dataset="synthetic",
        data=data,
        pretrained=False,
        width_mult=width,
        stage_sparsity=0.05,
        calibration_size=32,
        batch_size=250,
        evaluator=serial_eval,
    )
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = [rng.dirichlet(np.ones(env.num_groups)).astype(np.float32) for _ in range(n_cand)]

    def timed(evaluator: Evaluator, threads: int | None = None) -> tuple[float, list]:
        env.evaluator = evaluator
        saved = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            out = env.evaluate_many(actions)
            return time.perf_counter() - t0, out
        finally:
            torch.set_num_threads(saved)

    try:
        # serial and Ray timed alternately (best of two each), so a load spike from other jobs on a
        # shared machine hits both rather than one
        serial_a, serial = timed(serial_eval)
        startup_s, _ = timed(ray_eval)
        ray_a, par = timed(ray_eval)
        serial_b, _ = timed(serial_eval)
        ray_b, _ = timed(ray_eval)
        serial_1t, _ = timed(serial_eval, threads=1)
        env.step(actions[0])
        refresh_s, _ = timed(ray_eval)
    finally:
        env.close()  # closes the Ray evaluator: it is env.evaluator now
        ray_eval.close()
    serial_s, ray_s = min(serial_a, serial_b), min(ray_a, ray_b)
    return {
        "model": f"vgg11_w{width:g}",
        "val_images": n_val,
        "candidates": n_cand,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "serial_s": serial_s,
        "serial_one_thread_s": serial_1t,
        "ray_s": ray_s,
        "speedup": serial_s / ray_s if ray_s > 0 else float("nan"),
        "speedup_vs_one_thread": serial_1t / ray_s if ray_s > 0 else float("nan"),
        "ray_startup_s": startup_s,
        "ray_refresh_s": refresh_s,
        "identical": [r for r, _ in serial] == [r for r, _ in par],
    }
