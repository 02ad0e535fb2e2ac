"""DDQN on PatchSelectEnv's ``patches`` mode: the agent picks which patches, per image, and beats
attention top-k on a toy task where attention points at the wrong patches by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keepgym.agents.ddqn import DDQN, PatchQPolicy, PatchReplayBuffer
from keepgym.envs.data import DatasetSplits
from keepgym.envs.patch_select_env import PatchSelectEnv
from keepgym.models.vit import ViT, select_random_k, select_topk

SIZE, P, K, CLASSES = 16, 4, 4, 4
N = (SIZE // P) ** 2


def _toy_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image: K low-contrast patches carrying the class (a stripe pattern) at random places; the
    other patches are high-contrast noise that says nothing about the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randint(0, 256, (n, 1, SIZE, SIZE), generator=g).float()
    r, c = torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij")
    patterns = torch.stack([(r % 2), (c % 2), ((r + c) % 2), (r >= P // 2).long()]).float()  # (CLASSES, P, P)
    grid = SIZE // P
    for i in range(n):
        for idx in torch.randperm(N, generator=g)[:K].tolist():
            pr, pc = divmod(idx, grid)
            x[i, 0, pr * P : (pr + 1) * P, pc * P : (pc + 1) * P] = 110 + 30 * patterns[y[i]]
    return x.clamp(0, 255).to(torch.uint8), y


def _toy_data() -> DatasetSplits:
    tr_x, tr_y = _toy_images(800, 0)
    te_x, te_y = _toy_images(200, 1)
    return DatasetSplits(
        "toy", CLASSES, 1, SIZE, tr_x[:640], tr_y[:640], tr_x[640:], tr_y[640:], te_x, te_y, (0.5,), (0.3,)
    )


class ContrastSeekingViT(ViT):
    """A ViT whose block attention (what top-k reads) goes to the highest-contrast patches: the noise."""

    @torch.no_grad()
    def attention_map(self, x, layer=0):
        tokens, out, _ = super().attention_map(x, layer)
        contrast = torch.nn.functional.unfold(x, P, stride=P).std(dim=1)  # (B, N)
        received = (4 * (contrast - contrast.mean(1, keepdim=True)) / contrast.std(1, keepdim=True)).softmax(1)
        attn = received[:, None, None, :].expand(-1, self.heads, N, -1).contiguous()
        return tokens, out, attn


@pytest.fixture(scope="module")
def toy():
    return _toy_data()


def make_env(data, **kw):
    torch.manual_seed(0)
    vit = ContrastSeekingViT(image_size=SIZE, patch_size=P, num_classes=CLASSES, in_chans=1, dim=32, depth=2,
                             heads=2, mlp_dim=64, dim_head=16)
    cfg = dict(data=data, model=vit, action_mode="patches", target_keep=K, batch_size=32, warmup_epochs=0,
               augment=False, device="cpu", reward_images=16, learning_rate=2e-3)
    cfg.update(kw)
    return PatchSelectEnv(**cfg)


def test_patch_mode_builds_patch_policy_and_buffer(toy):
    env = make_env(toy)
    agent = DDQN("MlpPolicy", env, learning_starts=2, batch_size=8, buffer_size=100, seed=0, device="cpu")
    assert isinstance(agent.policy, PatchQPolicy) and isinstance(agent.replay_buffer, PatchReplayBuffer)
    agent.learn(4)
    buf = agent.replay_buffer
    assert buf.pos == 4 * 16  # one stored decision per rewarded image
    assert (buf.actions[: buf.pos].sum(axis=1) == K).all()
    obs, _ = env.reset(seed=0)
    action, _ = agent.predict(obs, deterministic=True)
    assert action.shape == (32, N) and np.abs(action).max() <= 1


def test_agent_beats_misleading_attention_topk_on_the_toy(toy):
    env = make_env(toy)
    agent = DDQN(
        "MlpPolicy", env, learning_rate=3e-3, buffer_size=20_000, learning_starts=20, batch_size=256,
        exploration_fraction=0.4, exploration_final_eps=0.05, seed=0, device="cpu",
    )
    agent.learn(400)  # 20 epochs of 20 ViT steps
    chosen = env.evaluate_policy(agent, split="val")
    topk = env.evaluate(lambda s: select_topk(s, K), split="val")
    rand = env.evaluate(lambda s: select_random_k(s, K, torch.Generator().manual_seed(0)), split="val")
    print(f"agent {chosen['accuracy']:.3f} top-k {topk['accuracy']:.3f} random {rand['accuracy']:.3f}")
    assert chosen["kept_patches"] == topk["kept_patches"] == K
    assert chosen["accuracy"] >= topk["accuracy"] + 0.3
    assert chosen["accuracy"] >= rand["accuracy"] + 0.1


def test_patch_agent_and_buffer_save_and_load(toy, tmp_path):
    env = make_env(toy)
    agent = DDQN("MlpPolicy", env, learning_starts=2, batch_size=8, buffer_size=200, seed=0, device="cpu")
    agent.learn(5)
    agent.save(tmp_path / "agent.zip")
    agent.save_replay_buffer(tmp_path / "buffer.npz")
    loaded = DDQN.load(tmp_path / "agent.zip", env=env, device="cpu")
    loaded.load_replay_buffer(tmp_path / "buffer.npz")
    obs, _ = env.reset(seed=1)
    a, _ = agent.predict(obs, deterministic=True)
    b, _ = loaded.predict(obs, deterministic=True)
    assert isinstance(loaded.policy, PatchQPolicy) and np.array_equal(a, b)
    for name in ("observations", "actions", "rewards"):
        assert np.array_equal(getattr(agent.replay_buffer, name), getattr(loaded.replay_buffer, name))
    assert loaded.replay_buffer.pos == agent.replay_buffer.pos == 5 * 16
