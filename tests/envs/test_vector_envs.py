"""Vectorised keepgym envs: SB3 ``make_vec_env`` (incl. ``SubprocVecEnv``) and ``gymnasium.vector``.

Env copies must share no mutable state (stepping one never changes another's model), be buildable in
a fresh worker process from their id and keyword arguments, and accept the ``render_mode`` that
``make_vec_env`` asks for.
"""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch

import keepgym  # noqa: F401 - registers the env ids
from keepgym.agents.callbacks import read_tensorboard
from keepgym.experiments.sb3_example import TINY_ENV_KWARGS, run

PRUNE_ID, PATCH_ID = "RLPrune-Digits-v0", "PatchSelect-Digits-v0"
PRUNE_KW = TINY_ENV_KWARGS["prune"]


def _tags(logdir) -> dict[str, set[str]]:
    tags = read_tensorboard(logdir).Tags()
    return {kind: set(tags[kind]) for kind in ("scalars", "histograms", "images", "tensors")}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ppo_on_two_subprocess_envs_completes_with_the_single_env_result_format(tmp_path):
    single = run("ppo", "prune", 16, logdir=str(tmp_path / "single"))
    vec = run("ppo", "prune", 16, n_envs=2, subproc=True, logdir=str(tmp_path / "vec"))

    assert vec["num_envs"] == 2 and vec["timesteps"] >= 16
    assert set(vec) == set(single)
    assert {tuple(sorted(e)) for e in vec["episodes"]} == {tuple(sorted(e)) for e in single["episodes"]}
    assert {e["env"] for e in vec["episodes"]} == {0, 1}  # both workers finished episodes
    for episode in vec["episodes"] + single["episodes"]:
        assert episode["sparsity"] == pytest.approx(single["final"]["sparsity"])
    assert _tags(vec["tensorboard"]) == _tags(single["tensorboard"])
    assert {"env/accuracy", "env/macs_ratio", "rollout/ep_rew_mean"} <= _tags(vec["tensorboard"])["scalars"]


def test_env_copies_share_no_mutable_state():
    a, b = (gym.make(PRUNE_ID, **PRUNE_KW).unwrapped for _ in range(2))
    a.reset(seed=0)
    b.reset(seed=0)
    b_before, teacher_before = _state(b.model), _state(a.teacher)
    storages = {p.untyped_storage().data_ptr() for p in b.model.parameters()}
    storages |= {p.untyped_storage().data_ptr() for p in b.teacher.parameters()}
    assert not storages & {p.untyped_storage().data_ptr() for p in a.model.parameters()}

    for _ in range(2):
        a.step(np.eye(a.num_groups, dtype=np.float32)[0])
    assert (a.group_widths < a.initial_group_widths).any()
    np.testing.assert_array_equal(b.group_widths, b.initial_group_widths)
    assert b.stage == 0
    for key, value in _state(b.model).items():
        assert torch.equal(value, b_before[key]), key
    for key, value in _state(a.teacher).items():  # the teacher (KD, reset) is never pruned
        assert torch.equal(value, teacher_before[key]), key


def test_sync_and_async_vector_envs_step_their_copies_independently_and_agree():
    actions = None
    results = []
    for cls in (gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv):
        venv = cls([lambda: gym.make(PRUNE_ID, **PRUNE_KW) for _ in range(3)])
        try:
            obs, _ = venv.reset(seed=[0, 1, 2])
            if actions is None:
                g = venv.single_action_space.shape[0]
                actions = np.stack([np.eye(g)[g - 1], np.ones(g), np.eye(g)[g - 2]]).astype(np.float32)
            obs, rewards, terminated, truncated, info = venv.step(actions)
            results.append((obs, rewards, np.stack(info["widths"])))
            if cls is gym.vector.SyncVectorEnv:
                models = [e.unwrapped.model for e in venv.envs]
                widths = [e.unwrapped.group_widths for e in venv.envs]
                # Each copy pruned as its own action said, on its own model.
                assert len({id(m) for m in models}) == 3
                assert not np.array_equal(widths[0], widths[1]) and not np.array_equal(widths[0], widths[2])
                for m, w in zip(models, widths, strict=True):
                    assert (
                        sum(c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)) <= w.sum()
                    )
        finally:
            venv.close()
    (obs_s, rew_s, widths_s), (obs_a, rew_a, widths_a) = results
    np.testing.assert_array_equal(widths_s, widths_a)
    np.testing.assert_allclose(obs_s, obs_a)
    np.testing.assert_allclose(rew_s, rew_a)


def test_patchselect_copies_train_their_own_vit():
    venv = gym.make_vec(PATCH_ID, num_envs=2, vectorization_mode="sync", **TINY_ENV_KWARGS["patch"])
    try:
        obs, _ = venv.reset(seed=[0, 1])
        vits = [e.unwrapped.vit for e in venv.envs]
        assert vits[0] is not vits[1]
        first = _state(vits[1])
        assert not np.allclose(obs[0], obs[1])  # different seeds, different ViTs
        venv.step(np.array([0, 4]))
        assert any(not torch.equal(v, first[k]) for k, v in vits[1].state_dict().items())
        assert not any(
            p.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
            for p in vits[0].parameters()
            for q in vits[1].parameters()
        )
    finally:
        venv.close()


@pytest.mark.parametrize("env_id, kwargs", [(PRUNE_ID, PRUNE_KW), (PATCH_ID, TINY_ENV_KWARGS["patch"])])
def test_rgb_array_render_mode_and_picklable_spec(env_id, kwargs):
    env = gym.make(env_id, render_mode="rgb_array", **kwargs)
    env.reset(seed=0)
    image = env.render()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size > 0
    spec = pickle.loads(pickle.dumps(env.spec))  # what a worker process receives
    assert spec.id == env_id and spec.kwargs["render_mode"] == "rgb_array"
    with pytest.raises(ValueError, match="render_mode"):
        gym.make(env_id, render_mode="nonsense", **kwargs)
