"""Tests of agents.callbacks.EnvInfoCallback on the closed-form toy pruning env (no model, CPU, a few s)."""

from __future__ import annotations

import csv

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from keepgym.agents.callbacks import EnvInfoCallback, read_tensorboard, render_group_sparsity
from keepgym.agents.rl_pruner import RLPruner

try:
    from tests.agents.toy_prune_env import ToyPruneEnv
except ImportError:  # pytest's rootdir-relative import when tests/ is not a package on sys.path
    from toy_prune_env import ToyPruneEnv

TOY_ID = "KeepgymToyPrune-v0"
if TOY_ID not in gym.registry:
    gym.register(TOY_ID, entry_point=ToyPruneEnv)

PPO_TINY = dict(n_steps=5, batch_size=5, n_epochs=1)


class _Recorder(gym.Wrapper):
    """Keeps every ``info`` the env returned from ``step``."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.infos: list[dict] = []

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.infos.append(dict(info))
        return obs, reward, terminated, truncated, info


def _only_run(tmp_path):
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return read_tensorboard(runs[0])


def _config_text(acc) -> str:
    return acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_vectorised_ppo_writes_one_point_per_step_equal_to_the_mean_of_the_env_infos(tmp_path):
    recorders = [_Recorder(gym.make(TOY_ID)) for _ in range(2)]
    venv = DummyVecEnv([lambda r=r: Monitor(r) for r in recorders])
    callback = EnvInfoCallback(config={"experiment": "toy", "sparsity": 0.5}, image_interval=3)
    model = PPO("MlpPolicy", venv, tensorboard_log=str(tmp_path), seed=0, **PPO_TINY)
    model.learn(40, callback=callback)
    acc = _only_run(tmp_path)

    points = acc.Scalars("env/accuracy")
    steps = len(recorders[0].infos)
    assert steps == 20 and len(recorders[1].infos) == 20
    assert [p.step for p in points] == [2 * (t + 1) for t in range(steps)]
    expected = [np.mean([r.infos[t]["accuracy"] for r in recorders]) for t in range(steps)]
    np.testing.assert_allclose([p.value for p in points], expected, rtol=1e-6)

    # 5 stages per toy episode: 4 episodes per env, each with its final figures.
    assert len(callback.episodes) == 8
    assert sorted(e["env"] for e in callback.episodes) == [0] * 4 + [1] * 4
    finals = [p.value for p in acc.Scalars("env/final_accuracy")]
    ends = [i["accuracy"] for r in recorders for t, i in enumerate(r.infos) if (t + 1) % 5 == 0]
    np.testing.assert_allclose(sorted(finals), sorted(ends), rtol=1e-6)

    # Per-group sparsity histogram against the env's initial widths, both envs pooled.
    w0 = recorders[0].unwrapped.initial_group_widths
    last = acc.Histograms("env/group_sparsity")[-1].histogram_value
    pooled = np.concatenate([1.0 - r.infos[-1]["widths"] / w0 for r in recorders])
    assert last.num == pooled.size and last.sum == pytest.approx(pooled.sum())
    assert last.min >= 0.0 and last.max <= 1.0
    # 8 episodes, an image every 3rd, plus one at the end of training.
    assert len(acc.Images("env/group_sparsity_image")) == 3
    assert {"train/value_loss", "rollout/ep_rew_mean"} <= set(acc.Tags()["scalars"])
    text = _config_text(acc)
    assert '"experiment": "toy"' in text and '"sparsity": 0.5' in text


def test_default_config_names_the_algorithm_its_hyperparameters_and_the_env(tmp_path):
    model = PPO(
        "MlpPolicy", gym.make(TOY_ID, num_stages=2), tensorboard_log=str(tmp_path), seed=3, **PPO_TINY
    )
    model.learn(5, callback=EnvInfoCallback())
    text = _config_text(_only_run(tmp_path))
    for needle in (
        '"algorithm": "PPO"',
        '"n_steps": 5',
        '"seed": 3',
        f'"env_id": "{TOY_ID}"',
        '"num_envs": 1',
    ):
        assert needle in text


def test_rlpruner_stage_loop_is_read_through_its_single_info(tmp_path):
    env = gym.make(TOY_ID, num_stages=4)
    model = RLPruner(
        "MlpPolicy", env, tensorboard_log=str(tmp_path), seed=0, sample_num=3, rounds_per_stage=1
    )
    callback = EnvInfoCallback()
    model.learn(8, callback=callback)
    acc = _only_run(tmp_path)
    history = [h["accuracy"] for h in model.history]
    np.testing.assert_allclose([p.value for p in acc.Scalars("env/accuracy")], history, rtol=1e-6)
    assert [p.step for p in acc.Scalars("env/accuracy")] == list(range(1, 9))
    assert [e["timestep"] for e in callback.episodes] == [4, 8]
    assert {"env/group_sparsity", "env/widths", "stage/distribution"} <= set(acc.Tags()["histograms"])


def test_without_tensorboard_the_text_outputs_get_the_averages(tmp_path):
    model = PPO("MlpPolicy", gym.make(TOY_ID), seed=0, **PPO_TINY)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(10, callback=EnvInfoCallback())
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert len(rows) == 3  # two rollouts, and the flush at the end of training
    values = [float(r["env/accuracy"]) for r in rows[:2]]
    assert rows[2]["train/value_loss"] != ""  # PPO's last update, written by the flush
    assert all(0.0 < v <= 1.0 for v in values)
    assert "env/group_sparsity" not in rows[0]  # histograms stay out of text outputs


def test_invalid_arguments_and_the_image_renderer():
    with pytest.raises(ValueError, match="log_interval"):
        EnvInfoCallback(log_interval=0)
    with pytest.raises(ValueError, match="image_interval"):
        EnvInfoCallback(image_interval=-1)
    image = render_group_sparsity([0.0, 0.5, 1.0], "t")
    assert image is not None and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_kept_patch_grid_dims_dropped_patches_and_frames_kept_ones():
    from keepgym.agents.callbacks import render_kept_patches

    images = np.full((2, 1, 8, 8), 200, dtype=np.uint8)  # 2 images of 2x2 patches of side 4
    grid = render_kept_patches(images, [[0], [1, 2, 3]], patch_size=4)
    scale = 64 // 8
    assert grid.shape == (2 * 8 * scale + 2, 2 * 8 * scale + 2, 3) and grid.dtype == np.uint8
    bottom = grid[8 * scale + 2 :]
    inside_kept = bottom[2 * scale, 2 * scale]  # image 0, patch 0 (kept): full brightness
    inside_dropped = bottom[2 * scale, 6 * scale]  # image 0, patch 1 (dropped): dimmed
    assert inside_kept.tolist() == [200, 200, 200] and inside_dropped[0] < 60
    assert bottom[0, 0].tolist() == [0, 255, 0]  # the kept patch's green frame


def test_hparams_are_flat_scalars():
    from keepgym.agents.callbacks import hparams_of

    flat = hparams_of({"alpha": 0.5, "env_kwargs": {"beta": 1, "ratios": (0.5, 1.0)}, "seed": None, "k": np.int64(3)})
    assert flat == {"alpha": 0.5, "env_kwargs.beta": 1, "env_kwargs.ratios": "[0.5, 1.0]", "seed": "None", "k": 3}


def test_progress_bar_names_what_it_counts():
    from stable_baselines3.common.callbacks import CallbackList

    from keepgym.agents.callbacks import NamedProgressBar, with_progress_bar

    info = EnvInfoCallback()
    for given in (None, info, [info], lambda _locals, _globals: True):
        wrapped = with_progress_bar(given, desc="RLPruner", unit="stage")
        assert isinstance(wrapped, CallbackList) and isinstance(wrapped.callbacks[-1], NamedProgressBar)
        assert (wrapped.callbacks[-1].desc, wrapped.callbacks[-1].unit) == ("RLPruner", "stage")
        assert len(wrapped.callbacks) == (1 if given is None else 2)
