"""PPO vs RLPruner vs uniform on ``RLPrune-Digits-v0`` at the same number of validation evaluations.

    python -m keepgym.experiments.compare_algos        # sparsity 0.5, stage 0.1, K x E = 4 x 2, seeds 0 1 2
    python -m keepgym.experiments.compare_algos --seeds 0 --sample-num 8 --rounds 4

Every algorithm is driven by the same three lines (``gym.make`` / ``Algo("MlpPolicy", env, seed=s)`` /
``learn(timesteps)``) on the registered env (a trained VGG-11 at width 0.25 on ``digits``, cached under
``$KEEPGYM_CACHE`` on first use), with no fine-tuning (``finetune_steps=0``).

**Equal budgets.** The unit is one *validation evaluation*: one forward pass of the (masked or pruned)
model over the validation split, which is what both ``env.evaluate`` (a candidate, not committed) and
``env.step`` (a committed stage, whose reward is its validation accuracy) cost. With ``S`` stages per
episode, RLPruner spends ``K * E`` evaluate() calls and one step() per stage: ``B = (K * E + 1) * S``
for its one compression run, plus ``K * E`` more for every stage its collapse guard re-searches. The
evaluations are counted on the env, and PPO gets, for the same seed, RLPruner's *measured* count
rounded up to whole episodes (``B`` when RLPruner is not run): that many env steps, i.e. full episodes
(each a compression run from the original model), updating after every episode (``n_steps = S``); its *best*
episode is chosen by final validation accuracy, never by test accuracy, and its *last* and *first*
(an untrained Gaussian policy, i.e. about a random allocation) episodes are reported too. Uniform
spends ``S`` evaluations (one run, no search). The evaluations are counted on the env, not assumed.

Test accuracy (the held-out test split, used for nothing else) is measured on the pruned model at the end
of each episode, outside the budget.
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
import numpy as np
import torch

import keepgym  # noqa: F401 - registers the env ids
from keepgym.agents.prune_agents import prune_agent_class
from keepgym.envs.evaluators import CountingEvaluator
from keepgym.envs.metrics import evaluate_accuracy
from keepgym.experiments.common import add_config_arguments, arg, config_from_args, write_json

__all__ = ["CompareConfig", "compare", "format_markdown", "main"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CompareConfig:
    """Settings of the comparison (one flag per field)."""

    env_id: str = arg("RLPrune-Digits-v0", help="registered PruneEnv id")
    target_sparsity: float = arg(0.5, help="fraction of channels removed at the end")
    stage_sparsity: float = arg(0.1, help="fraction of channels removed per stage")
    sample_num: int = arg(4, help="RLPruner K: candidates per round")
    rounds: int = arg(2, help="RLPruner E: rounds per stage")
    finetune_steps: int = arg(0, help="KD recovery steps after each stage (0: none)")
    seeds: tuple[int, ...] = arg((0, 1, 2), help="seeds")
    algos: tuple[str, ...] = arg(("uniform", "rlpruner", "ppo"), help="uniform, rlpruner, ppo")
    out: str = arg("runs/compare_algos", help="results folder (results.json, table.md)")
    torch_threads: int = arg(1, help="torch threads")


class _Budget(gym.Wrapper):
    """Counts validation evaluations (candidates of evaluate_many, and step()); records each episode's end.

    The agents here score candidates only through ``evaluate_many`` (RLPruner) or not at all (PPO, uniform).
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._steps = 0
        self.episodes: list[dict[str, Any]] = []
        raw = env.unwrapped
        self._candidates = CountingEvaluator(raw.evaluator)
        raw.evaluator = self._candidates

    @property
    def evaluations(self) -> int:
        """Validation evaluations so far: candidates scored plus committed stages."""
        return self._candidates.count + self._steps

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._steps += 1
        if terminated or truncated:
            raw = self.env.unwrapped
            data = raw.data
            test = evaluate_accuracy(raw.model, data.test_x, data.test_y, data.normalize, device=raw.device)
            self.episodes.append(
                {
                    "val_accuracy": float(info["accuracy"]),
                    "test_accuracy": float(test),
                    "macs_ratio": float(info["macs_ratio"]),
                    "params_ratio": float(info["params_ratio"]),
                    "sparsity": float(info["sparsity"]),
                    "evaluations": self.evaluations,
                }
            )
        return obs, reward, terminated, truncated, info


