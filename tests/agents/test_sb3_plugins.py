"""Any SB3 algorithm on keepgym's envs with the same three lines, watched in TensorBoard.

PPO, SAC and A2C (and ``keepgym.agents.RLPruner``) on a tiny ``RLPrune-Digits-v0`` (random 1/8-width VGG-11,
3 stages per episode, L1 criterion); DQN, PPO and ``keepgym.agents.DDQN`` on a tiny ``PatchSelect-Digits-v0``
(2-block ViT, 5 steps per epoch) in ``ratio`` and ``mask`` mode. Every run's TensorBoard events are
read back and the documented tags asserted.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, DQN, PPO, SAC

import keepgym  # noqa: F401 - registers the env ids
from keepgym.agents.callbacks import EnvInfoCallback, read_tensorboard
from keepgym.agents.ddqn import DDQN
from keepgym.agents.rl_pruner import RLPruner
from keepgym.experiments.sb3_example import TINY_ALGO_KWARGS, TINY_ENV_KWARGS, run

PRUNE_ID, PATCH_ID = "RLPrune-Digits-v0", "PatchSelect-Digits-v0"
TRAIN_TAG = {PPO: "train/value_loss", A2C: "train/value_loss", SAC: "train/actor_loss", DQN: "train/loss"}
TRAIN_TAG[DDQN] = "train/loss"
HPARAMS = {
    PPO: TINY_ALGO_KWARGS["ppo"],
    A2C: TINY_ALGO_KWARGS["a2c"],
    SAC: TINY_ALGO_KWARGS["sac"],
    DQN: TINY_ALGO_KWARGS["dqn"],
    DDQN: TINY_ALGO_KWARGS["ddqn"],
    RLPruner: TINY_ALGO_KWARGS["rlpruner"],
}
PRUNE_SCALARS = {"env/accuracy", "env/macs_ratio", "env/params_ratio", "env/sparsity", "env/final_accuracy"}
PATCH_SCALARS = {"env/kept", "env/step_seconds", "env/loss", "env/macs_per_image"}


def three_lines(algo_cls, env_id, env_kwargs, logdir, timesteps):
    """The pattern of the README, verbatim; only the algorithm class (and its tiny settings) change."""
    env = gym.make(env_id, **env_kwargs)
    model = algo_cls("MlpPolicy", env, tensorboard_log=str(logdir), seed=0, **HPARAMS[algo_cls])
    callback = EnvInfoCallback(image_interval=4)
    model.learn(total_timesteps=timesteps, callback=callback, log_interval=1)
    return model, callback, read_tensorboard(model.logger.get_dir())


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.policy.parameters()]


def _config(acc) -> str:
    return acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.mark.parametrize("algo_cls", [PPO, SAC, A2C], ids=lambda c: c.__name__)
def test_sb3_algorithms_learn_on_rlprune_digits_and_log_the_documented_tags(algo_cls, tmp_path):
    env = gym.make(PRUNE_ID, **TINY_ENV_KWARGS["prune"])
    before = _params(algo_cls("MlpPolicy", env, seed=0, **HPARAMS[algo_cls]))
    model, callback, acc = three_lines(algo_cls, PRUNE_ID, TINY_ENV_KWARGS["prune"], tmp_path, 36)

    tags = acc.Tags()
    assert PRUNE_SCALARS | {"rollout/ep_rew_mean", TRAIN_TAG[algo_cls]} <= set(tags["scalars"])
    assert {"env/group_sparsity", "env/widths"} <= set(tags["histograms"])
    assert "env/group_sparsity_image" in tags["images"]
    assert f'"env_id": "{PRUNE_ID}"' in _config(acc) and algo_cls.__name__ in _config(acc)
    assert len(acc.Scalars("env/accuracy")) == model.num_timesteps  # one point per stage
    # The policy was updated, and every episode reached the target sparsity with fewer MACs.
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))
    raw = model.get_env().envs[0].unwrapped
    assert raw.num_stages == 3 and len(callback.episodes) == model.num_timesteps // 3 >= 12
    target = raw.target_channels / raw.n0
    for episode in callback.episodes:
        assert episode["sparsity"] == pytest.approx(target)
        assert 0.0 < episode["macs_ratio"] < 1.0 and 0.0 <= episode["accuracy"] <= 1.0
    action, _ = model.predict(raw.observation_space.sample(), deterministic=True)
    assert raw.action_space.contains(np.asarray(action, dtype=np.float32))


@pytest.mark.parametrize(
    "algo_cls, kind",
    [(DQN, "patch"), (PPO, "patch"), (PPO, "patch-mask"), (DDQN, "patch-mask")],
    ids=["dqn-ratio", "ppo-ratio", "ppo-mask", "ddqn-mask"],
)
def test_algorithms_on_patchselect_digits_log_kept_patches_and_step_time(algo_cls, kind, tmp_path):
    # Timings are off by default (check_env compares infos); env/step_seconds needs them on.
    model, callback, acc = three_lines(algo_cls, PATCH_ID, dict(TINY_ENV_KWARGS[kind], info_timings=True), tmp_path, 30)

    tags = set(acc.Tags()["scalars"])
    assert PATCH_SCALARS | {"rollout/ep_rew_mean", TRAIN_TAG[algo_cls]} <= tags
    assert f'"env_id": "{PATCH_ID}"' in _config(acc)
    raw = model.get_env().envs[0].unwrapped
    kept = [p.value for p in acc.Scalars("env/kept")]
    assert len(kept) == model.num_timesteps
    if kind == "patch":
        assert set(kept) <= set(raw.keep_counts)
    else:
        assert all(1 <= k <= raw.num_patches for k in kept)
    assert all(p.value > 0 for p in acc.Scalars("env/step_seconds"))
    assert len(callback.episodes) == model.num_timesteps // raw.steps_per_epoch


def test_rlpruner_and_ppo_take_identical_calls_and_log_the_same_env_figures(tmp_path):
    results = {}
    for algo_cls in (PPO, RLPruner):
        model, callback, acc = three_lines(algo_cls, PRUNE_ID, TINY_ENV_KWARGS["prune"], tmp_path / "x", 6)
        env_tags = {t for t in acc.Tags()["scalars"] if t.startswith("env/")}
        results[algo_cls] = (model, env_tags, [sorted(e) for e in callback.episodes], acc)
    (ppo, ppo_tags, ppo_eps, _), (rlp, rlp_tags, rlp_eps, rlp_acc) = results[PPO], results[RLPruner]
    assert ppo_tags == rlp_tags and PRUNE_SCALARS <= ppo_tags
    assert ppo_eps == rlp_eps and len(rlp_eps) == 2
    assert "rollout/ep_rew_mean" in rlp_acc.Tags()["scalars"]
    for model in (ppo, rlp):  # both are SB3 algorithms: same predict / save / load surface
        obs = model.get_env().envs[0].unwrapped.observation_space.sample()
        model.save(tmp_path / "agent.zip")
        loaded = type(model).load(tmp_path / "agent.zip")
        np.testing.assert_allclose(
            model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0], rtol=1e-6
        )


def test_the_example_runs_every_algorithm_with_the_same_result_format(tmp_path):
    result = run("a2c", "prune", 6, logdir=str(tmp_path))
    assert result["timesteps"] >= 6 and len(result["episodes"]) == 2
    assert set(result["final"]) == {
        "env",
        "timestep",
        "accuracy",
        "macs_ratio",
        "params_ratio",
        "sparsity",
        "widths",
    }
    assert (tmp_path / "a2c_prune_1").is_dir()
