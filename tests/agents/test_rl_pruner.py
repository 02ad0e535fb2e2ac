"""Tests of agents.rl_pruner.RLPruner on a closed-form toy env (no model, no data, CPU, < 10 s)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from keepgym.agents.rl_pruner import RLPruner, _Candidate, _EliteArchive, _epsilon

try:
    from tests.agents.toy_prune_env import ToyPruneEnv
except ImportError:  # pytest's rootdir-relative import when tests/ is not a package on sys.path
    from toy_prune_env import ToyPruneEnv


def _agent(env, **kwargs) -> RLPruner:
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("sample_num", 6)
    kwargs.setdefault("rounds_per_stage", 4)
    return RLPruner("PruneDistributionPolicy", env, **kwargs)


def _actions(agent: RLPruner) -> np.ndarray:
    return np.stack([h["action"] for h in agent.history])


# -- the update rule ---------------------------------------------------------------------------------------


def test_clipped_update_on_hand_made_archive_respects_clip_simplex_and_mask():
    archive = _EliteArchive(capacity=3)
    for value, action in [
        (0.50, [0.0, 0.25, 0.25, 0.25, 0.25]),
        (0.90, [0.0, 0.70, 0.10, 0.10, 0.10]),  # the elite: far from pi on purpose, so the clip binds
        (0.70, [0.0, 0.10, 0.30, 0.30, 0.30]),
        (0.20, [0.0, 0.40, 0.40, 0.10, 0.10]),  # below the archive's minimum once full: rejected
    ]:
        archive.add(_Candidate(value=value, reward=value, action=np.asarray(action)))
    assert len(archive) == 3 and archive.best().value == 0.90
    assert [c.value for c in archive.candidates()] == [0.90, 0.70, 0.50]

    mask = np.array([False, True, True, True, True])  # group 0 cannot give channels
    pi = np.array([0.0, 0.05, 0.25, 0.30, 0.40])
    pi_before = pi.copy()
    target = archive.best().action
    delta = 0.25

    stepped = RLPruner.clipped_update(pi, target, mask, step_length=0.5, clip=delta, normalize=False)
    ratio = stepped[mask] / pi[mask]
    assert np.all(ratio >= 1 - delta - 1e-12) and np.all(ratio <= 1 + delta + 1e-12)
    assert math.isclose(ratio[0], 1 + delta)  # group 1 wanted 0.05 -> 0.375: clipped to +25 %
    new = RLPruner.clipped_update(pi, target, mask, step_length=0.5, clip=delta)
    np.testing.assert_array_equal(pi, pi_before)  # never mutated in place
    assert math.isclose(new.sum(), 1.0) and np.all(new >= 0.0)
    assert new[0] == 0.0
    # The step goes toward the elite.
    assert np.abs(new - target).sum() < np.abs(pi - target).sum()

    # Without the clip the step is the plain (floored, renormalised) move toward the elite.
    free = RLPruner.clipped_update(pi, target, mask, step_length=0.5, clip=None)
    expected = np.where(mask, pi + 0.5 * (target - pi), 0.0)
    np.testing.assert_allclose(free, expected / expected.sum())


def test_archive_ties_and_random_pick_are_reproducible():
    archive = _EliteArchive(capacity=2)
    archive.add(_Candidate(1.0, 1.0, np.array([1.0, 0.0])))
    archive.add(_Candidate(1.0, 1.0, np.array([0.0, 1.0])))
    np.testing.assert_array_equal(archive.best().action, [1.0, 0.0])  # earliest wins a tie
    picks_a = [archive.sample(np.random.default_rng(3)).action[0] for _ in range(3)]
    picks_b = [archive.sample(np.random.default_rng(3)).action[0] for _ in range(3)]
    assert picks_a == picks_b


def test_candidates_are_on_the_simplex_and_masked():
    env = ToyPruneEnv(unprunable=(2,))
    for noise in ("absolute", "relative"):
        agent = _agent(env, noise=noise)
        mask = env.prunable_mask()
        pi = np.array([0.1, 0.2, 0.0, 0.7])
        cands = agent.sample_candidates(pi, mask, n=50)
        assert cands.shape == (50, 4)
        np.testing.assert_allclose(cands.sum(axis=1), 1.0)
        assert np.all(cands[:, 2] == 0.0) and np.all(cands >= 0.0)
        assert not np.allclose(cands, pi)  # there is noise


# -- exploration schedule ----------------------------------------------------------------------------------


def test_epsilon_schedule_matches_reference_values():
    agent = _agent(ToyPruneEnv())
    # Stage t = stages already committed: t = 0 is the first stage, explored with epsilon_0.
    assert agent.exploration_rate(0, 80) == pytest.approx(0.4)
    measured = [agent.exploration_rate(t, 80) for t in range(1, 9)]
    np.testing.assert_allclose(measured, [0.385, 0.341, 0.277, 0.200, 0.123, 0.059, 0.015, 0.0], atol=6e-4)
    assert agent.exploration_rate(9, 80) == 0.0 and agent.exploration_rate(79, 80) == 0.0
    assert _epsilon(4, 80, 0.4, 0.1, "linear") == pytest.approx(0.2)
    assert _epsilon(8, 80, 0.4, 0.1, "constant") == pytest.approx(0.4)
    assert _epsilon(9, 80, 0.4, 0.1, "constant") == 0.0
    # T < 10: only the first stage explores (as in the reference).
    assert _epsilon(0, 5, 0.4, 0.1, "cosine") == pytest.approx(0.4)
    assert _epsilon(1, 5, 0.4, 0.1, "cosine") == 0.0


# -- learning ------------------------------------------------------------------------------------------------


def test_converges_to_the_known_best_allocation():
    target = (0.1, 0.2, 0.3, 0.4)
    env = ToyPruneEnv(widths=(1000, 1000, 1000, 1000), num_stages=30, target=target)
    agent = _agent(env, sample_num=10, rounds_per_stage=10)
    start = agent.distribution
    agent.learn(30)
    assert np.abs(start - env.target).sum() > 0.3  # width-proportional = uniform here
    assert np.abs(agent.distribution - env.target).sum() < 0.05
    # The committed allocations approach the target over the run.
    errors = [np.abs(h["action"] - env.target).sum() for h in agent.history]
    assert errors[-1] < 0.05 < errors[0]
    assert agent.history[-1]["accuracy"] > agent.history[0]["accuracy"]


def test_unprunable_groups_stay_at_zero_and_policy_starts_width_proportional():
    env = ToyPruneEnv(widths=(64, 128, 256, 64), unprunable=(1,), num_stages=4)
    agent = _agent(env)
    np.testing.assert_allclose(agent.distribution, np.array([64, 0, 256, 64]) / 384)
    agent.learn(4)
    assert np.all(_actions(agent)[:, 1] == 0.0)
    assert agent.distribution[1] == 0.0
    assert env.group_widths[1] == 128


def test_collapse_guard_redoes_the_stage_search_once():
    env = ToyPruneEnv(num_stages=4, collapse_stage=2)
    agent = _agent(env, sample_num=5, rounds_per_stage=3)
    agent.learn(4)
    assert agent.collapse_stages == [(0, 2)]
    flags = [h["collapse_reset"] for h in agent.history]
    assert flags == [False, False, True, False]
    candidates = [h["candidates"] for h in agent.history]
    assert candidates == [15, 15, 30, 15]
    # The guard can be switched off.
    off = _agent(
        ToyPruneEnv(num_stages=4, collapse_stage=2), sample_num=5, rounds_per_stage=3, collapse_threshold=None
    )
    off.learn(4)
    assert off.collapse_stages == [] and [h["candidates"] for h in off.history] == [15] * 4


class _RecoveringToy(ToyPruneEnv):
    """Step reports the accuracy after a perfect recovery (1.0) beside the one before it, as PruneEnv with KD does."""

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        info = {**info, "accuracy_before_finetune": info["accuracy"], "accuracy": 1.0}
        return obs, reward, terminated, truncated, info


def test_collapse_guard_compares_candidates_with_the_last_stage_before_its_recovery():
    """Candidates are scored before recovery: measured against a recovered accuracy, every stage would look
    like a collapse. Only the real collapse (stage 2) is re-searched."""
    env = _RecoveringToy(num_stages=4, collapse_stage=2)
    agent = _agent(env, sample_num=5, rounds_per_stage=3, collapse_threshold=0.02)
    agent.learn(4)
    # Stage 0 is measured against the unpruned model; later stages against the previous stage before its
    # recovery (against the recovered 1.0, every one of them would fire).
    assert [h["collapse_reset"] for h in agent.history][1:] == [False, True, False]


def test_same_seed_same_committed_actions():
    runs = []
    for seed in (7, 7, 8):
        agent = _agent(ToyPruneEnv(num_stages=6), seed=seed, epsilon=0.4, exploration_fraction=1.0)
        agent.learn(6)
        runs.append(_actions(agent))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_env_is_left_in_final_state_and_next_episode_restarts():
    env = ToyPruneEnv(num_stages=3)
    agent = _agent(env)
    agent.learn(3)
    assert env.stage == 3  # not auto-reset: the final pruned state is still there
    final_widths = env.group_widths.copy()
    assert (
        np.all(final_widths <= env.initial_group_widths)
        and final_widths.sum() < env.initial_group_widths.sum()
    )
    agent.learn(5, reset_num_timesteps=False)  # finishes episode 2 (3 stages)... and starts episode 3
    assert [h["episode"] for h in agent.history] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert [h["stage"] for h in agent.history] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert env.stage == 2


def test_lookahead_uses_snapshot_restore_and_requires_it():
    env = ToyPruneEnv(num_stages=3)
    agent = _agent(env, sample_num=3, rounds_per_stage=2, lookahead_depth=2)
    agent.learn(1)
    # 2 rounds x (3 candidates + 3 x 3 children); the env state was restored after each look-ahead.
    assert agent.history[0]["candidates"] == 2 * (3 + 9)
    assert env.stage == 1

    class NoSnapshotEnv(ToyPruneEnv):
        snapshot = None  # type: ignore[assignment]

    agent = _agent(NoSnapshotEnv(num_stages=3), lookahead_depth=2)
    with pytest.raises(NotImplementedError, match="snapshot"):
        agent.learn(1)


# -- SB3 surface -------------------------------------------------------------------------------------------


def test_save_load_same_predict_and_hyperparameters(tmp_path):
    env = ToyPruneEnv(num_stages=4)
    agent = _agent(env, noise_std=0.03, clip=0.2, noise="relative")
    agent.learn(3)
    obs = env._obs()
    before, _ = agent.predict(obs, deterministic=True)
    np.testing.assert_allclose(before, agent.distribution, rtol=1e-6)
    agent.save(tmp_path / "agent.zip")

    loaded = RLPruner.load(tmp_path / "agent.zip")
    after, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(before, after)
    assert (loaded.noise_std, loaded.clip, loaded.noise, loaded.sample_num) == (0.03, 0.2, "relative", 6)
    assert len(loaded.history) == 3

    noisy, _ = loaded.predict(np.stack([obs, obs]), deterministic=False)
    assert noisy.shape == (2, 4)
    np.testing.assert_allclose(noisy.sum(axis=1), 1.0, rtol=1e-5)


def test_resume_from_saved_agent_equals_uninterrupted_run(tmp_path):
    full = _agent(ToyPruneEnv(num_stages=6), exploration_fraction=1.0)
    full.learn(6)

    env = ToyPruneEnv(num_stages=6)
    first = _agent(env, exploration_fraction=1.0)
    first.learn(3)
    first.save(tmp_path / "stage3.zip")
    resumed = RLPruner.load(tmp_path / "stage3.zip", env=env, force_reset=False)
    resumed.learn(3, reset_num_timesteps=False)
    np.testing.assert_array_equal(_actions(full), _actions(resumed))
    np.testing.assert_array_equal(full.distribution, resumed.distribution)


@pytest.mark.filterwarnings("ignore::tqdm.TqdmExperimentalWarning")
def test_callback_runs_once_per_stage_and_can_stop_learning():
    class StopAfter(BaseCallback):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.n = n
            self.seen: list[int] = []

        def _on_step(self) -> bool:
            self.seen.append(self.model.num_timesteps)
            return self.n_calls < self.n

    env = ToyPruneEnv(num_stages=5)
    agent = _agent(env)
    callback = StopAfter(2)
    agent.learn(5, callback=callback, progress_bar=True)
    assert callback.seen == [1, 2] and agent.num_timesteps == 2 and env.stage == 2


def test_tensorboard_events_hold_stage_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = ToyPruneEnv(num_stages=3)
    agent = _agent(env, tensorboard_log=str(tmp_path), image_log_interval=3)
    agent.learn(3, tb_log_name="toy")
    run_dir = tmp_path / "toy_1"
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for key in (
        "reward",
        "accuracy",
        "macs_ratio",
        "params_ratio",
        "sparsity",
        "epsilon",
        "best_candidate_reward",
    ):
        assert f"stage/{key}" in tags["scalars"], key
    rewards = acc.Scalars("stage/reward")
    assert [e.step for e in rewards] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in rewards], [h["reward"] for h in agent.history], rtol=1e-6)
    assert "stage/distribution" in tags["histograms"]
    assert "stage/distribution_image" in tags["images"]


def test_rejects_envs_it_cannot_see_through():
    with pytest.raises(TypeError, match="VecNormalize"):
        _agent(VecNormalize(DummyVecEnv([ToyPruneEnv])))
    with pytest.raises(ValueError):
        _agent(DummyVecEnv([ToyPruneEnv, ToyPruneEnv]))
    with pytest.raises(ValueError, match="clip"):
        _agent(ToyPruneEnv(), clip=1.5)


def test_toy_env_passes_gymnasium_checker():
    check_env(ToyPruneEnv(), skip_render_check=True)