def _algo(name: str, cfg: CompareConfig, num_stages: int, budget: int) -> tuple[type, dict[str, Any], int]:
    """(class, hyper-parameters, timesteps) of ``name``; PPO's timesteps: ``budget`` in whole episodes."""
    if name not in ("rlpruner", "uniform", "ppo"):
        raise ValueError(f"unknown algorithm {name!r}")
    cls = prune_agent_class(name)
    if name == "rlpruner":
        return cls, dict(sample_num=cfg.sample_num, rounds_per_stage=cfg.rounds), num_stages
    if name == "uniform":
        return cls, {}, num_stages
    # PPO: one update per episode; B / S episodes in all (B is a multiple of S by construction).
    timesteps = -(-budget // num_stages) * num_stages
    return cls, dict(n_steps=num_stages, batch_size=num_stages, n_epochs=10), timesteps


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every (algorithm, seed); return ``{"runs": [...], "table": {...}, "budget": B, ...}``."""
    env_kwargs = dict(
        target_sparsity=cfg.target_sparsity,
        stage_sparsity=cfg.stage_sparsity,
        finetune_steps=cfg.finetune_steps,
    )
    probe = gym.make(cfg.env_id, **env_kwargs).unwrapped  # trains/caches the baseline on first use
    num_stages = probe.num_stages
    data = probe.data
    baseline = {
        "val_accuracy": float(evaluate_accuracy(probe.teacher, data.val_x, data.val_y, data.normalize)),
        "test_accuracy": float(evaluate_accuracy(probe.teacher, data.test_x, data.test_y, data.normalize)),
    }
    del probe
    runs = []
    nominal = (cfg.sample_num * cfg.rounds + 1) * num_stages
    measured: dict[int, int] = {}  # seed -> RLPruner's evaluations
    order = sorted(cfg.algos, key=lambda a: a != "rlpruner")  # RLPruner first: it sets PPO's budget
    for name in order:
        for seed in cfg.seeds:
            algo_cls, hparams, timesteps = _algo(name, cfg, num_stages, measured.get(seed, nominal))
            start = time.perf_counter()
            env = _Budget(gym.make(cfg.env_id, **env_kwargs))
            model = algo_cls("MlpPolicy", env, seed=seed, **hparams)
            model.learn(total_timesteps=timesteps)
            episodes = env.episodes
            if name == "rlpruner":
                measured[seed] = env.evaluations
            best = max(episodes, key=lambda e: e["val_accuracy"])
            row = {
                "algo": name,
                "seed": seed,
                "episodes": len(episodes),
                "evaluations": env.evaluations,
                "seconds": time.perf_counter() - start,
                "final": episodes[-1],
                "best": best,
                "first": episodes[0],
            }
            runs.append(row)
            logger.info("%s seed %d: %s", name, seed, json.dumps(row))
            print(json.dumps(row), flush=True)
    return {
        "config": dataclasses.asdict(cfg),
        "num_stages": num_stages,
        "budget": nominal,
        "rlpruner_evaluations": measured,
        "baseline": baseline,
        "runs": runs,
        "table": _table(runs),
    }


def _table(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    rows: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        views = {"rlpruner": ("final",), "uniform": ("final",), "ppo": ("best", "final", "first")}[
            run["algo"]
        ]
        for view in views:
            label = run["algo"] if len(views) == 1 else f"{run['algo']} ({view} episode)"
            entry = rows.setdefault(label, {})
            for key in ("val_accuracy", "test_accuracy", "macs_ratio", "params_ratio"):
                entry.setdefault(key, []).append(run[view][key])
            entry.setdefault("evaluations", []).append(run["evaluations"])
    return rows


def format_markdown(result: dict[str, Any]) -> str:
    """The table: mean +- std over seeds of each algorithm's figures."""
    lines = [
        "| algorithm | val acc | test acc | MACs ratio | params ratio | evaluations |",
        "|---|---|---|---|---|---|",
    ]
    base = result["baseline"]
    lines.append(
        f"| unpruned baseline | {base['val_accuracy']:.4f} | {base['test_accuracy']:.4f} | 1 | 1 | - |"
    )
    for label, entry in result["table"].items():
        cells = []
        for key in ("val_accuracy", "test_accuracy", "macs_ratio", "params_ratio"):
            v = np.asarray(entry[key])
            cells.append(f"{v.mean():.4f} ± {v.std():.4f}")
        ev = np.asarray(entry["evaluations"])
        cells.append(f"{ev.mean():.0f}" if ev.min() == ev.max() else f"{ev.min()}-{ev.max()}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the comparison, write ``results.json`` and ``table.md``, print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m keepgym.experiments.compare_algos", description=__doc__.split("\n")[0]
    )
    add_config_arguments(parser, CompareConfig)
    cfg = config_from_args(CompareConfig, parser.parse_args(argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(cfg.torch_threads)
    result = compare(cfg)
    out = Path(cfg.out)
    write_json(out / "results.json", result)
    table = format_markdown(result)
    (out / "table.md").write_text(table + "\n")
    print(
        f"nominal budget (K*E+1)*S = {result['budget']} evaluations ({result['num_stages']} stages); "
        f"RLPruner measured per seed: {result['rlpruner_evaluations']}"
    )
    print(table)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
