"""Tests of agents.DDQN: Double-DQN target, branching head, save/load, learning, determinism, logging."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from keepgym.agents.ddqn import DDQN, BranchingQPolicy

OBS_DIM = 4
BEST_RATIO = 2
RATIO_MEANS = (0.2, 0.5, 1.0, 0.4, 0.0)
TARGET_MASK = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=np.int8)


class RatioBandit(gym.Env):
    """One-step bandit: 5 "keep-ratio" actions with Gaussian rewards; action 2 is clearly best."""

    def __init__(self, noise: float = 0.3) -> None:
        self.observation_space = spaces.Box(0.0, 1.0, (OBS_DIM,), np.float32)
        self.action_space = spaces.Discrete(len(RATIO_MEANS))
        self.noise = noise

    def _obs(self) -> np.ndarray:
        return self.np_random.random(OBS_DIM).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = RATIO_MEANS[int(action)] + self.noise * self.np_random.standard_normal()
        return (
            self._obs(),
            float(reward),
            True,
            False,
            {"kept": 8.0 * (int(action) + 1), "step_seconds": 0.01},
        )


class MaskBandit(gym.Env):
    """One-step bandit over keep-masks: reward = fraction of bits equal to TARGET_MASK, plus noise."""

    def __init__(self, noise: float = 0.1) -> None:
        self.observation_space = spaces.Box(0.0, 1.0, (OBS_DIM,), np.float32)
        self.action_space = spaces.MultiBinary(len(TARGET_MASK))
        self.noise = noise

    def _obs(self) -> np.ndarray:
        return self.np_random.random(OBS_DIM).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = np.asarray(action)
        assert action.shape == TARGET_MASK.shape and action.sum() >= 1
        reward = float(np.mean(action == TARGET_MASK)) + self.noise * self.np_random.standard_normal()
        return self._obs(), reward, True, False, {"kept_patches": float(action.sum())}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny MLPs are fastest on one thread, and the suite shares 2 cores with other jobs."""
    n_threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(n_threads)


def _small(env: gym.Env, **kwargs) -> DDQN:
    params = dict(
        learning_starts=100,
        learning_rate=1e-3,
        batch_size=32,
        exploration_fraction=0.3,
        policy_kwargs=dict(net_arch=[32, 32]),
        seed=0,
        device="cpu",
    )
    params.update(kwargs)
    return DDQN("MlpPolicy", env, **params)


def _probe_obs(n: int = 32) -> np.ndarray:
    return np.random.default_rng(123).random((n, OBS_DIM)).astype(np.float32)


def _const_forward(values: th.Tensor):
    """A forward that returns fixed Q-values whatever the observation."""
    return lambda obs: values.clone()


# ---------------------------------------------------------------------------------------- target


