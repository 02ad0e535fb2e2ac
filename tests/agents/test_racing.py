"""RLPruner(racing=True): successive halving of a round's candidates over slices of the scoring images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keepgym.agents.rl_pruner import RLPruner
from keepgym.envs.data import load_dataset
from keepgym.envs.prune_env import PruneEnv, score_images

TINY = {"width_mult": 0.125, "dataset": "synthetic", "pretrained": False, "calibration_size": 16, "criterion": "l1"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", train_size=240, test_size=10, val_size=90)


def _env(data, **kw) -> PruneEnv:
    args = {**TINY, "model_name": "vgg11", "data": data, "stage_sparsity": 0.1, "target_sparsity": 0.3}
    return PruneEnv(**{**args, **kw})


def test_halving_plan_covers_every_image_once_and_saves_3x_at_k10():
    agent = RLPruner.__new__(RLPruner)  # the plan needs only the racing settings
    agent.racing_eta, agent.racing_keep = 3, 2
    plan = agent.racing_slices(10, 800)
    assert [(s.start, s.stop, k) for s, k in plan] == [(0, 88, 10), (88, 266, 4), (266, 800, 2)]
    work = sum((s.stop - s.start) * k for s, k in plan) / 800
    assert 10 / work > 2.9
    # nothing to halve: one full-set level
    agent.racing_keep = 10
    assert [(s.start, s.stop, k) for s, k in agent.racing_slices(10, 800)] == [(0, 800, 10)]
    # tiny scoring sets never give an empty slice
    agent.racing_keep, agent.racing_eta = 1, 4
    plan = agent.racing_slices(40, 5)
    assert plan[0][0].start == 0 and plan[-1][0].stop == 5 and all(s.stop > s.start for s, _ in plan)


def test_image_slices_add_up_to_the_full_evaluation(data):
    env = _env(data)
    env.reset(seed=0)
    n = env.num_scoring_images
    order = env.scoring_order()
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, env.scoring_order())  # fixed within the stage
    action = np.linspace(0.1, 1.0, env.num_groups)
    reward, info = env.evaluate(action)
    parts = env.evaluate_many([action, action], images=slice(0, 30))
    rest = env.evaluate_many([action], images=slice(30, None))[0]
    assert parts[0] == parts[1]
    assert parts[0][1]["scored_images"] == 30 and rest[1]["scored_images"] == n - 30
    assert parts[0][1]["correct"] + rest[1]["correct"] == info["correct"] == round(info["accuracy"] * n)
    assert info["scored_images"] == n
    with pytest.raises(ValueError, match="slice"):
        env.evaluate_allocation(env.allocate(action), images=[1, 2])
    with pytest.raises(ValueError, match="none of"):
        env.evaluate_allocation(env.allocate(action), images=slice(n, None))


def _fragile_first(env: PruneEnv) -> bool:
    inputs = env.scoring_inputs()
    _, margin, _ = score_images(inputs.model, inputs.val_x, inputs.val_y, inputs.batch_size)
    # >= -1e-5, not >= 0: after a commit the order comes from the masked candidate's margins, which equal the
    # physically pruned model's up to float rounding (~1e-8), enough to swap near-ties
    return bool(np.all(np.diff(np.abs(margin.numpy()[env.scoring_order()])) >= -1e-5))


def test_scoring_order_puts_the_current_models_fragile_images_first(data):
    env = _env(data)
    env.reset(seed=0)
    assert _fragile_first(env)
    action = np.linspace(0.1, 1.0, env.num_groups)
    env.evaluate(action)  # the committed candidate's accuracy is reused: no pass measures the new model
    env.step(action)
    assert _fragile_first(env)  # the order follows the pruned model, not the one before
    env.step(action)
    assert _fragile_first(env)
    snap = env.snapshot()
    order = env.scoring_order().copy()
    env.step(action)
    env.restore(snap)
    assert np.array_equal(env.scoring_order(), order)
    with pytest.raises(AssertionError):  # the check can fail: a random order is not fragile-first
        env._order = np.random.default_rng(0).permutation(env.num_scoring_images)
        assert _fragile_first(env)


def test_racing_survivors_carry_exact_full_set_rewards_and_cost_less(data):
    env = _env(data, alpha=0.3)
    agent = RLPruner("MlpPolicy", env, sample_num=9, rounds_per_stage=1, racing=True, racing_keep=2, seed=0)
    raw = agent.env.envs[0].unwrapped
    raw.reset(seed=0)
    mask = np.asarray(raw.prunable_mask(), dtype=bool)
    actions = agent.sample_candidates(agent.distribution, mask)
    survivors, work = agent._race(raw, actions)
    assert len(survivors) == 2 and work < 9
    for c in survivors:
        reward, info = raw.evaluate(c.action)
        assert math.isclose(c.reward, reward, abs_tol=1e-12)
        assert c.info["accuracy"] == info["accuracy"] and c.info["scored_images"] == raw.num_scoring_images
    # the exhaustive search's winner on the full set survives here (9 candidates, 2 kept)
    full = [raw.evaluate(a)[0] for a in actions]
    assert max(c.reward for c in survivors) <= max(full) + 1e-12


def test_racing_learns_end_to_end_and_logs_less_work(data):
    logs = {}
    for racing in (False, True):
        env = _env(data)
        agent = RLPruner("MlpPolicy", env, sample_num=9, rounds_per_stage=2, racing=racing, seed=0)
        agent.learn(3)
        logs[racing] = [r["candidates"] for r in agent.history]
        assert agent.env.envs[0].unwrapped.stage == 3
    assert all(r < e for r, e in zip(logs[True], logs[False], strict=True)), logs


def test_racing_refuses_lookahead_and_bad_settings(data):
    env = _env(data)
    with pytest.raises(ValueError, match="lookahead_depth=1"):
        RLPruner("MlpPolicy", env, racing=True, lookahead_depth=2)
    with pytest.raises(ValueError, match="racing_eta"):
        RLPruner("MlpPolicy", env, racing=True, racing_eta=1)
    with pytest.raises(ValueError, match="racing_eta"):
        RLPruner("MlpPolicy", env, racing=True, racing_eta=float("nan"))
    with pytest.raises(ValueError, match="racing_keep"):
        RLPruner("MlpPolicy", env, racing=True, racing_keep=0)


def test_halving_factor_need_not_be_whole():
    agent = RLPruner.__new__(RLPruner)
    agent.racing_eta, agent.racing_keep = 3.5, 2
    plan = agent.racing_slices(10, 800)
    assert [(s.start, s.stop, k) for s, k in plan] == [(0, 65, 10), (65, 228, 3), (228, 800, 2)]
    assert all(isinstance(s.stop, int) for s, _ in plan)


def test_keepgym_prune_settings_reach_the_agent(data):
    from keepgym.agents.prune_agents import make_prune_agent

    agent = make_prune_agent("rlpruner", _env(data), racing=True, racing_eta=4, racing_keep=3, seed=0)
    assert (agent.racing, agent.racing_eta, agent.racing_keep) == (True, 4.0, 3)
    assert [k for _, k in agent.racing_slices(10, 800)] == [10, 3]
    assert RLPruner("MlpPolicy", _env(data)).racing_eta == 3.5  # the default measured in README
