"""EpochCheckpointCallback + load_epoch_checkpoint: one atomic folder per epoch, an exact resume from any of them."""

from __future__ import annotations

import pytest
import torch
from stable_baselines3 import PPO

from keepgym.agents.callbacks import CHECKPOINT_STATE_FILE, EpochCheckpointCallback, load_epoch_checkpoint
from keepgym.agents.ddqn import DDQN
from keepgym.envs.data import load_dataset
from keepgym.envs.patch_select_env import PatchSelectEnv


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", image_size=16, train_size=160, test_size=40, num_classes=4)


def make_env(data) -> PatchSelectEnv:
    return PatchSelectEnv(
        data=data, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8, batch_size=32, device="cpu",
        warmup_epochs=1,
    )  # fmt: skip


def make_agent(algo, env):
    if algo == "ddqn":
        return DDQN("MlpPolicy", env, learning_starts=2, batch_size=8, seed=3, device="cpu")
    return PPO("MlpPolicy", env, n_steps=env.steps_per_epoch, batch_size=4, seed=3, device="cpu")


def vit_weights(env):
    return {k: v.clone() for k, v in env.vit.state_dict().items()}


@pytest.mark.parametrize("algo", ["ddqn", "ppo"])
def test_resume_from_an_epoch_checkpoint_equals_the_uninterrupted_run(data, tmp_path, algo):
    env = make_env(data)
    spe, epochs = env.steps_per_epoch, 3
    full = make_agent(algo, env)
    cb = EpochCheckpointCallback(tmp_path / "full", keep_last=5, evaluate=False)
    full.learn(epochs * spe, callback=cb)
    # warm-up epoch 1 inside the first reset, then one folder per agent epoch; the last one is marked finished
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["0002", "0003", "0004"]
    last = torch.load(tmp_path / "full" / "0004" / CHECKPOINT_STATE_FILE, weights_only=True)
    assert last["finished"] and last["num_timesteps"] == epochs * spe and cb.last_epoch == 4
    assert not torch.load(tmp_path / "full" / "0002" / CHECKPOINT_STATE_FILE, weights_only=True)["finished"]

    env2 = make_env(data)
    agent, state = load_epoch_checkpoint(tmp_path / "full" / "0002", type(full), env2)
    assert state["epoch"] == 2 and agent.num_timesteps == spe
    cb2 = EpochCheckpointCallback(tmp_path / "resumed", keep_last=1, evaluate=False)
    agent.learn(epochs * spe - agent.num_timesteps, callback=cb2, reset_num_timesteps=False)
    a, b = vit_weights(env), vit_weights(env2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in (tmp_path / "resumed").iterdir()] == ["0004"]  # keep_last=1
    obs = env.observe()
    assert (full.predict(obs, deterministic=True)[0] == agent.predict(obs, deterministic=True)[0]).all()


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        EpochCheckpointCallback(tmp_path, keep_last=0)
