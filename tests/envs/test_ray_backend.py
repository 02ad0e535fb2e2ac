"""Ray backend of PruneEnv.evaluate_many: same rewards as serial, one model refresh per stage."""

import importlib.util

import numpy as np
import pytest

from keepgym.envs.data import load_dataset
from keepgym.envs.prune_env import PruneEnv

HAS_RAY = importlib.util.find_spec("ray") is not None


def _env() -> PruneEnv:
    data = load_dataset("synthetic", val_size=60, train_size=120, test_size=10, num_classes=4, image_size=16)
    env = PruneEnv(
        model_name="vgg11",
        dataset="synthetic",
        data=data,
        pretrained=False,
        width_mult=0.125,
        stage_sparsity=0.1,
        target_sparsity=0.5,
        calibration_size=16,
        batch_size=32,
    )
    env.reset(seed=0)
    return env


def _actions(env: PruneEnv, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.dirichlet(np.ones(env.num_groups)).astype(np.float32) for _ in range(n)]


def _strip(info: dict) -> dict:
    return {k: v for k, v in info.items() if k != "wall_times"}


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install -e .[ray])")
def test_ray_matches_serial_and_refreshes_once_per_stage():
    import ray

    from keepgym.envs.ray_backend import register_ray_backend

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    backend = register_ray_backend(workers=2)
    try:
        env = _env()
        actions = _actions(env, 6, seed=1)
        serial = env.evaluate_many(actions)
        par = env.evaluate_many(actions, backend="ray", workers=2)
        assert [r for r, _ in par] == [r for r, _ in serial]
        assert [_strip(i) for _, i in par] == [_strip(i) for _, i in serial]
        assert len(set(ray.get([a.pid.remote() for a in backend._actors]))) == 2  # two real actors
        # same stage again: no new model shipped
        env.evaluate_many(actions[:3], backend="ray")
        assert backend.refreshes == 1
        # a committed stage changes the model: shipped once more, still identical to serial
        env.step(actions[0])
        nxt = _actions(env, 6, seed=2)
        serial2 = env.evaluate_many(nxt)
        par2 = env.evaluate_many(nxt, backend="ray", workers=2)
        assert [r for r, _ in par2] == [r for r, _ in serial2]
        assert backend.refreshes == 2 and backend.version == 2
        # adaptive-BN scoring: the stage's BN calibration images are shipped too, rewards still identical
        env.candidate_scoring = "adaptive_bn"
        serial3 = env.evaluate_many(nxt)
        par3 = env.evaluate_many(nxt, backend="ray", workers=2)
        assert [r for r, _ in par3] == [r for r, _ in serial3] != [r for r, _ in serial2]
        assert backend.refreshes == 3
    finally:
        backend.shutdown()
        ray.shutdown()


def test_ray_backend_without_ray_explains_install(monkeypatch):
    import sys

    import keepgym.envs.ray_backend as rb
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    env = _env()
    with pytest.raises(ImportError, match=r"pip install -e \.\[ray\]"):
        env.evaluate_many(_actions(env, 2, seed=0), backend="ray")
    with pytest.raises(ImportError, match="pip install"):
        rb.register_ray_backend()
