"""``keepgym bench search``: per-stage search time of RL-Pruner, exhaustive against racing, same stages.

RL-Pruner's search scores ``K x E`` candidate allocations per stage, each on every scoring image. With
``RLPruner(racing=True)`` a round's candidates race over slices of the images (successive halving:
all ``K`` on a ``1/eta**L`` slice, the best ``1/eta`` go on, ``racing_keep`` reach the full set), so
far fewer images are scored per stage. Does the racing search commit what the exhaustive one would?

``--compare-exhaustive`` answers it side by side in one process. At every stage of one pruning run
(``stage_sparsity`` of the channels per stage, RL-Pruner's default ``K x E = 10 x 10``, the same
scoring images) it runs the exhaustive search, returns the agent's ``pi`` and sampling RNG to where they
were, runs the racing search, and records both searches' wall times, both picks and their full-set
rewards; then it commits the exhaustive pick (the trajectory of today's search) and times the commit.
Reported: the ratio of per-stage times (search + commit) and of search times alone, and how often the
racing pick equals the exhaustive one or is within ``tolerance`` (0.2 accuracy points) of its
full-set reward.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any

import numpy as np

from keepgym.agents.rl_pruner import RLPruner, width_proportional
from keepgym.envs.data import DatasetSplits
from keepgym.experiments.bench_models import prune_bench_env, run_on_model
from keepgym.experiments.common import CliError

__all__ = ["bench_search", "search_benchmark"]

logger = logging.getLogger(__name__)


def search_benchmark(
    model_name: str = "vgg11",
    dataset: str = "folder",
    data_root: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    image_size: int | None = None,
    stages: int = 10,
    stage_sparsity: float = 0.01,
    sample_num: int = 10,
    rounds_per_stage: int = 10,
    racing_eta: float = 3.5,
    racing_keep: int = 2,
    eval_size: int | None = None,
    candidate_scoring: str = "vanilla",
    tolerance: float = 0.002,
    compare_exhaustive: bool = True,
    seed: int = 0,
    device: str = "cpu",
    data: DatasetSplits | None = None,
    pretrained: bool = True,
    width_mult: float = 1.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Exhaustive vs racing search on the same ``stages`` stages (see the module docstring).

    ``compare_exhaustive=False`` runs the racing search alone and commits its picks (per-stage times only).

    Returns:
        A JSON-able dict: settings, one row per stage (times, picks, rewards, equal/within-tolerance)
        and a ``summary`` (median and total time ratios, agreement rates).
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    env = prune_bench_env(
        model_name,
        dataset,
        data_root=data_root,
        checkpoint=checkpoint,
        image_size=image_size,
        data=data,
        stage_sparsity=stage_sparsity,
        target_sparsity=min(0.99, stage_sparsity * (stages + 1)),
        eval_size=eval_size,
        candidate_scoring=candidate_scoring,
        device=device,
        pretrained=pretrained,
        width_mult=width_mult,
    )
    agent = RLPruner(
        "MlpPolicy",
        env,
        sample_num=sample_num,
        rounds_per_stage=rounds_per_stage,
        racing_eta=racing_eta,
        racing_keep=racing_keep,
        seed=seed,
    )
    step_env = agent.env.envs[0]  # Monitor over the raw env, as RLPruner commits
    raw = step_env.unwrapped
    step_env.reset(seed=seed)
    start = width_proportional(raw.group_widths, np.asarray(raw.prunable_mask(), dtype=bool))
    agent.set_search_state({**agent.get_search_state(), "distribution": start})
    rows = []
    from tqdm.auto import tqdm

    for stage in tqdm(range(stages), desc="bench search", unit="stage", disable=not progress):
        if raw.stage >= raw.num_stages or not raw.prunable_mask().any():
            break
        start = agent.get_search_state()
        times, picks = {}, {}
        for mode in ("exhaustive", "racing") if compare_exhaustive else ("racing",):
            agent.set_search_state(start)
            agent.racing = mode == "racing"
            t0 = time.perf_counter()
            picks[mode] = agent.search_stage()
            times[mode] = time.perf_counter() - t0
        agent.racing = False
        # racing's pick scored again on the whole set: the reward the race claims must be the exact one
        check_reward, _ = raw.evaluate(picks["racing"]["action"])
        row: dict[str, Any] = {
            "stage": stage + 1,
            "racing_search_s": times["racing"],
            "racing_evaluations": picks["racing"]["evaluations"],
            "racing_reward": picks["racing"]["reward"],
            "racing_reward_rescored": float(check_reward),
        }
        if compare_exhaustive:
            ex, rc = raw.allocate(picks["exhaustive"]["action"]), raw.allocate(picks["racing"]["action"])
            gap = picks["exhaustive"]["reward"] - picks["racing"]["reward"]
            row.update(
                exhaustive_search_s=times["exhaustive"],
                exhaustive_evaluations=picks["exhaustive"]["evaluations"],
                exhaustive_reward=picks["exhaustive"]["reward"],
                reward_gap=gap,
                equal_pick=bool(np.array_equal(ex, rc)),
                within_tolerance=bool(np.array_equal(ex, rc) or gap <= tolerance),
            )
        t0 = time.perf_counter()
        step_env.step(picks["exhaustive" if compare_exhaustive else "racing"]["action"])
        row["commit_s"] = time.perf_counter() - t0
        rows.append(row)
        logger.info("stage %d: %s", stage + 1, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
    env.close()
    if not rows:
        raise RuntimeError("no stage could be searched (the model has nothing left to prune)")
    return {
        "settings": {
            "model": model_name,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "stage_sparsity": stage_sparsity,
            "sample_num": sample_num,
            "rounds_per_stage": rounds_per_stage,
            "racing_eta": racing_eta,
            "racing_keep": racing_keep,
            "scoring_images": int(raw.num_scoring_images) if raw.stage < raw.num_stages else None,
            "candidate_scoring": candidate_scoring,
            "tolerance": tolerance,
            "seed": seed,
        },
        "stages": rows,
        "summary": _summary(rows),
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    racing = {
        "stages": len(rows),
        "racing_stage_s_median": statistics.median(r["racing_search_s"] + r["commit_s"] for r in rows),
        "commit_s_median": statistics.median(r["commit_s"] for r in rows),
        "max_rescore_error": max(abs(r["racing_reward"] - r["racing_reward_rescored"]) for r in rows),
    }
    if "exhaustive_search_s" not in rows[0]:
        return racing
    ex = [r["exhaustive_search_s"] + r["commit_s"] for r in rows]
    rc = [r["racing_search_s"] + r["commit_s"] for r in rows]
    return {
        **racing,
        "stage_time_ratio_median": statistics.median(e / r for e, r in zip(ex, rc, strict=True)),
        "stage_time_ratio_total": sum(ex) / sum(rc),
        "search_time_ratio_total": sum(r["exhaustive_search_s"] for r in rows)
        / sum(r["racing_search_s"] for r in rows),
        "evaluation_ratio": sum(r["exhaustive_evaluations"] for r in rows) / sum(r["racing_evaluations"] for r in rows),
        "equal_pick_rate": sum(r["equal_pick"] for r in rows) / len(rows),
        "within_tolerance_rate": sum(r["within_tolerance"] for r in rows) / len(rows),
        "max_reward_gap": max(r["reward_gap"] for r in rows),
    }


def bench_search(cfg: Any, device: str) -> dict[str, Any]:
    """``keepgym bench search``: :func:`search_benchmark` on the model of ``cfg`` (a ``BenchConfig``; user
    errors: :class:`~keepgym.experiments.common.CliError`)."""
    for flag, value, low in (("--stages", cfg.stages, 1), ("--sample-num", cfg.sample_num, 1),
                             ("--rounds-per-stage", cfg.rounds_per_stage, 1), ("--racing-eta", cfg.racing_eta, 2),
                             ("--racing-keep", cfg.racing_keep, 1)):
        if value < low:
            raise CliError(f"{flag} must be >= {low}, got {value}")
    if not 0.0 < cfg.stage_sparsity < 1.0:
        raise CliError(f"--stage-sparsity must be in (0, 1), got {cfg.stage_sparsity}")
    common = dict(
        stages=cfg.stages, stage_sparsity=cfg.stage_sparsity, sample_num=cfg.sample_num,
        rounds_per_stage=cfg.rounds_per_stage, racing_eta=cfg.racing_eta, racing_keep=cfg.racing_keep,
        candidate_scoring=cfg.candidate_scoring, compare_exhaustive=cfg.compare_exhaustive, seed=cfg.seed,
        device=device,
    )
    quick_sizes = {"train_size": 160, "val_size": 60, "test_size": 16}
    result = run_on_model(
        "search", search_benchmark, cfg, quick_sizes=quick_sizes, quick_settings=common, settings=common
    )
    result["benchmark"] = "search"
    return result
