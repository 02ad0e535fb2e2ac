"""Plug any RL algorithm into keepgym's envs: the same three lines for SB3's algorithms and ours.

The pattern (identical for ``PPO``, ``SAC``, ``A2C`` and ``keepgym.agents.RLPruner`` on ``PruneEnv``, and for
``DQN``, ``PPO``, ``A2C`` and ``keepgym.agents.DDQN`` on ``PatchSelectEnv``)::

    import gymnasium as gym
    from stable_baselines3 import PPO            # or SAC, A2C; or: from keepgym.agents import RLPruner as PPO

    import keepgym                                  # registers RLPrune-* and PatchSelect-*
    from keepgym.agents.callbacks import EnvInfoCallback

    env = gym.make("RLPrune-Digits-v0", target_sparsity=0.5)
    model = PPO("MlpPolicy", env, tensorboard_log="runs/")
    model.learn(total_timesteps=100, callback=EnvInfoCallback(), log_interval=1)

``log_interval=1`` because an env step is a pruning stage or a ViT training step, so runs are short
in steps; SB3 would otherwise dump ``rollout/*`` and ``train/*`` only every 100 rollouts (A2C) or 4
episodes (SAC, DQN). Then ``tensorboard --logdir runs``: SB3's ``rollout/ep_rew_mean`` and ``train/*``,
and the env's ``env/accuracy``, ``env/macs_ratio``, ``env/group_sparsity`` (histogram and image), ``env/kept``,
``env/step_seconds`` ... and the run's config as text (see :mod:`keepgym.agents.callbacks`).

Run it (tiny by default: a randomly initialised 1/8-width VGG-11 and a 2-block ViT on ``digits``, a few
seconds per algorithm on a laptop CPU)::

    python -m keepgym.experiments.sb3_example                              # PPO + RLPruner, then DQN + DDQN
    python -m keepgym.experiments.sb3_example --algos sac a2c --timesteps 200
    python -m keepgym.experiments.sb3_example --algos ppo --n-envs 2 --subproc   # 2 envs in subprocesses
    python -m keepgym.experiments.sb3_example --algos ppo rlpruner --full  # the registered env defaults:
                                                                   # trained baseline (cached), width 0.25

Vectorised use goes through SB3's ``make_vec_env`` (or ``gymnasium.vector``): the envs are built from
their id and keyword arguments inside each worker, so nothing but those is pickled. Use the id
``"keepgym:RLPrune-Digits-v0"`` there, so a fresh worker process imports ``keepgym`` (and its registrations)
itself. ``RLPruner`` scores candidates through the raw env's ``evaluate`` and needs one in-process env.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

import keepgym  # noqa: F401 - registers the env ids
from keepgym.agents.callbacks import EnvInfoCallback
from keepgym.experiments.common import add_config_arguments, arg, config_from_args

__all__ = ["ExampleConfig", "ALGOS", "TINY_ENV_KWARGS", "TINY_ALGO_KWARGS", "make_algo", "run", "main"]

logger = logging.getLogger(__name__)

#: Algorithm name -> (import path, env kind it is shown on by default).
ALGOS: dict[str, tuple[str, str]] = {
    "ppo": ("stable_baselines3:PPO", "prune"),
    "sac": ("stable_baselines3:SAC", "prune"),
    "a2c": ("stable_baselines3:A2C", "prune"),
    "rlpruner": ("keepgym.agents.rl_pruner:RLPruner", "prune"),
    "dqn": ("stable_baselines3:DQN", "patch"),
    "ddqn": ("keepgym.agents.ddqn:DDQN", "patch"),
}

#: Env kind -> registered id.
ENV_IDS = {
    "prune": "RLPrune-Digits-v0",
    "patch": "PatchSelect-Digits-v0",
    "patch-mask": "PatchSelect-Digits-v0",
}

#: Keyword arguments that make each env tiny: a pruning episode is 3 cheap stages, a ViT epoch 5 steps.
TINY_ENV_KWARGS: dict[str, dict[str, Any]] = {
    "prune": dict(
        pretrained=False,
        width_mult=0.125,
        train_size=200,
        eval_size=64,
        calibration_size=16,
        target_sparsity=0.5,
        stage_sparsity=0.2,
        criterion="l1",
    ),
    "patch": dict(
        train_size=200,
        batch_size=32,
        dim=32,
        depth=2,
        heads=2,
        mlp_dim=64,
        dim_head=16,
        warmup_epochs=0,
        device="cpu",
    ),
}
TINY_ENV_KWARGS["patch-mask"] = dict(TINY_ENV_KWARGS["patch"], action_mode="mask")

#: Keyword arguments that let each algorithm update within a few dozen env steps.
TINY_ALGO_KWARGS: dict[str, dict[str, Any]] = {
    "ppo": dict(n_steps=8, batch_size=8, n_epochs=2),
    "a2c": dict(n_steps=4),
    "sac": dict(learning_starts=8, batch_size=8, buffer_size=1_000),
    "rlpruner": dict(sample_num=4, rounds_per_stage=2),
    "dqn": dict(learning_starts=8, batch_size=8, buffer_size=1_000, target_update_interval=10),
    "ddqn": dict(learning_starts=8, batch_size=8, buffer_size=1_000),
}


@dataclasses.dataclass
class ExampleConfig:
    """Settings of the example (one flag per field)."""

    algos: tuple[str, ...] = arg(("ppo", "rlpruner", "dqn", "ddqn"), help=f"algorithms to run, from {', '.join(ALGOS)}")
    env: str = arg(
        "auto",
        help="env kind: auto (the algorithm's default), prune, patch, patch-mask",
        choices=("auto", "prune", "patch", "patch-mask"),
    )
    timesteps: int = arg(30, help="env steps per algorithm (a pruning stage or a ViT training step)")
    n_envs: int = arg(1, help="parallel env copies (not for rlpruner)")
    subproc: bool = arg(False, help="run the env copies in subprocesses (SubprocVecEnv)")
    full: bool = arg(False, help="use the registered env defaults instead of the tiny settings")
    seed: int = arg(0, help="seed of the algorithm and the envs")
    logdir: str = arg("runs/sb3_example", help="TensorBoard folder")
    torch_threads: int = arg(1, help="torch threads (tiny models run fastest on one)")


def _import(path: str) -> type:
    module, name = path.split(":")
    return getattr(__import__(module, fromlist=[name]), name)


def make_algo(name: str) -> type:
    """The algorithm class of ``name`` (a key of :data:`ALGOS`)."""
    if name not in ALGOS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGOS)}")
    return _import(ALGOS[name][0])


def run(
    algo: str,
    kind: str = "prune",
    timesteps: int = 30,
    *,
    env_kwargs: dict[str, Any] | None = None,
    algo_kwargs: dict[str, Any] | None = None,
    n_envs: int = 1,
    subproc: bool = False,
    seed: int = 0,
    logdir: str | None = "runs/sb3_example",
    tb_log_name: str | None = None,
) -> dict[str, Any]:
    """Train ``algo`` on the ``kind`` env for ``timesteps`` env steps; return a result dict.

    With ``n_envs == 1`` this is exactly the three-line pattern (``gym.make``, ``Algo("MlpPolicy", env,
    tensorboard_log=...)``, ``learn``); with more it builds the envs with ``make_vec_env``.

    Args:
        algo: A key of :data:`ALGOS`.
        kind: ``prune``, ``patch`` (keep-ratio actions) or ``patch-mask`` (one keep-mask per batch).
        timesteps: Env steps to learn for (summed over the env copies).
        env_kwargs: Env keyword arguments (default: :data:`TINY_ENV_KWARGS`).
        algo_kwargs: Algorithm keyword arguments (default: :data:`TINY_ALGO_KWARGS`).
        n_envs: Env copies; > 1 vectorises (``DummyVecEnv``, or ``SubprocVecEnv`` with ``subproc``).
        subproc: Run the copies in subprocesses.
        seed: Seed of the algorithm (and, through SB3, of the envs).
        logdir: TensorBoard folder (None: no TensorBoard).
        tb_log_name: Run name inside ``logdir`` (default: ``<algo>_<kind>``).

    Returns:
        ``{"algo", "env_id", "kind", "num_envs", "timesteps", "seconds", "tensorboard", "episodes",
        "final"}``: ``episodes`` holds one record per finished episode (see
        :attr:`keepgym.agents.callbacks.EnvInfoCallback.episodes`), ``final`` the last one (None if no episode
        finished).
    """
    algo_cls = make_algo(algo)
    env_id = ENV_IDS[kind]
    env_kwargs = dict(TINY_ENV_KWARGS[kind] if env_kwargs is None else env_kwargs)
    algo_kwargs = dict(TINY_ALGO_KWARGS.get(algo, {}) if algo_kwargs is None else algo_kwargs)
    if kind.startswith("patch"):
        # Timings differ between identical runs; they are what env/step_seconds shows, so keep them.
        env_kwargs.setdefault("info_timings", True)
    callback = EnvInfoCallback(
        config={
            "algo": algo,
            "env_id": env_id,
            "env_kwargs": env_kwargs,
            "algo_kwargs": algo_kwargs,
            "n_envs": n_envs,
            "seed": seed,
        }
    )
    start = time.perf_counter()
    if n_envs == 1:
        # --- the three lines -------------------------------------------------------------------
        env = gym.make(env_id, **env_kwargs)
        model = algo_cls("MlpPolicy", env, tensorboard_log=logdir, seed=seed, **algo_kwargs)
        model.learn(timesteps, callback=callback, log_interval=1, tb_log_name=tb_log_name or f"{algo}_{kind}")
        # ----------------------------------------------------------------------------------------
    else:
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

        env = make_vec_env(
            f"keepgym:{env_id}",  # a fresh worker imports `keepgym`, which registers the id
            n_envs=n_envs,
            seed=seed,
            env_kwargs=env_kwargs,
            vec_env_cls=SubprocVecEnv if subproc else DummyVecEnv,
        )
        model = algo_cls("MlpPolicy", env, tensorboard_log=logdir, seed=seed, **algo_kwargs)
        model.learn(timesteps, callback=callback, log_interval=1, tb_log_name=tb_log_name or f"{algo}_{kind}")
    seconds = time.perf_counter() - start
    tb_dir = model.logger.get_dir() if logdir is not None else None
    model.get_env().close()
    return {
        "algo": algo,
        "env_id": env_id,
        "kind": kind,
        "num_envs": n_envs,
        "timesteps": int(model.num_timesteps),
        "seconds": seconds,
        "tensorboard": tb_dir,
        "episodes": callback.episodes,
        "final": callback.episodes[-1] if callback.episodes else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: run each requested algorithm and print one JSON line per run."""
    parser = argparse.ArgumentParser(
        prog="python -m keepgym.experiments.sb3_example",
        description="Run SB3 algorithms and keepgym's agents on keepgym's envs with the same three lines.",
    )
    add_config_arguments(parser, ExampleConfig)
    cfg = config_from_args(ExampleConfig, parser.parse_args(argv))
    unknown = [a for a in cfg.algos if a not in ALGOS]
    if unknown:
        parser.error(f"unknown algorithm(s) {', '.join(unknown)}; valid: {', '.join(ALGOS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(cfg.torch_threads)
    for algo in cfg.algos:
        kind = ALGOS[algo][1] if cfg.env == "auto" else cfg.env
        env_kwargs = {} if cfg.full else None
        result = run(
            algo,
            kind,
            cfg.timesteps,
            env_kwargs=env_kwargs,
            n_envs=cfg.n_envs,
            subproc=cfg.subproc,
            seed=cfg.seed,
            logdir=cfg.logdir,
        )
        summary = {k: result[k] for k in ("algo", "env_id", "num_envs", "timesteps", "tensorboard")}
        summary["episodes"] = len(result["episodes"])
        summary["final"] = {k: v for k, v in (result["final"] or {}).items() if k != "widths"}
        summary["seconds"] = round(result["seconds"], 2)
        print(json.dumps(summary))
    print(f"tensorboard --logdir {Path(cfg.logdir)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
