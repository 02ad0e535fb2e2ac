"""Tests for envs/patch_select_env.py: PatchSelectEnv and benchmark_vit, at tiny size on synthetic data."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from keepgym.envs.data import load_dataset
from keepgym.envs.patch_select_env import PatchSelectEnv, benchmark_vit
from keepgym.models.vit import select_random_k, select_topk

N = 16  # 16x16 images, patch 4


@pytest.fixture(scope="module")
def data():
    # 144 training images -> 4 steps of 32 per epoch.
    return load_dataset("synthetic", image_size=16, train_size=160, test_size=40, num_classes=4)


def make_env(data, **kw) -> PatchSelectEnv:
    cfg = dict(
        data=data,
        patch_size=4,
        dim=16,
        depth=2,
        heads=2,
        mlp_dim=32,
        dim_head=8,
        batch_size=32,
        device="cpu",
        warmup_epochs=0,
    )
    cfg.update(kw)
    return PatchSelectEnv(**cfg)


def weights(env: PatchSelectEnv) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in env.vit.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("action_mode", ["ratio", "mask", "patches"])
def test_check_env_passes(data, action_mode):
    # Timings are off by default: Gymnasium compares `info` exactly across two seeded runs.
    gym_check_env(make_env(data, action_mode=action_mode, warmup_epochs=1), skip_render_check=True)
    # (the patches mode's (B, N, F) observation only draws SB3's "is it an image?" warnings)
    sb3_check_env(make_env(data, action_mode=action_mode), warn=True)


def test_spaces(data):
    env = make_env(data)
    assert env.action_space.n == 5 and env.observation_space.shape == (N,)
    assert env.keep_counts == (4, 6, 8, 12, 16)
    assert env.target_keep == 8  # round(30 / 64 * 16)
    assert make_env(data, action_mode="mask").action_space.n == N
    assert np.isinf(make_env(data, state="agentvit").observation_space.high).all()


def test_ratio_step_keeps_top_k_and_macs_fall(data):
    env = make_env(data, info_timings=True)
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (N,) and abs(obs.sum() - 1) < 1e-4
    assert info == {"epoch": 0}
    macs = []
    for action in (3, 2, 0):
        _, reward, terminated, truncated, info = env.step(action)
        assert info["kept"] == env.keep_counts[action]
        assert info["macs_per_image"] == env.vit.analytic_macs(info["kept"])
        assert info["step_seconds"] > 0 and np.isfinite(info["loss"])
        assert not terminated and not truncated
        macs.append(info["macs_per_image"])
    assert macs[0] > macs[1] > macs[2]


def test_reward_formula(data):
    env = make_env(data, target_keep=6, loss_weight=2.0, patch_weight=10.0)
    env.reset(seed=0)
    _, r0, _, _, info0 = env.step(4)  # keep all 16: z = 0, z* = 10
    assert r0 == pytest.approx(2.0 * 1.0 - 10.0 * 10 / 10)  # L_ref is this first step's loss
    _, r1, _, _, info1 = env.step(1)  # keep 6: on target
    assert info1["reward_patch"] == 0.0
    assert r1 == pytest.approx(2.0 * info0["loss"] / info1["loss"])


def test_mask_action_keeps_the_masked_patches(data):
    env = make_env(data, action_mode="mask")
    env.reset(seed=0)
    mask = np.zeros(N, dtype=np.int8)
    mask[[0, 5, 6, 15]] = 1
    _, _, _, _, info = env.step(mask)
    assert info["kept"] == 4 and info["macs_per_image"] == env.vit.analytic_macs(4)


def test_same_seed_same_actions_identical(data):
    def rollout(env):
        obs, _ = env.reset(seed=7)
        out = [obs]
        rng = np.random.default_rng(0)
        for _episode in range(2):
            truncated = False
            while not truncated:
                obs, reward, _, truncated, _ = env.step(int(rng.integers(5)))
                out += [obs, np.array([reward])]
            obs, _ = env.reset()  # next epoch of the same run
            out.append(obs)
        return out

    a, b = rollout(make_env(data)), rollout(make_env(data))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    other_obs, _ = make_env(data).reset(seed=8)
    assert not np.array_equal(a[0], other_obs)


def test_episode_is_one_epoch_and_reset_continues_the_run(data):
    env = make_env(data)
    env.reset(seed=0)
    assert env.steps_per_epoch == 4
    truncs = [env.step(2)[3] for _ in range(4)]
    assert truncs == [False, False, False, True]
    with pytest.raises(RuntimeError):
        env.step(2)
    trained = weights(env)
    _, info = env.reset()
    assert info["epoch"] == 1 and same_weights(trained, weights(env))
    env.reset(seed=0)
    assert env.epoch == 0 and not same_weights(trained, weights(env))  # a fresh run


def test_warmup_is_outside_the_agents_mdp(data):
    # reset(seed) trains the warm-up epoch on all patches itself and returns epoch 1's first state:
    # every transition an agent sees is a real one (chosen patches, a reward).
    env, ref = make_env(data, warmup_epochs=1), make_env(data)
    _, info = env.reset(seed=0)
    ref.reset(seed=0)
    assert info == {"epoch": 1} and not same_weights(weights(env), weights(ref))  # the ViT has trained
    seen = []
    for _ in range(4):
        _, reward, _, truncated, info = env.step(0)
        seen.append((info["epoch"], info["kept"], reward))
    assert truncated and all(epoch == 1 and kept == 4 and reward != 0.0 for epoch, kept, reward in seen)


def test_ddqn_driving_the_raw_env_never_stores_a_warmup_transition(data):
    from stable_baselines3.common.callbacks import BaseCallback

    from keepgym.agents.ddqn import DDQN

    class Record(BaseCallback):
        def __init__(self):
            super().__init__()
            self.infos = []

        def _on_step(self):
            self.infos += list(self.locals["infos"])
            return True

    env = make_env(data, warmup_epochs=2, keep_ratios=(0.25, 0.5))
    record = Record()
    DDQN("MlpPolicy", env, learning_starts=2, batch_size=4, seed=0, device="cpu").learn(6, callback=record)
    assert len(record.infos) == 6 and all(info["epoch"] >= 2 for info in record.infos)
    assert all(info["kept"] < N for info in record.infos)  # chosen patches, never the warm-up's all


@pytest.mark.parametrize(
    ("action_mode", "action"),
    [
        ("ratio", 5),
        ("ratio", -1),
        ("ratio", 1.5),
        ("ratio", np.array([1, 2])),
        ("ratio", "a"),
        ("mask", np.ones(N - 1, dtype=np.int8)),
        ("mask", np.full(N, 0.5)),
        ("mask", np.full(N, np.nan)),
    ],
)
def test_bad_action_raises_and_leaves_training_untouched(data, action_mode, action):
    env, fresh = make_env(data, action_mode=action_mode), make_env(data, action_mode=action_mode)
    obs, _ = env.reset(seed=3)
    fresh.reset(seed=3)
    before = weights(env)
    with pytest.raises(ValueError):
        env.step(action)
    assert same_weights(before, weights(env))
    # The data stream did not move either: the next valid step matches a run that never saw the bad action.
    good = 1 if action_mode == "ratio" else np.ones(N, dtype=np.int8)
    o1, r1, *_ = env.step(good)
    o2, r2, *_ = fresh.step(good)
    assert np.array_equal(o1, o2) and r1 == r2


@pytest.mark.parametrize(
    "kw",
    [
        dict(patch_size=5),
        dict(keep_ratios=(0.0, 0.5)),
        dict(keep_ratios=(0.5, 1.5)),
        dict(keep_ratios=()),
        dict(target_keep=N),
        dict(action_mode="top"),
        dict(state="cls"),
        dict(state_layer=2),
        dict(image_size=32),
    ],
)
def test_bad_constructor_arguments_raise(data, kw):
    with pytest.raises(ValueError):
        make_env(data, **kw)


def test_evaluate_reports_cost_and_leaves_weights_untouched(data):
    env = make_env(data)
    env.reset(seed=0)
    env.step(4)
    before = weights(env)
    full = env.evaluate()
    top = env.evaluate(functools.partial(select_topk, k=4))
    rand = env.evaluate(functools.partial(select_random_k, k=8, generator=torch.Generator().manual_seed(0)))
    assert same_weights(before, weights(env)) and env.vit.training
    assert full["kept_patches"] == N and top["kept_patches"] == 4 and rand["kept_patches"] == 8
    assert full["macs_per_image"] == env.vit.analytic_macs(N) > rand["macs_per_image"] > top["macs_per_image"]
    assert full["score_macs_per_image"] == 0 and top["score_macs_per_image"] == env.state_macs_per_image
    assert 0.0 <= full["accuracy"] <= 1.0 and full["images_per_second"] > 0
    policy = env.evaluate_policy(lambda obs: 2, split="test")
    assert policy["kept_patches"] == 8 and policy["macs_per_image"] == env.vit.analytic_macs(8)


def test_cls_token_env_and_agentvit_state(data):
    env = make_env(data, cls_token=True, state="agentvit", action_mode="mask")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (N,) and env.observation_space.contains(obs)
    _, _, _, _, info = env.step(np.eye(N, dtype=np.int8)[3])
    assert info["kept"] == 1 and info["macs_per_image"] == env.vit.analytic_macs(1)


def test_save_uses_models_save_model(data, tmp_path):
    models = pytest.importorskip("keepgym.models")
    if not hasattr(models, "save_model"):
        pytest.skip("models.save_model not available yet")
    env = make_env(data)
    env.reset(seed=0)
    env.step(1)
    path = tmp_path / "vit.pt"
    env.save(str(path))
    loaded = models.load_model(str(path))
    x = torch.randn(2, 3, 16, 16)
    env.vit.eval()
    assert torch.allclose(loaded.eval()(x), env.vit(x), atol=1e-6)


def test_benchmark_vit_tiny():
    rows = benchmark_vit(
        keep_fracs=(1.0, 0.5),
        batch_size=8,
        steps=1,
        warmup=0,
        dim=16,
        depth=1,
        heads=2,
        mlp_dim=32,
        dim_head=8,
    )
    assert [r["kept"] for r in rows] == [64, 32]
    assert rows[0]["train_speedup"] == 1.0 and rows[1]["macs_per_image"] < rows[0]["macs_per_image"]
    assert all(r["train_step_seconds"] > 0 and r["images_per_second"] > 0 for r in rows)
