"""Tests of the uniform and global pruning baselines (agents.baselines) on the toy env."""

from __future__ import annotations

import numpy as np
import pytest

from keepgym.agents.baselines import GlobalPruner, UniformPruner, _global_counts, _stage_budget

try:
    from tests.agents.toy_prune_env import ToyPruneEnv
except ImportError:  # pytest's rootdir-relative import when tests/ is not a package on sys.path
    from toy_prune_env import ToyPruneEnv


def test_uniform_gives_the_same_fraction_from_every_prunable_group():
    env = ToyPruneEnv(widths=(100, 200, 400, 100), stage_budget=70, num_stages=2, unprunable=(3,))
    agent = UniformPruner("PruneDistributionPolicy", env, seed=0)
    widths_before = env.initial_group_widths.copy()
    assert agent.learn(1) is agent
    np.testing.assert_allclose(agent.history[0]["action"], [1 / 7, 2 / 7, 4 / 7, 0.0], rtol=1e-6)
    fractions = 1 - env.group_widths / widths_before
    np.testing.assert_allclose(fractions[:3], 0.1)  # 70 channels = 10 % of each prunable group
    assert fractions[3] == 0.0


def test_global_counts_rank_channels_across_groups():
    importances = [np.array([0.1, 0.9, 0.2]), np.array([0.15, 0.05]), np.array([0.01, 0.02])]
    mask = np.array([True, True, False])  # group 2 is the least important but cannot give channels
    # Group 1 offers only its least important channel (min_channels=1), group 0 offers 0.1 and 0.2.
    np.testing.assert_array_equal(_global_counts(importances, mask, 3), [2, 1, 0])
    np.testing.assert_array_equal(_global_counts(importances, mask, 1), [0, 1, 0])
    np.testing.assert_array_equal(_global_counts(importances, mask, 0), [0, 0, 0])


def test_global_pruner_takes_the_least_important_group_first():
    # Group 2's channels are 100x less important than the others: the whole budget goes there.
    env = ToyPruneEnv(
        widths=(64, 64, 64, 64), stage_budget=16, num_stages=2, importance_scale=(1, 1, 0.01, 1)
    )
    agent = GlobalPruner("PruneDistributionPolicy", env, seed=0)
    agent.learn(1)
    np.testing.assert_allclose(agent.history[0]["action"], [0, 0, 1, 0])
    np.testing.assert_array_equal(env.group_widths, [64, 64, 48, 64])
    np.testing.assert_allclose(agent.predict(env._obs(), deterministic=True)[0], [0, 0, 1, 0])


def test_stage_budget_needs_the_env_to_say_it():
    class NoBudget:
        initial_group_widths = np.array([10, 10])

    with pytest.raises(AttributeError, match="stage_budget"):
        _stage_budget(NoBudget())
    NoBudget.stage_sparsity = 0.1
    assert _stage_budget(NoBudget()) == 2


def test_baselines_save_load_and_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for cls in (UniformPruner, GlobalPruner):
        env = ToyPruneEnv(num_stages=2)
        agent = cls("PruneDistributionPolicy", env, tensorboard_log=str(tmp_path), image_log_interval=0)
        agent.learn(2)
        path = tmp_path / f"{cls.__name__}.zip"
        agent.save(path)
        loaded = cls.load(path)
        obs = env._obs()
        np.testing.assert_array_equal(
            agent.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
        )
        acc = EventAccumulator(str(tmp_path / f"{cls.__name__}_1"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("stage/reward")] == [1, 2]
