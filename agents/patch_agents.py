"""The agents that drive a ``PatchSelectEnv`` (AgentViT), with defaults scaled to the run's length.

``keepgym agentvit --algo`` and ``keepgym evaluate --vit --agent`` build and load their agents here:
our :class:`keepgym.agents.ddqn.DDQN` (every action mode; the only one for ``patches``) or
Stable-Baselines3's DQN (``ratio``), PPO and A2C (``ratio``/``mask``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keepgym.agents.serialization import load_sb3_agent

__all__ = ["AGENT_PRESETS", "ALGOS", "agent_class", "load_patch_agent", "make_patch_agent"]

#: Agents that drive a ``PatchSelectEnv``: ``ddqn`` (``keepgym.agents.DDQN``) and SB3's DQN, PPO, A2C.
ALGOS = ("ddqn", "dqn", "ppo", "a2c")
#: DDQN hyper-parameter sets: ``ours`` (the defaults below) or ``agentvit`` (the reference's, ``DDQN.agentvit``).
AGENT_PRESETS = ("ours", "agentvit")


def agent_class(algo: str) -> type:
    """The class of ``algo`` (one of :data:`ALGOS`)."""
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    if algo == "ddqn":
        from keepgym.agents.ddqn import DDQN

        return DDQN
    import stable_baselines3 as sb3

    return {"dqn": sb3.DQN, "ppo": sb3.PPO, "a2c": sb3.A2C}[algo]


def make_patch_agent(
    algo: str,
    env: Any,
    steps_per_epoch: int,
    action_mode: str = "ratio",
    agent_preset: str = "ours",
    seed: int | None = None,
    tensorboard_log: str | None = None,
    device: str = "cpu",
    verbose: int = 0,
) -> Any:
    """A new ``algo`` agent for ``env`` with defaults scaled to the run length (see the comments).

    Args:
        algo: One of :data:`ALGOS`.
        env: The ``PatchSelectEnv`` (or a wrapper of it).
        steps_per_epoch: The env's steps per episode.
        action_mode: The env's action mode (``patches`` needs ``ddqn``).
        agent_preset: DDQN's hyper-parameters, one of :data:`AGENT_PRESETS`.
        seed: The agent's seed.
        tensorboard_log: SB3's TensorBoard folder (None: no TensorBoard).
        device: The agent's device.
        verbose: SB3 verbosity.
    """
    common = dict(seed=seed, tensorboard_log=tensorboard_log, device=device, verbose=verbose)
    # One epoch of exploration before learning: runs are tens of epochs of ~10-400 steps, so SB3's
    # fixed learning_starts=100 (DQN) would be most of a short run.
    starts = max(1, min(100, steps_per_epoch))
    cls = agent_class(algo)
    if algo == "ddqn":
        if action_mode == "patches":
            # One decision per rewarded image (reward_images per step): thousands in a short run, so a
            # tenth of an epoch of random choices is enough to start, epsilon reaches its floor after a
            # quarter of the run, and each update regresses 128 images' rewards (cheap next to a ViT step).
            return cls(
                "MlpPolicy",
                env,
                learning_rate=1e-3,
                buffer_size=50_000,
                learning_starts=max(1, steps_per_epoch // 10),
                batch_size=128,
                exploration_fraction=0.25,
                exploration_final_eps=0.05,
                **common,
            )
        if agent_preset == "agentvit":
            return cls.agentvit(env, **common)
        return cls("MlpPolicy", env, learning_starts=starts, **common)
    if algo == "dqn":
        # SB3's defaults update the target every 10k steps; here every epoch, short horizon as DDQN.
        return cls(
            "MlpPolicy",
            env,
            learning_rate=5e-4,
            buffer_size=10_000,
            learning_starts=starts,
            batch_size=64,
            gamma=0.9,
            target_update_interval=max(1, steps_per_epoch),
            exploration_fraction=0.2,
            exploration_final_eps=0.02,
            **common,
        )
    if algo == "ppo":
        # One rollout = one epoch, so updates (and checkpoints) fall on epoch boundaries.
        n_steps = max(2, steps_per_epoch)
        return cls("MlpPolicy", env, n_steps=n_steps, batch_size=max(2, min(64, n_steps)), gamma=0.9, **common)
    return cls("MlpPolicy", env, n_steps=max(1, min(8, steps_per_epoch)), gamma=0.9, **common)


def load_patch_agent(algo: str, path: str | Path, env: Any = None, device: str = "cpu") -> Any:
    """Load an ``algo`` agent zip without unpickling anything (:func:`keepgym.agents.serialization.load_sb3_agent`)."""
    return load_sb3_agent(agent_class(algo), path, env=env, device=device)
