"""``keepgym bench agentvit``: the per-step time of joint AgentViT training against full-patch ViT training."""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from keepgym.envs.data import load_dataset
from keepgym.envs.metrics import synchronize
from keepgym.experiments.common import resolve_device
from keepgym.models.vit import VIT_PRESETS

__all__ = ["benchmark_agentvit"]

logger = logging.getLogger(__name__)


def benchmark_agentvit(
    device: str = "cpu",
    quick: bool = False,
    steps: int | None = None,
    seed: int = 0,
    action_mode: str = "ratio",
    preset: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """Per-step time of joint training (agent + ViT on the agent's patches) vs full-patch ViT training.

    Both start from the same ViT (two copies) and run **interleaved** (one full step, one joint step,
    in turn), so drifts in machine load hit both alike. The full step reuses one batch (no loader
    cost, a small bias against the joint step, whose env draws and augments its batches). A joint step is what
    ``keepgym agentvit`` does per batch after warm-up: ``DDQN.predict``, ``env.step`` (ViT step on the
    kept patches, the scoring pass that makes the next observation and, in the patches mode, the
    all-patch reference loss of the rewarded images), storing the transition and one DDQN gradient
    step. The ratio mode holds the keep ratio nearest ``target_keep``; the patches mode keeps
    ``target_keep`` per image, as the agent must.

    Args:
        device: Where the ViT runs.
        quick: Tiny sizes (tests, smoke runs).
        steps: Timed steps (default 4 quick, 10 otherwise).
        seed: Seed of data, weights and agent.
        action_mode: ``"ratio"`` or ``"patches"``.
        preset: ViT preset (default ``vit_tiny`` quick, ``vit_cifar`` otherwise).
        batch_size: Images per step (default 32 quick, 128 otherwise).

    Returns:
        ``full_step_seconds``, ``joint_step_seconds`` (medians), the split of a joint step into
        ``joint_vit_step_seconds`` / ``joint_agent_seconds`` / ``joint_env_other_seconds`` (scoring,
        reference loss, observation), ``speedup`` (full / joint), ``kept`` of ``num_patches`` and the
        settings.
    """
    from stable_baselines3.common.logger import configure

    from keepgym.agents.ddqn import DDQN
    from keepgym.envs.patch_select_env import PatchSelectEnv

    dev = torch.device(resolve_device(device))
    default_preset, default_batch, train_size = ("vit_tiny", 32, 200) if quick else ("vit_cifar", 128, 1500)
    preset, batch = preset or default_preset, batch_size or default_batch
    steps = steps or (4 if quick else 10)
    data = load_dataset("synthetic", train_size=train_size, test_size=50, seed=seed)
    env = PatchSelectEnv(
        data=data,
        batch_size=batch,
        warmup_epochs=0,
        device=dev,
        info_timings=True,
        action_mode=action_mode,
        **VIT_PRESETS[preset],
    )
    if action_mode == "patches":
        agent = DDQN("MlpPolicy", env, learning_starts=0, batch_size=128, seed=seed, device="cpu")
    else:
        agent = DDQN("MlpPolicy", env, learning_starts=0, batch_size=64, seed=seed, device="cpu")
    agent.set_logger(configure(None, []))
    n = env.num_patches
    ratio_action = min(range(len(env.keep_ratios)), key=lambda i: abs(env.keep_counts[i] - env.target_keep))

    obs, _ = env.reset(seed=seed)
    full_vit = copy.deepcopy(env.vit)
    full_opt = torch.optim.Adam(full_vit.parameters(), lr=1e-3, fused=dev.type in ("cpu", "cuda"))

    def joint_step(obs: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        synchronize(dev)
        start = time.perf_counter()
        action, _ = agent.predict(obs, deterministic=False)
        if action_mode != "patches":
            action = np.asarray(ratio_action)
        t_pred = time.perf_counter()
        new_obs, reward, _, truncated, info = env.step(action)
        t_env = time.perf_counter()
        agent.replay_buffer.add(  # type: ignore[union-attr]
            obs[None], new_obs[None], np.asarray(action)[None], np.array([reward]), np.array([False]), [info]
        )
        agent.train(gradient_steps=1, batch_size=agent.batch_size)
        end = time.perf_counter()
        if truncated:
            new_obs, _ = env.reset()
        vit_s = info["step_seconds"]
        return new_obs, end - start, vit_s, (t_pred - start) + (end - t_env)

    def full_step(x: torch.Tensor, y: torch.Tensor) -> float:
        full_vit.train()
        synchronize(dev)
        start = time.perf_counter()
        loss = F.cross_entropy(full_vit(x), y)
        full_opt.zero_grad(set_to_none=True)
        loss.backward()
        full_opt.step()
        synchronize(dev)
        return time.perf_counter() - start

    obs, *_ = joint_step(obs)  # a replay buffer to sample from, and one untimed round of each
    x, y = data.normalize(data.train_x[:batch].to(dev)), data.train_y[:batch].to(dev)
    full_step(x, y)
    full, total, vit_t, agent_t = [], [], [], []
    for _ in range(steps):
        full.append(full_step(x, y))
        obs, t_total, t_vit, t_agent = joint_step(obs)
        total.append(t_total)
        vit_t.append(t_vit)
        agent_t.append(t_agent)
    full_s, joint_s = float(np.median(full)), float(np.median(total))
    vit_s, agent_s = float(np.median(vit_t)), float(np.median(agent_t))
    result = {
        "benchmark": "agentvit",
        "action_mode": action_mode,
        "preset": preset,
        "batch_size": batch,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "num_patches": n,
        "kept": env.target_keep if action_mode == "patches" else env.keep_counts[ratio_action],
        "steps": steps,
        "full_step_seconds": full_s,
        "joint_step_seconds": joint_s,
        "joint_vit_step_seconds": vit_s,
        "joint_agent_seconds": agent_s,
        "joint_env_other_seconds": max(0.0, joint_s - vit_s - agent_s),
        "speedup": full_s / max(joint_s, 1e-12),
    }
    logger.info("benchmark_agentvit %s", result)
    if not math.isfinite(result["speedup"]):  # pragma: no cover - defensive
        result["speedup"] = None
    return result
