"""Compute targets: ``PruneEnv(target_macs=...)`` / ``target_params`` stop at the target, stage by stage."""

import math

import numpy as np
import pytest

from keepgym.envs.data import load_dataset
from keepgym.envs.prune_env import PruneEnv


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("synthetic", train_size=64, test_size=16, val_size=16)


def _env(data, model_name="vgg11", width=0.125, **kwargs):
    kwargs.setdefault("target_macs", 0.5)
    kwargs.setdefault("stage_sparsity", 0.2)
    return PruneEnv(
        model_name, data=data, pretrained=False, width_mult=width, calibration_size=16, batch_size=64, **kwargs
    )


def _run_uniform(env, seed=0):
    _, info = env.reset(seed=seed)
    history, done = [], False
    while not done:
        action = env.group_widths.astype(np.float32)  # the same fraction from every group
        _, _, done, _, info = env.step(action)
        history.append(info)
    return history


@pytest.mark.parametrize(
    "model_name,width",
    [("vgg19", 0.125), ("resnet56", 0.25), ("googlenet", 0.125), ("mobilenetv3_large", 0.25), ("densenet121", 0.125)],
)
def test_target_macs_met_within_one_stage_for_the_cifar_models(tiny_data, model_name, width):
    env = _env(tiny_data, model_name, width, target_macs=0.6, stage_sparsity=0.25)
    assert env.num_stages == math.ceil(0.4 / 0.25)
    history = _run_uniform(env)
    final = history[-1]["macs_ratio"]
    # met, and not overshot by more than one stage's granularity
    assert 0.6 - 0.25 < final <= 0.6
    assert len(history) <= env.num_stages
    # the counter agrees with the closed form the env planned with
    assert all(h["macs"] == h["closed_form_macs"] for h in history)
    assert 0 < history[-1]["sparsity"] < 1  # channel sparsity is reported beside it


def test_each_stage_removes_a_fixed_fraction_of_the_original_macs(tiny_data):
    env = _env(tiny_data, target_macs=0.35, stage_sparsity=0.2)
    assert env.num_stages == 4
    history = _run_uniform(env)
    ratios = [h["macs_ratio"] for h in history]
    goals = [0.8, 0.6, 0.4, 0.35]
    assert len(ratios) == 4
    for ratio, goal in zip(ratios, goals, strict=True):
        assert goal - 0.06 < ratio <= goal + 1e-9  # each stage lands just under its goal
    assert history[-1]["sparsity"] > 0


def test_target_params_and_every_action_meets_the_goal(tiny_data):
    env = _env(tiny_data, target_macs=None, target_params=0.5, stage_sparsity=0.25)
    env.reset(seed=1)
    rng = np.random.default_rng(0)
    goal = env.stage_goal
    for _ in range(5):  # any split of the stage meets the same params goal
        action = rng.random(env.num_groups)
        reward, info = env.evaluate(action)
        assert info["params"] <= goal
        assert env.predict_cost(np.asarray(info["removed"]))[1] == info["params"]
    done = False
    while not done:
        _, _, done, _, info = env.step(rng.random(env.num_groups))
    assert info["params_ratio"] <= 0.5


def test_compute_target_arguments_are_checked(tiny_data):
    with pytest.raises(ValueError, match="not both"):
        _env(tiny_data, target_macs=0.5, target_params=0.5)
    with pytest.raises(ValueError, match="target_macs must be in"):
        _env(tiny_data, target_macs=1.5)
    with pytest.raises(ValueError, match="stage_sparsity"):
        _env(tiny_data, target_macs=0.8, stage_sparsity=0.5)
    with pytest.raises(ValueError, match="out of reach"):
        _env(tiny_data, target_macs=0.001, stage_sparsity=0.2, min_channels=4)


def test_a_stage_as_large_as_the_whole_budget_is_accepted_despite_float_rounding(tiny_data):
    env = _env(tiny_data, target_macs=0.9, stage_sparsity=0.1)  # 1 - 0.9 = 0.09999999999999998 in floats
    assert env.num_stages == 1