def test_double_q_target_differs_from_vanilla_on_hand_made_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _small(RatioBandit(), gamma=0.9)
    online = th.tensor([[1.0, 5.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 9.0, 0.0, 0.0]])
    target = th.tensor([[10.0, 2.0, 3.0, 0.0, 0.0], [7.0, 1.0, 1.0, -1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    monkeypatch.setattr(model.q_net, "forward", _const_forward(online))
    monkeypatch.setattr(model.q_net_target, "forward", _const_forward(target))
    rewards = th.tensor([[1.0], [0.5], [2.0]])
    dones = th.tensor([[0.0], [0.0], [1.0]])
    next_obs = th.zeros(3, OBS_DIM)

    y = model._double_q_target(next_obs, rewards, dones)

    # Online argmax: 1, 3, 2 -> target values 2, -1, (done) -> r + 0.9 * Q_target(s', a').
    expected = th.tensor([[1.0 + 0.9 * 2.0], [0.5 + 0.9 * -1.0], [2.0]])
    vanilla = rewards + (1 - dones) * 0.9 * target.max(dim=1, keepdim=True).values
    assert y.shape == (3, 1)
    assert th.allclose(y, expected)
    assert not th.allclose(y[:2], vanilla[:2])
    assert th.allclose(y[2], vanilla[2])  # terminal: no bootstrap in either


def test_branching_target_per_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _small(MaskBandit(), gamma=0.95)
    n = len(TARGET_MASK)
    gen = th.Generator().manual_seed(0)
    online = th.randn(5, n, 2, generator=gen)
    target = th.randn(5, n, 2, generator=gen)
    monkeypatch.setattr(model.q_net, "forward", _const_forward(online))
    monkeypatch.setattr(model.q_net_target, "forward", _const_forward(target))
    rewards = th.arange(5, dtype=th.float32).reshape(5, 1)
    dones = th.tensor([[0.0], [1.0], [0.0], [0.0], [0.0]])

    y = model._double_q_target(th.zeros(5, OBS_DIM), rewards, dones)

    assert y.shape == (5, n)
    expected = th.empty(5, n)
    for i in range(5):
        for b in range(n):
            a_star = int(online[i, b].argmax())
            expected[i, b] = rewards[i, 0] + (1 - dones[i, 0]) * 0.95 * target[i, b, a_star]
    assert th.allclose(y, expected)
    vanilla = rewards + (1 - dones) * 0.95 * target.max(dim=-1).values
    assert not th.allclose(y, vanilla)  # random nets disagree on some branches


def test_branching_shapes_and_random_masks() -> None:
    model = _small(MaskBandit())
    n = len(TARGET_MASK)
    assert isinstance(model.policy, BranchingQPolicy)
    obs = _probe_obs(7)
    assert model.q_net(th.as_tensor(obs)).shape == (7, n, 2)
    single, _ = model.predict(obs[0], deterministic=True)
    batch, _ = model.predict(obs, deterministic=True)
    assert single.shape == (n,) and batch.shape == (7, n)
    assert set(np.unique(batch)) <= {0, 1}
    masks = model._random_actions(2000)
    assert masks.shape == (2000, n) and masks.min() >= 0 and masks.max() <= 1
    assert (masks.sum(axis=1) >= 1).all()
    assert abs(masks.mean() - 0.5) < 0.03
    # Replay buffer stores MultiBinary actions as (N,) vectors; the loss gathers per branch.
    model.learn(150)
    data = model.replay_buffer.sample(16)
    assert data.actions.shape == (16, n)
    q = model._gather_q(model.q_net(data.observations), data.actions)
    assert q.shape == (16, n)


def test_target_update_counts_gradient_steps() -> None:
    model = _small(RatioBandit(), tau=1.0, target_update_interval=2, target_update_unit="update")
    model.learn(model.learning_starts + 1)  # fills the buffer, one gradient step at most
    model.train(gradient_steps=1, batch_size=16)
    n1 = model._n_updates

    def same() -> bool:
        return all(
            th.equal(a, b)
            for a, b in zip(model.q_net.parameters(), model.q_net_target.parameters(), strict=True)
        )

    assert same() == (n1 % 2 == 0)
    model.train(gradient_steps=1, batch_size=16)
    assert same() == ((n1 + 1) % 2 == 0)


def test_exponential_epsilon_and_agentvit_preset() -> None:
    model = DDQN.agentvit(MaskBandit(), seed=0, device="cpu", learning_starts=50)
    assert model.gamma == 0.95 and model.tau == 0.1 and model.target_update_interval == 2
    assert model.target_update_unit == "update" and model.exploration_schedule == "exp"
    assert model.policy.net_args["net_arch"] == [1024, 256]
    assert isinstance(model.policy.optimizer, th.optim.AdamW)
    assert model.policy.optimizer.defaults["amsgrad"] is True
    assert model.policy.optimizer.defaults["lr"] == pytest.approx(1e-2)
    model.learn(60)
    assert model.exploration_rate == pytest.approx(0.01 + 0.99 * math.exp(-60 / 20_000))


# ---------------------------------------------------------------------------------------- save/load


@pytest.mark.parametrize("env_cls", [RatioBandit, MaskBandit])
def test_save_load_same_predict(env_cls: type[gym.Env], tmp_path: Path) -> None:
    model = _small(
        env_cls(), policy_kwargs=dict(net_arch=[16], **({"dueling": True} if env_cls is MaskBandit else {}))
    )
    model.learn(200)
    obs = _probe_obs()
    before, _ = model.predict(obs, deterministic=True)
    path = tmp_path / "agent.zip"
    model.save(path)
    loaded = DDQN.load(path, device="cpu")
    after, _ = loaded.predict(obs, deterministic=True)
    assert type(loaded.policy) is type(model.policy)
    assert loaded.target_update_unit == model.target_update_unit
    np.testing.assert_array_equal(before, after)
    with th.no_grad():
        th.testing.assert_close(loaded.q_net(th.as_tensor(obs)), model.q_net(th.as_tensor(obs)))


# ---------------------------------------------------------------------------------------- learning


def test_learns_best_keep_ratio() -> None:
    model = _small(RatioBandit(), learning_starts=200, batch_size=64)
    model.learn(1500)
    obs = _probe_obs(64)
    greedy, _ = model.predict(obs, deterministic=True)
    # The context is irrelevant: the greedy action is the best ratio almost everywhere, and on average.
    assert (greedy == BEST_RATIO).mean() >= 0.9
    with th.no_grad():
        assert int(model.q_net(th.as_tensor(obs)).mean(dim=0).argmax()) == BEST_RATIO


def test_learns_target_mask() -> None:
    model = _small(MaskBandit(), learning_starts=200, batch_size=64)
    model.learn(1500)
    greedy, _ = model.predict(_probe_obs(64), deterministic=True)
    match = (greedy == TARGET_MASK).mean(axis=1)
    assert match.mean() >= 7 / 8
    assert (greedy.sum(axis=1) >= 1).all()


# ---------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("env_cls", [RatioBandit, MaskBandit])
def test_same_seed_same_predictions(env_cls: type[gym.Env]) -> None:
    obs = _probe_obs()
    runs = []
    for _ in range(2):
        model = _small(env_cls(), seed=7)
        model.learn(300)
        with th.no_grad():
            q = model.q_net(th.as_tensor(obs))
        runs.append((model.predict(obs, deterministic=True)[0], q))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert th.equal(runs[0][1], runs[1][1])


# ---------------------------------------------------------------------------------------- logging


def test_tensorboard_has_loss_and_rollout_stats(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _small(RatioBandit(), tensorboard_log=str(tmp_path))
    model.learn(300, log_interval=20, tb_log_name="ddqn")
    run_dirs = list(tmp_path.glob("ddqn_*"))
    assert len(run_dirs) == 1
    acc = EventAccumulator(str(run_dirs[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/q_mean",
        "rollout/exploration_rate",
        "rollout/kept_patches",
        "rollout/step_seconds",
    }
    assert expected <= tags
    kept = [e.value for e in acc.Scalars("rollout/kept_patches")]
    assert all(8.0 <= v <= 40.0 for v in kept)
    assert all(np.isfinite(e.value) for e in acc.Scalars("train/loss"))


def test_progress_bar_is_labelled_with_the_run_name_and_counts_steps() -> None:
    from stable_baselines3.common.callbacks import BaseCallback

    from keepgym.agents.callbacks import NamedProgressBar

    class Spy(BaseCallback):
        bars: list = []

        def _on_training_start(self) -> None:
            todo = [self.locals["callback"]]
            while todo:  # learn()'s callback list, nested lists included
                cb = todo.pop()
                todo.extend(getattr(cb, "callbacks", []))
                if isinstance(cb, NamedProgressBar):
                    Spy.bars.append(cb)

        def _on_step(self) -> bool:
            return True

    agent = DDQN("MlpPolicy", RatioBandit(), learning_starts=2, seed=0)
    agent.learn(4, callback=Spy(), tb_log_name="agentvit ddqn", progress_bar=True)
    assert [(b.desc, b.unit) for b in Spy.bars] == [("agentvit ddqn", "step")]
    assert Spy.bars[0].pbar.n == 4
