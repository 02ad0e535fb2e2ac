"""The pruning agents by name: one place that maps ``--algo`` to an agent class and its settings.

* ``rlpruner``: :class:`keepgym.agents.rl_pruner.RLPruner` (search, then commit, one stage per timestep).
* ``uniform``, ``global``: :class:`~keepgym.agents.baselines.UniformPruner`,
  :class:`~keepgym.agents.baselines.GlobalPruner`.
* ``ppo``, ``sac``, ``a2c``: plain Stable-Baselines3 algorithms on the same env (``"MlpPolicy"``), with rollouts
  and batches sized to one episode of ``num_stages`` stages.

Used by ``keepgym prune`` and the comparison scripts, and by anyone who wants the CLI's agent in Python::

    agent = make_prune_agent("rlpruner", env, sample_num=4, rounds_per_stage=2, seed=0)
    agent.learn(env.unwrapped.num_stages)
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

__all__ = ["PRUNE_ALGOS", "make_prune_agent", "prune_agent_class"]

#: Every name :func:`prune_agent_class` knows: the staged agents first, then the SB3 algorithms.
PRUNE_ALGOS = ("rlpruner", "uniform", "global", "ppo", "sac", "a2c")


def prune_agent_class(algo: str) -> type:
    """The agent class of ``algo`` (one of :data:`PRUNE_ALGOS`; ``ValueError`` otherwise)."""
    if algo == "rlpruner":
        from keepgym.agents.rl_pruner import RLPruner

        return RLPruner
    if algo in ("uniform", "global"):
        from keepgym.agents.baselines import GlobalPruner, UniformPruner

        return UniformPruner if algo == "uniform" else GlobalPruner
    if algo in ("ppo", "sac", "a2c"):
        import stable_baselines3 as sb3

        return {"ppo": sb3.PPO, "sac": sb3.SAC, "a2c": sb3.A2C}[algo]
    raise ValueError(f"unknown pruning algorithm {algo!r}; expected one of {', '.join(PRUNE_ALGOS)}")


def make_prune_agent(
    algo: str,
    env: gym.Env,
    *,
    sample_num: int = 10,
    rounds_per_stage: int = 10,
    racing: bool = False,
    racing_eta: float = 3.5,
    racing_keep: int = 2,
    num_stages: int | None = None,
    seed: int | None = None,
    tensorboard_log: str | None = None,
    verbose: int = 0,
) -> Any:
    """A fresh agent of ``algo`` on ``env``, set up as ``keepgym prune`` sets it up.

    Args:
        algo: One of :data:`PRUNE_ALGOS`.
        env: The (possibly wrapped) ``PruneEnv``.
        sample_num: RLPruner: candidates per round (its elite archive keeps as many).
        rounds_per_stage: RLPruner: search rounds per stage.
        racing: RLPruner: score a round's candidates on growing image slices (successive halving).
        racing_eta: RLPruner with ``racing``: halving factor (>= 2).
        racing_keep: RLPruner with ``racing``: candidates of a round scored on every image.
        num_stages: SB3 algorithms: stages per episode, which sizes their rollouts and batches
            (default: ``env.unwrapped.num_stages``).
        seed: Seed of the agent (SB3's global RNGs and the env's first reset).
        tensorboard_log: TensorBoard folder (None: no TensorBoard).
        verbose: SB3 verbosity.
    """
    cls = prune_agent_class(algo)
    common = {"tensorboard_log": tensorboard_log, "seed": seed, "verbose": verbose}
    if algo == "rlpruner":
        return cls(
            "PruneDistributionPolicy",
            env,
            sample_num=sample_num,
            rounds_per_stage=rounds_per_stage,
            archive_size=max(sample_num, 1),
            racing=racing,
            racing_eta=racing_eta,
            racing_keep=racing_keep,
            **common,
        )
    if algo in ("uniform", "global"):
        return cls("PruneDistributionPolicy", env, **common)
    n = max(2, int(env.unwrapped.num_stages if num_stages is None else num_stages))
    if algo == "ppo":
        return cls("MlpPolicy", env, n_steps=n, batch_size=n, n_epochs=4, device="cpu", **common)
    if algo == "a2c":
        return cls("MlpPolicy", env, n_steps=n, device="cpu", **common)
    return cls("MlpPolicy", env, learning_starts=n, buffer_size=10_000, batch_size=min(64, n), device="cpu", **common)
