"""``keepgym bench score-fidelity``: do candidate scores rank candidates like their accuracy after recovery?

RL-Pruner's search ranks candidate allocations of a stage by a cheap score and commits the best one.
EagleEye (Li et al., ECCV 2020) found that accuracy right after pruning ("vanilla") correlates poorly
with the accuracy a candidate reaches after fine-tuning, and that re-estimating the BatchNorm
statistics first ("adaptive BN") makes the correlation strong. This benchmark measures that on our
own setting: at the first stage of a trained model (removing ``stage_macs`` of its MACs) it draws
``candidates`` allocations around the width-proportional one, scores each with both
``PruneEnv`` candidate scorings, commits each (physical surgery) with the same short knowledge
distillation (``kd_steps``, the env's own recovery, the same seed for every candidate), and reports
the Spearman and Kendall rank correlations of each score with the recovered accuracy (validation
split, and the test split as an independent check), the recovered accuracy of each score's top
pick, a JSON file and a scatter plot.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keepgym.envs.data import DatasetSplits
from keepgym.envs.metrics import evaluate_accuracy
from keepgym.envs.prune_env import CANDIDATE_SCORINGS, PruneEnv
from keepgym.experiments.bench_models import prune_bench_env, run_on_model
from keepgym.experiments.common import CliError

__all__ = ["bench_score_fidelity", "plot_score_fidelity", "rank_correlations", "score_fidelity"]

logger = logging.getLogger(__name__)


def rank_correlations(scores: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Spearman's rho and Kendall's tau-b (ties handled) of ``scores`` with ``target``, and p-values."""
    from scipy import stats

    scores, target = np.asarray(scores, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if len(scores) < 3 or np.ptp(scores) == 0 or np.ptp(target) == 0:
        return {"spearman": math.nan, "spearman_p": math.nan, "kendall": math.nan, "kendall_p": math.nan}
    rho = stats.spearmanr(scores, target)
    tau = stats.kendalltau(scores, target)
    return {
        "spearman": float(rho.statistic),
        "spearman_p": float(rho.pvalue),
        "kendall": float(tau.statistic),
        "kendall_p": float(tau.pvalue),
    }


def _candidates(env: PruneEnv, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The width-proportional allocation, then ``n - 1`` log-normal perturbations of it (sigma 0.2..0.8).

    RL-Pruner's policy starts width-proportional; the spread of sigmas gives candidates from close to it
    to strongly skewed, so the recovered accuracies differ by more than the evaluation noise.
    """
    prior = env.group_widths / env.group_widths.sum()
    sigmas = np.linspace(0.2, 0.8, max(1, n - 1))  # wider spreads starve a group and kill the model
    out = [prior.copy()]
    for sigma in sigmas[: n - 1]:
        out.append(prior * np.exp(sigma * rng.standard_normal(len(prior))))
    return out


def score_fidelity(
    model_name: str = "vgg11",
    dataset: str = "folder",
    data_root: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    image_size: int | None = None,
    candidates: int = 20,
    stage_macs: float = 0.3,
    kd_steps: int = 100,
    bn_calibration_size: int = 512,
    eval_size: int | None = None,
    batch_size: int = 128,
    test_images: int | None = 2000,
    seed: int = 0,
    device: str = "cpu",
    data: DatasetSplits | None = None,
    pretrained: bool = True,
    width_mult: float = 1.0,
) -> dict:
    """Score ``candidates`` allocations of one stage both ways, recover each, correlate (see the module doc).

    ``batch_size`` is the env's evaluation and KD batch size; ``test_images`` a seeded subset of the test
    split for the independent check (None: all).

    Returns:
        A JSON-able dict: settings, per-candidate rows (``vanilla``, ``adaptive_bn``, ``recovered_val``,
        ``recovered_test``, ``macs_ratio``, ...), ``correlations[scoring][target]`` (``spearman``,
        ``kendall`` and p-values; target ``val`` or ``test``), ``top_pick[scoring]`` (recovered accuracy of
        the candidate that scoring ranks first, and its rank among the recovered accuracies) and timings.
    """
    if candidates < 3:
        raise ValueError(f"candidates must be >= 3 for a rank correlation, got {candidates}")
    if not 0.0 < stage_macs < 1.0:
        raise ValueError(f"stage_macs must be in (0, 1), got {stage_macs}")
    env = prune_bench_env(
        model_name,
        dataset,
        data_root=data_root,
        checkpoint=checkpoint,
        image_size=image_size,
        data=data,
        pretrained=pretrained,
        width_mult=width_mult,
        target_macs=1.0 - stage_macs,
        stage_sparsity=1.0 - (1.0 - stage_macs),  # exactly 1 - target in floats (0.1 is not 1 - 0.9)
        finetune_steps=kd_steps,
        eval_size=eval_size,
        bn_calibration_size=bn_calibration_size,
        batch_size=batch_size,
        device=device,
    )
    _, info0 = env.reset(seed=seed)
    test = env.data
    rng = np.random.default_rng(seed)
    n_test = len(test.test_y)
    tidx = np.arange(n_test) if not test_images or test_images >= n_test else rng.choice(n_test, test_images, False)
    tidx = torch.as_tensor(np.sort(tidx), dtype=torch.long)
    test_x, test_y = test.test_x[tidx], test.test_y[tidx]
    actions = _candidates(env, candidates, rng)
    snap = env.snapshot()
    rows = []
    seconds = {"vanilla": 0.0, "adaptive_bn": 0.0, "recovery": 0.0}
    for i, action in enumerate(actions):
        row: dict = {"index": i}
        for scoring in CANDIDATE_SCORINGS:
            env.candidate_scoring = scoring
            t0 = time.perf_counter()
            _, info = env.evaluate(action)
            seconds[scoring] += time.perf_counter() - t0
            row[scoring] = info["accuracy"]
        row["macs_ratio"], row["params_ratio"] = info["macs_ratio"], info["params_ratio"]
        row["widths"] = info["widths"]
        env.candidate_scoring = "vanilla"
        t0 = time.perf_counter()
        _, _, _, _, step = env.step(action)  # surgery + the same KD for every candidate (same seed)
        row["recovered_val"] = step["accuracy"]
        row["physical_before_kd"] = step["accuracy_before_finetune"]
        row["recovered_test"] = evaluate_accuracy(env.model, test_x, test_y, test.normalize, batch_size, env.device)
        seconds["recovery"] += time.perf_counter() - t0
        env.restore(snap)
        rows.append(row)
        logger.info(
            "candidate %d/%d: vanilla %.4f adaptive-BN %.4f -> recovered val %.4f test %.4f (MACs %.3f)",
            i + 1,
            len(actions),
            row["vanilla"],
            row["adaptive_bn"],
            row["recovered_val"],
            row["recovered_test"],
            row["macs_ratio"],
        )
    correlations, top_pick = {}, {}
    for scoring in CANDIDATE_SCORINGS:
        s = np.array([r[scoring] for r in rows])
        correlations[scoring] = {
            target: rank_correlations(s, np.array([r[f"recovered_{target}"] for r in rows]))
            for target in ("val", "test")
        }
        best = int(np.argmax(s))  # ties: the first, as RL-Pruner's archive keeps the first best
        top_pick[scoring] = {
            target: {
                "recovered": rows[best][f"recovered_{target}"],
                "best_recovered": max(r[f"recovered_{target}"] for r in rows),
                "rank": 1 + sum(r[f"recovered_{target}"] > rows[best][f"recovered_{target}"] for r in rows),
            }
            for target in ("val", "test")
        }
    return {
        "benchmark": "score-fidelity",
        "model": model_name,
        "dataset": dataset,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "candidates": len(rows),
        "stage_macs": stage_macs,
        "kd_steps": kd_steps,
        "bn_calibration_size": bn_calibration_size,
        "eval_images": int(min(eval_size or len(test.val_y), len(test.val_y))),
        "test_images": int(len(test_y)),
        "seed": seed,
        "baseline_val_accuracy": info0["accuracy"],
        "correlations": correlations,
        "top_pick": top_pick,
        "seconds_per_candidate": {k: v / len(rows) for k, v in seconds.items()},
        "rows": rows,
    }


def plot_score_fidelity(result: dict, path: str | os.PathLike) -> Path:
    """Scatter of each scoring's score against the recovered validation accuracy, one panel per scoring."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(CANDIDATE_SCORINGS))
    recovered = [r["recovered_val"] for r in result["rows"]]
    for ax, scoring in zip(axes, CANDIDATE_SCORINGS, strict=True):
        corr = result["correlations"][scoring]["val"]
        ax.scatter([r[scoring] for r in result["rows"]], recovered, s=18)
        ax.set_xlabel(f"{scoring} score (accuracy before recovery)")
        ax.set_title(f"{scoring}: Spearman {corr['spearman']:.2f}, Kendall {corr['kendall']:.2f}", fontsize=9)
    axes[0].set_ylabel(f"validation accuracy after {result['kd_steps']} KD steps")
    fig.suptitle(
        f"{result['model']} {result['dataset']}: {result['candidates']} candidates, "
        f"stage removing {result['stage_macs']:.0%} of MACs",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def bench_score_fidelity(cfg: Any, device: str, out: Path) -> dict:
    """``keepgym bench score-fidelity``: :func:`score_fidelity` on the model of ``cfg`` (a ``BenchConfig``), plot
    in ``out/score-fidelity.png`` (user errors: :class:`~keepgym.experiments.common.CliError`)."""
    if cfg.candidates < 3:
        raise CliError(f"--candidates must be >= 3 (a rank correlation), got {cfg.candidates}")
    if not 0.0 < cfg.stage_macs < 1.0:
        raise CliError(f"--stage-macs must be in (0, 1), got {cfg.stage_macs}")
    if cfg.kd_steps < 0:
        raise CliError(f"--kd-steps must be >= 0, got {cfg.kd_steps}")
    result = run_on_model(
        "score-fidelity",
        score_fidelity,
        cfg,
        # quick: 4 candidates, 2 KD steps
        quick_sizes={"train_size": 160, "val_size": 48, "test_size": 32},
        quick_settings={
            "candidates": 4, "kd_steps": 2, "bn_calibration_size": 32, "batch_size": 32, "seed": cfg.seed,
            "device": device,
        },
        settings={
            "candidates": cfg.candidates, "stage_macs": cfg.stage_macs, "kd_steps": cfg.kd_steps, "seed": cfg.seed,
            "device": device,
        },
    )
    result["plot"] = str(plot_score_fidelity(result, out / "score-fidelity.png"))
    return result
