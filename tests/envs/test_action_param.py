"""``action_param="log_prior"`` (``RLPrune-*-LogPrior-v0``): log-factors around the width-proportional split."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest

from keepgym.envs.data import load_dataset
from keepgym.envs.prune_env import PruneEnv

TINY = {"width_mult": 0.125, "dataset": "synthetic", "pretrained": False, "calibration_size": 16, "criterion": "l1"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", train_size=240, test_size=10, val_size=40)


def _env(data, **kw) -> PruneEnv:
    return PruneEnv(**{**TINY, "model_name": "vgg11", "data": data, "stage_sparsity": 0.2, **kw})


@pytest.mark.parametrize("env_id", ["RLPrune-Digits-LogPrior-v0", "RLPrune-ResNet56-LogPrior-v0"])
def test_v1_ids_pass_the_checkers_and_use_log_prior(env_id):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    import keepgym  # noqa: F401

    env = gym.make(env_id, **{**TINY, "train_size": 200, "val_size": 20, "target_sparsity": 0.2, "stage_sparsity": 0.1})
    assert env.unwrapped.action_param == "log_prior"
    assert env.action_space.low.min() == -1.0 and env.action_space.high.max() == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped, warn=False)
    env.close()


def test_zero_action_is_the_width_proportional_split(data):
    env = _env(data, action_param="log_prior")
    env.reset(seed=0)
    widths = env.group_widths.astype(float)
    counts = env.allocate(np.zeros(env.num_groups))
    assert counts.sum() == env.stage_budget
    # every group loses the same fraction of its channels, up to one channel of rounding
    np.testing.assert_array_less(np.abs(counts - widths * counts.sum() / widths.sum()), 1.0 + 1e-9)
    # v0's zero action is the *uniform* split (equal channel counts), which differs on unequal widths
    v0 = _env(data)
    v0.reset(seed=0)
    assert not np.array_equal(v0.allocate(np.zeros(v0.num_groups)), counts)


def test_log_factors_move_a_share_by_at_most_4x_and_are_clipped(data):
    env = _env(data, action_param="log_prior")
    env.reset(seed=0)
    g = env.num_groups
    w = env.split_weights(np.zeros(g))
    up = np.zeros(g)
    up[0] = 1.0
    np.testing.assert_allclose(env.split_weights(up)[0] / w[0], 4.0)
    up[0] = 7.0  # outside the box: clipped like SB3 clips Gaussian actions
    np.testing.assert_allclose(env.split_weights(up)[0] / w[0], 4.0)
    down = np.zeros(g)
    down[1] = -1.0
    assert env.allocate(down)[1] < env.allocate(np.zeros(g))[1]
    # negative entries are legal here (not "all negative"); NaN still refused
    env.allocate(-np.ones(g))
    with pytest.raises(ValueError, match="NaN"):
        env.allocate(np.full(g, np.nan))


def test_random_policy_stays_near_the_prior_where_v0_does_not(data):
    """What PPO/SAC sample at the start (N(0, 1), clipped to the box): under v1 no group loses a much larger
    fraction of its channels in a stage than the stage's mean fraction; under v0 half the weights clip to 0
    and the stage piles into the remaining groups."""
    rng = np.random.default_rng(0)
    worst = {}
    for param in ("weights", "log_prior"):
        env = _env(data, action_param=param)
        env.reset(seed=0)
        widths = env.group_widths.astype(float)
        peaks = []
        for _ in range(50):
            a = np.clip(rng.normal(0, 1, env.num_groups), env.action_space.low, env.action_space.high)
            counts = env.allocate(a)
            peaks.append(float(np.max(counts / widths)) / (counts.sum() / widths.sum()))
        worst[param] = float(np.mean(peaks))
    assert worst["log_prior"] < 4.0
    assert worst["weights"] > 1.5 * worst["log_prior"], worst


def test_staged_pruners_refuse_signed_actions_and_the_cli_picks_per_algo(data):
    from keepgym.agents.baselines import UniformPruner
    from keepgym.agents.rl_pruner import RLPruner
    from keepgym.experiments.common import CliError
    from keepgym.experiments.prune_config import PruneConfig, env_kwargs, validate

    for cls in (RLPruner, UniformPruner):
        with pytest.raises(ValueError, match="action_param='weights'"):
            cls("PruneDistributionPolicy", _env(data, action_param="log_prior"))
    assert env_kwargs(PruneConfig(algo="ppo"))["action_param"] == "log_prior"
    assert env_kwargs(PruneConfig(algo="rlpruner"))["action_param"] == "weights"
    assert env_kwargs(PruneConfig(algo="ppo", action_param="weights"))["action_param"] == "weights"
    assert "action_param" not in env_kwargs(PruneConfig(algo="ppo", env="RLPrune-Digits-LogPrior-v0"))
    digits = {"env": "RLPrune-Digits-v0", "sparsity": 0.5}
    validate(PruneConfig(algo="rlpruner", racing=True, **digits))
    with pytest.raises(CliError, match="log_prior is for ppo"):
        validate(PruneConfig(algo="rlpruner", action_param="log_prior", **digits))
    with pytest.raises(CliError, match="--racing"):
        validate(PruneConfig(algo="uniform", racing=True, **digits))
