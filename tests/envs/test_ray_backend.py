"""RayEvaluator of PruneEnv.evaluate_many: same rewards as serial, one model refresh per stage."""

import importlib.util

import numpy as np
import pytest

from keepgym.envs.data import load_dataset
from keepgym.envs.evaluators import SerialEvaluator, make_evaluator
from keepgym.envs.prune_env import PruneEnv

HAS_RAY = importlib.util.find_spec("ray") is not None


def _env(**kwargs) -> PruneEnv:
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
        **kwargs,
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

    from keepgym.envs.ray_backend import RayEvaluator

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serial_eval, ray_eval = SerialEvaluator(), make_evaluator("ray", workers=2)
    assert isinstance(ray_eval, RayEvaluator)
    env = _env(evaluator=ray_eval)
    assert env.evaluator is ray_eval

    def both(actions: list[np.ndarray]) -> tuple[list, list]:
        env.evaluator = serial_eval
        serial = env.evaluate_many(actions)
        env.evaluator = ray_eval
        return serial, env.evaluate_many(actions)

    try:
        actions = _actions(env, 6, seed=1)
        serial, par = both(actions)
        assert [r for r, _ in par] == [r for r, _ in serial]
        assert [_strip(i) for _, i in par] == [_strip(i) for _, i in serial]
        assert len(set(ray.get([a.pid.remote() for a in ray_eval.actors]))) == 2  # two real actors
        # same stage again: no new model shipped
        env.evaluate_many(actions[:3])
        assert ray_eval.refreshes == 1
        # a committed stage changes the model: shipped once more, still identical to serial
        env.step(actions[0])
        nxt = _actions(env, 6, seed=2)
        serial2, par2 = both(nxt)
        assert [r for r, _ in par2] == [r for r, _ in serial2]
        assert ray_eval.refreshes == 2 and ray_eval.version == 2
        # adaptive-BN scoring: the stage's BN calibration images are shipped too, rewards still identical
        env.candidate_scoring = "adaptive_bn"
        serial3, par3 = both(nxt)
        assert [r for r, _ in par3] == [r for r, _ in serial3] != [r for r, _ in serial2]
        assert ray_eval.refreshes == 3
        # env.close() closes the injected evaluator: its actors are gone
        env.close()
        assert ray_eval.actors == []
    finally:
        ray_eval.close()
        ray.shutdown()


def test_ray_evaluator_without_ray_explains_install(monkeypatch):
    import sys

    import keepgym.envs.ray_backend as rb

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[ray\]"):
        make_evaluator("ray", workers=2)
    env = _env(evaluator=rb.RayEvaluator(workers=2))  # built without Ray; fails at first use, same message
    with pytest.raises(ImportError, match=r"pip install -e \.\[ray\]"):
        env.evaluate_many(_actions(env, 2, seed=0))


def test_bench_ray_without_ray_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    import sys

    from keepgym.experiments.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["bench", "ray", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -e .[ray]" in err
