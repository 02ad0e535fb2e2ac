"""PatchSelectEnv's contract: per-image patch choice, state_dict, pickling, any ViT, check_env on every id."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env

import keepgym  # noqa: F401 - registers the ids
from keepgym.envs import PATCH_ENV_IDS
from keepgym.envs.data import DatasetNotFoundError, load_dataset
from keepgym.envs.patch_select_env import PATCH_FEATURES, PatchSelectEnv

N = 16


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", image_size=16, train_size=160, test_size=40, num_classes=4)


def make_env(data, **kw) -> PatchSelectEnv:
    cfg = dict(
        data=data, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8, batch_size=32, device="cpu",
        warmup_epochs=0,
    )
    cfg.update(kw)
    return PatchSelectEnv(**cfg)


def rollout(env, actions) -> list:
    out = []
    for a in actions:
        obs, reward, _, truncated, info = env.step(a)
        out.append((obs, reward, truncated, {k: v for k, v in info.items() if k != "step_seconds"}))
        if truncated:
            obs, info = env.reset()
            out.append((obs, info))
    return out


def same(a, b) -> bool:
    from gymnasium.utils.env_checker import data_equivalence

    return data_equivalence(a, b)


@pytest.mark.slow  # each seeded reset trains a warm-up epoch at the id's full size (Digits: ~30 s)
@pytest.mark.parametrize("env_id", sorted(PATCH_ENV_IDS))
def test_check_env_on_every_id_with_defaults(env_id):
    try:
        env = gym.make(env_id).unwrapped
    except DatasetNotFoundError as err:
        pytest.skip(f"{env_id}: dataset not on this machine ({str(err).splitlines()[0][:80]})")
    gym_check_env(env, skip_render_check=True)


def test_patches_mode_keeps_the_chosen_patches_per_image_and_rewards_the_choice(data):
    env = make_env(data, action_mode="patches", target_keep=4, reward_images=8)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (32, N, len(PATCH_FEATURES)) and env.observation_space.contains(obs)
    assert env.action_space.shape == (32, N)
    scores = np.zeros((32, N), dtype=np.float32)
    for i in range(32):
        scores[i, [i % N, (i + 3) % N, (i + 7) % N, (i + 11) % N]] = 1.0  # a different set per image
    _, reward, _, _, info = env.step(scores)
    assert info["kept"] == 4 and info["image_keep"].shape == (8, 4)
    for i in range(8):
        assert sorted(info["image_keep"][i]) == sorted([i % N, (i + 3) % N, (i + 7) % N, (i + 11) % N])
    assert info["image_rewards"].shape == (8,) and reward == pytest.approx(float(info["image_rewards"].mean()))
    with pytest.raises(ValueError):
        env.step(np.full((32, N), np.nan, dtype=np.float32))
    with pytest.raises(ValueError):
        env.step(np.zeros((31, N), dtype=np.float32))


def test_a_mask_that_keeps_nothing_keeps_one_patch(data):
    env = make_env(data, action_mode="mask")
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.zeros(N, dtype=np.int8))
    assert info["kept"] == 1 and np.isfinite(info["loss"])


@pytest.mark.parametrize("action_mode", ["ratio", "patches"])
@pytest.mark.parametrize("cut", [0, 2, 5])  # epoch start, mid-epoch, mid-way through the next epoch
def test_state_dict_resumes_bit_for_bit(data, action_mode, cut, tmp_path):
    space = make_env(data, action_mode=action_mode).action_space
    space.seed(1)
    actions = [space.sample() for _ in range(10)]
    a = make_env(data, action_mode=action_mode, warmup_epochs=1)
    a.reset(seed=5)
    rollout(a, actions[:cut])
    path = tmp_path / "env.pt"
    torch.save(a.state_dict(), path)  # what a checkpoint holds; read back without unpickling
    b = make_env(data, action_mode=action_mode, warmup_epochs=1)
    b.load_state_dict(torch.load(path, weights_only=True))
    assert same(rollout(a, actions[cut:]), rollout(b, actions[cut:]))
    assert all(torch.equal(v, b.vit.state_dict()[k]) for k, v in a.vit.state_dict().items())


def test_state_dict_after_episode_end_continues_with_reset(data):
    a = make_env(data)
    a.reset(seed=2)
    rollout(a, [1, 2, 3])
    a.step(0)  # last step of the epoch (4 steps)
    state = a.state_dict()
    b = make_env(data)
    b.load_state_dict(state)
    assert same(a.reset(), b.reset())
    assert same(rollout(a, [2, 2, 1]), rollout(b, [2, 2, 1]))


@pytest.mark.parametrize("action_mode", ["ratio", "mask", "patches"])
def test_env_pickles_before_and_during_a_run(data, action_mode):
    env = make_env(data, action_mode=action_mode)
    fresh = pickle.loads(pickle.dumps(env))
    assert same(env.reset(seed=1), fresh.reset(seed=1))
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(7)]
    rollout(env, actions[:2])
    copy = pickle.loads(pickle.dumps(env))
    assert same(rollout(env, actions[2:]), rollout(copy, actions[2:]))


def test_torchvision_vit_trains_in_the_env(data):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tv = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                           num_classes=4)
    env = make_env(data, model=tv, action_mode="patches", target_keep=5)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (32, N, len(PATCH_FEATURES))
    _, _, _, _, info = env.step(np.random.default_rng(0).random((32, N)).astype(np.float32))
    assert info["kept"] == 5 and np.isfinite(info["loss"])
    assert info["macs_per_image"] < env.vit.analytic_macs(N)
    r = env.evaluate_policy(lambda o: o[..., 0], split="test")  # keep the most attended, via the policy path
    assert r["kept_patches"] == 5 and 0 <= r["accuracy"] <= 1
    with pytest.raises(ValueError):
        make_env(load_dataset("synthetic", image_size=32, train_size=64, test_size=8, num_classes=4), model=tv)


def test_save_a_torchvision_vit_built_by_create_model_or_refuse_in_one_line(data, tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    from keepgym.models import create_model

    sizes = dict(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4)
    ref = "torchvision.models.vision_transformer:VisionTransformer"
    env = make_env(data, model=create_model(ref, **sizes))
    env.reset(seed=0)
    env.step(1)
    env.save(str(tmp_path / "tv.pt"))
    raw = torch.load(tmp_path / "tv.pt", weights_only=True)  # the wrapped model itself, with its recipe
    assert raw["format"] == "keepgym-model" and raw["spec"]["name"] == ref
    trained = env.vit.model.state_dict()
    assert raw["state_dict"].keys() == trained.keys()
    assert all(torch.equal(raw["state_dict"][k], v) for k, v in trained.items())
    plain = make_env(data, model=VisionTransformer(**sizes))
    with pytest.raises(ValueError, match="create_model") as err:
        plain.save(str(tmp_path / "plain.pt"))
    assert "\n" not in str(err.value) and not (tmp_path / "plain.pt").exists()


@pytest.mark.parametrize("cut", [0, 3])
def test_reset_with_a_state_dict_option_continues_the_run(data, cut):
    a = make_env(data, warmup_epochs=1)
    a.reset(seed=3)
    rollout(a, [1, 2, 0][:cut])
    b = make_env(data, warmup_epochs=1)
    b.reset(seed=99)  # another run: the option replaces it entirely
    obs, info = b.reset(options={"state_dict": a.state_dict()})
    assert same(obs, a.observe()) and info["epoch"] == a.epoch and b.epoch_step == a.epoch_step == cut
    assert same(rollout(a, [3, 1, 4, 0, 2]), rollout(b, [3, 1, 4, 0, 2]))


def test_every_patch_id_has_a_v1_with_the_same_settings():
    v0 = {i: kw for i, kw in PATCH_ENV_IDS.items() if i.endswith("-v0")}
    assert v0 and all(PATCH_ENV_IDS[i.replace("-v0", "-v1")] == kw for i, kw in v0.items())
    for env_id in PATCH_ENV_IDS:
        assert gym.spec(env_id).entry_point == "keepgym.envs.patch_select_env:PatchSelectEnv"
    env = gym.make("PatchSelect-Digits-v1", train_size=128, batch_size=32, dim=16, depth=1, heads=2, mlp_dim=32,
                   dim_head=8, warmup_epochs=1).unwrapped
    obs, info = env.reset(seed=0)
    assert info["epoch"] == 1 and env.observation_space.contains(obs)  # warm-up ran inside reset
    _, _, _, _, step_info = env.step(0)
    assert "step_seconds" not in step_info
