"""Every agent (RLPruner, uniform, global, an SB3 plug-in) prunes to a MACs target on the same env."""

import numpy as np
import pytest

from keepgym.envs.data import load_dataset
from keepgym.envs.prune_env import PruneEnv


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("synthetic", train_size=64, test_size=16, val_size=16)


def _env(data):
    return PruneEnv(
        "vgg11",
        data=data,
        pretrained=False,
        width_mult=0.125,
        calibration_size=16,
        batch_size=64,
        target_macs=0.5,
        stage_sparsity=0.2,
    )


def _agent(name, env):
    from stable_baselines3 import PPO

    from keepgym.agents import RLPruner
    from keepgym.agents.baselines import GlobalPruner, UniformPruner

    if name == "rlpruner":
        return RLPruner("PruneDistributionPolicy", env, sample_num=2, rounds_per_stage=1, seed=0)
    if name == "ppo":
        return PPO("MlpPolicy", env, n_steps=3, batch_size=3, n_epochs=1, seed=0, device="cpu")
    cls = UniformPruner if name == "uniform" else GlobalPruner
    return cls("PruneDistributionPolicy", env, seed=0)


@pytest.mark.parametrize("name", ["rlpruner", "uniform", "global", "ppo"])
def test_every_agent_meets_the_macs_target(tiny_data, name):
    env = _env(tiny_data)
    assert env.num_stages == 3  # 0.8, 0.6, 0.5 of the original MACs
    agent = _agent(name, env)
    agent.learn(env.num_stages)
    if name == "ppo":  # SB3's vec env resets at the episode end: play one more episode with its policy
        raw = env
        obs, _ = raw.reset(seed=1)
        done = False
        while not done:
            action, _ = agent.predict(obs, deterministic=False)
            obs, _, done, _, _ = raw.step(action)
    else:
        raw = agent.env.envs[0].unwrapped
    assert raw.stage == env.num_stages
    assert 0.5 - 0.2 < raw.macs / raw.macs0 <= 0.5
    assert 0 < raw.removed_channels < raw.n0


def test_global_takes_the_shortest_prefix_of_the_ranking_that_meets_the_goal(tiny_data):
    from keepgym.agents.baselines import _global_counts, _global_counts_to_goal

    env = _env(tiny_data)
    env.reset(seed=0)
    mask = env.prunable_mask()
    importances = env.stage_importance()
    counts = _global_counts_to_goal(importances, mask, env)
    goal = env.stage_goal
    assert env.predict_cost(counts)[0] <= goal
    shorter = _global_counts(importances, mask, int(counts.sum()) - 1)
    assert env.predict_cost(shorter)[0] > goal
    # the env keeps exactly that allocation when it is committed as the action
    np.testing.assert_array_equal(env.allocate(counts.astype(np.float32)), counts)
