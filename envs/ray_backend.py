"""Ray backend of :meth:`keepgym.envs.prune_env.PruneEnv.evaluate_many`: candidates scored by an ``ActorPool``.

RL-Pruner's search (arXiv 2411.06463) scores ``K x E`` candidate allocations per stage, each one a
forward pass of the masked model over the validation images. :class:`RayBackend` spreads them over
a Ray ``ActorPool`` of evaluator actors. Every actor holds its own copy of the current (pruned) model,
the validation tensors and the stage's channel ranking; they are shipped once per stage (whenever
the env prepared a new stage: ``reset``, ``step``, ``model_changed``, ``restore``), not once per
candidate. The driver allocates each candidate (``env.allocate``), an actor masks and evaluates it
exactly as :meth:`PruneEnv.evaluate` does, and the driver assembles ``(reward, info)``, so rewards are
identical to the ``serial`` backend's for the same candidates (same device and thread count).

Use it with ``env.evaluate_many(actions, backend="ray", workers=N)`` (local Ray, started on first
use) or, for a cluster, register a configured backend first::

    from keepgym.envs.ray_backend import register_ray_backend
    register_ray_backend(address="ray://head:10001", num_gpus=0.25)   # 4 evaluators per GPU
    env.evaluate_many(actions, backend="ray", workers=16)

Ray is an optional extra: ``pip install -e .[ray]``. On a cluster every node needs keepgym installed
(or pass ``init_kwargs={"runtime_env": {...}}``).

:func:`benchmark_ray_search` times one stage of candidate search, serial vs Ray.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from keepgym.envs.prune_env import (
    PruneEnv,
    WallTimes,
    _accuracy,
    _classifier,
    adaptive_bn,
    register_evaluate_backend,
)
from keepgym.envs.pruning import GroupPruner

__all__ = ["RAY_INSTALL_HINT", "RayBackend", "benchmark_ray_search", "register_ray_backend"]

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = (
    "the 'ray' evaluation backend needs Ray, which is an optional extra: "
    "pip install -e .[ray]   (or: pip install 'ray[default]>=2.9')"
)


# --------------------------------------------------------------------------- helpers
def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(RAY_INSTALL_HINT) from exc
    return ray


class _Evaluator:
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
        scores: list[torch.Tensor],
        input_size: tuple[int, ...],
        batch_size: int,
        bn_x: torch.Tensor | None = None,
    ) -> list[int]:
        """Take this stage's model and ranking; returns the group widths (checked by the driver).

        ``bn_x``: the stage's BatchNorm calibration images for ``adaptive_bn`` scoring (None: vanilla).
        """
        self.model = model.to(self.device).eval()
        example = torch.zeros(input_size, device=self.device)
        self.pruner = GroupPruner(self.model, example, ignored_layers=[_classifier(self.model)])
        self.pruner.set_ranking(scores)
        self.val = (val_x.to(self.device), val_y.to(self.device))
        self.bn_x = None if bn_x is None else bn_x.to(self.device)
        self.batch_size = batch_size
        self.version = version
        return [int(w) for w in self.pruner.widths]

    def score(self, version: int, counts: np.ndarray) -> tuple[float, float]:
        """Validation accuracy with ``counts`` channels masked (see ``PruneEnv.evaluate``) and seconds."""
        if version != self.version:
            raise RuntimeError(f"evaluator holds stage version {self.version}, asked for {version}")
        t0 = time.perf_counter()
        with self.pruner.masked(counts):
            if self.bn_x is None:
                acc = _accuracy(self.model, *self.val, self.batch_size)
            else:
                with adaptive_bn(self.model, self.bn_x, self.batch_size):
                    acc = _accuracy(self.model, *self.val, self.batch_size)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return acc, time.perf_counter() - t0

    def pid(self) -> int:
        import os

        return os.getpid()


# --------------------------------------------------------------------------- the backend
class RayBackend:
    """Score :class:`PruneEnv` candidates on a Ray ``ActorPool`` (configured by :func:`register_ray_backend`).

    Called as ``backend(env, actions, workers)`` by ``env.evaluate_many(..., backend="ray")``. The
    pool is created on first use and kept; it is rebuilt only when ``workers`` changes. Before
    scoring, the actors' state is refreshed if the env has prepared a new stage since the last call
    (tracked by object identity of the env, its model, ranking and validation tensors; each refresh
    bumps :attr:`version`).

    Args:
        address: Ray cluster address for ``ray.init(address=...)``; None starts (or reuses) a local Ray.
        workers: default number of evaluator actors when ``evaluate_many`` gets ``workers=None``
            (None: as many as the cluster's CPUs, or GPUs / ``num_gpus``, allow).
        num_cpus: CPUs reserved per actor (also its torch thread count when whole).
        num_gpus: GPUs per actor; fractional values share a GPU (0.25 = four evaluators per GPU).
            With ``num_gpus > 0`` actors evaluate on ``cuda``, otherwise on ``cpu``.
        init_kwargs: extra ``ray.init`` keyword arguments (e.g. ``runtime_env``).
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        init_kwargs: dict | None = None,
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if num_cpus < 0 or num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")
        self.address = address
        self.workers = workers
        self.num_cpus = float(num_cpus)
        self.num_gpus = float(num_gpus)
        self.init_kwargs = dict(init_kwargs or {})
        self.version = 0
        self.refreshes = 0
        self._actors: list = []
        self._pool = None
        self._key: tuple | None = None
        self._started_ray = False

    # ------------------------------------------------------------------ lifecycle
    def _ray(self) -> Any:
        ray = _import_ray()
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
        if self._pool is not None and len(self._actors) == workers:
            return
        self.close_actors()
        from ray.util import ActorPool

        remote_cls = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(_Evaluator)
        device = "cuda" if self.num_gpus > 0 else "cpu"
        threads = int(self.num_cpus) if self.num_cpus >= 1 and float(self.num_cpus).is_integer() else None
        self._actors = [remote_cls.remote(device, threads) for _ in range(workers)]
        self._pool = ActorPool(self._actors)
        self._key = None
        logger.info("ray: %d evaluator actors (%s CPU, %s GPU each)", workers, self.num_cpus, self.num_gpus)

    def close_actors(self) -> None:
        """Kill the evaluator actors (a later call starts new ones)."""
        if self._actors:
            ray = _import_ray()
            for actor in self._actors:
                ray.kill(actor)
        self._actors, self._pool, self._key = [], None, None

    def shutdown(self) -> None:
        """Kill the actors and, if this backend started Ray, stop it."""
        self.close_actors()
        if self._started_ray:
            _import_ray().shutdown()
            self._started_ray = False

    # ------------------------------------------------------------------ stage refresh
    def _refresh(self, ray: Any, env: PruneEnv) -> None:
        # A new stage (reset/step/model_changed/restore) always makes a new ranking list, and a
        # reset new validation tensors; holding the objects keeps their identities from being reused.
        # The BatchNorm calibration batch is one tensor per stage (None with vanilla scoring), so a change
        # of ``env.candidate_scoring`` also ships the stage again.
        bn_x = env.bn_calibration_batch()
        key = (env, env.model, env._scores, env._val, bn_x)
        if self._key is not None and all(a is b for a, b in zip(key, self._key, strict=True)):
            return
        self.version += 1
        model = copy.deepcopy(env.model).cpu().eval()
        val_x, val_y = (t.detach().cpu() for t in env._val)
        refs = [
            ray.put(model),
            ray.put(val_x),
            ray.put(val_y),
            ray.put([s.detach().cpu() for s in env._scores]),
        ]
        bn_ref = None if bn_x is None else ray.put(bn_x.detach().cpu())
        widths = ray.get(
            [
                a.load.remote(self.version, *refs, tuple(env.input_size), env.batch_size, bn_ref)
                for a in self._actors
            ]
        )
        expected = [int(w) for w in env.group_widths]
        if any(w != expected for w in widths):
            raise RuntimeError("an evaluator rebuilt different coupling groups than the env's")
        self._key = key
        self.refreshes += 1

    # ------------------------------------------------------------------ scoring
    def __call__(
        self, env: PruneEnv, actions: list[np.ndarray], workers: int | None
    ) -> list[tuple[float, dict]]:
        """Score validated ``actions`` on ``env``'s current stage; one ``(reward, info)`` per action."""
        env = env.unwrapped if hasattr(env, "unwrapped") else env
        if env._terminated:
            raise RuntimeError("the episode is over (target sparsity reached); call reset()")
        ray = self._ray()
        workers = workers or self.workers or self._default_workers(ray)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        counts = [env.allocate(a) for a in actions]
        if not counts:
            return []
        self._ensure_pool(ray, workers)
        self._refresh(ray, env)
        version = self.version
        scored = list(self._pool.map(lambda actor, c: actor.score.remote(version, c), counts))
        return [
            env.candidate_result(c, acc, WallTimes(eval_s=eval_s, total_s=eval_s))
            for c, (acc, eval_s) in zip(counts, scored, strict=True)
        ]


def register_ray_backend(
    address: str | None = None,
    workers: int | None = None,
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    init_kwargs: dict | None = None,
    name: str = "ray",
) -> RayBackend:
    """Make ``evaluate_many(backend=name)`` use a :class:`RayBackend` with these settings.

    Needs Ray (raises ``ImportError`` with the install command otherwise). The backend it replaces
    is shut down. Returns the new backend (call ``.shutdown()`` when done).
    """
    _import_ray()
    from keepgym.envs import prune_env

    old = prune_env._EVALUATE_BACKENDS.get(name)
    if isinstance(old, RayBackend):
        old.close_actors()
    backend = RayBackend(address, workers, num_cpus=num_cpus, num_gpus=num_gpus, init_kwargs=init_kwargs)
    register_evaluate_backend(name, backend)
    return backend


# --------------------------------------------------------------------------- benchmark
def benchmark_ray_search(workers: int = 2, candidates: int = 20, quick: bool = False) -> dict:
    """Wall time of one stage of candidate search, ``serial`` vs ``ray`` with ``workers`` actors.

    VGG-11 (width 0.5; 0.25 with ``quick``) with random weights on 500 (200) synthetic validation
    images, ``candidates`` (6 with ``quick``) seeded random allocations. The Ray pool is warmed on a
    first call (Ray start, actor start, model shipping: ``ray_startup_s``); ``serial_s`` and ``ray_s``
    are the best of two calls over the same candidates, taken alternately; ``serial_one_thread_s`` is
    the serial search with one torch thread. ``ray_refresh_s`` is a call right after a ``step``
    (includes shipping the new stage's model to every actor). The ``serial`` search uses torch's
    default thread count, each actor one thread.

    Returns:
        ``serial_s``, ``serial_one_thread_s``, ``ray_s``, ``speedup`` (serial / ray),
        ``speedup_vs_one_thread``, ``ray_startup_s``, ``ray_refresh_s``, ``identical`` (Ray rewards ==
        serial rewards), settings and ``cpu_count``.
    """
    import os

    from keepgym.envs.data import load_dataset

    _import_ray()  # fail early with the install hint
    width, n_val, n_cand = (0.25, 200, min(candidates, 6)) if quick else (0.5, 500, candidates)
    data = load_dataset("synthetic", val_size=n_val, train_size=n_val + 300, test_size=50)
    env = PruneEnv(
        model_name="vgg11",
        dataset="synthetic",
        data=data,
        pretrained=False,
        width_mult=width,
        stage_sparsity=0.05,
        calibration_size=32,
        batch_size=250,
    )
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = [rng.dirichlet(np.ones(env.num_groups)).astype(np.float32) for _ in range(n_cand)]
    checked = [np.asarray(a, dtype=np.float64) for a in actions]

    def timed(fn: Any) -> tuple[float, Any]:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    def serial_one_thread() -> list:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return env.evaluate_many(actions)
        finally:
            torch.set_num_threads(threads)

    backend = RayBackend(workers=workers)
    try:
        # serial and Ray timed alternately (best of two each), so a load spike from other jobs on a
        # shared machine hits both rather than one
        serial_a, serial = timed(lambda: env.evaluate_many(actions))
        startup_s, _ = timed(lambda: backend(env, checked, workers))
        ray_a, par = timed(lambda: backend(env, checked, workers))
        serial_b, _ = timed(lambda: env.evaluate_many(actions))
        ray_b, _ = timed(lambda: backend(env, checked, workers))
        serial_1t, _ = timed(serial_one_thread)
        env.step(actions[0])
        refresh_s, _ = timed(lambda: backend(env, checked, workers))
    finally:
        backend.shutdown()
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


register_evaluate_backend("ray", RayBackend())
