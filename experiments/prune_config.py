"""The settings of ``keepgym prune`` (:class:`PruneConfig`, saved as ``config.json``) and their checks.

:func:`validate` refuses a bad setting with a one-line :class:`keepgym.experiments.common.CliError` naming the
valid choices, before any work starts; :func:`check_resume` refuses a ``--resume`` whose settings differ from
the saved run's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keepgym.envs.data import DATASETS
from keepgym.envs.evaluators import EVALUATORS
from keepgym.envs.prune_env import ACTION_PARAMS, CANDIDATE_PATHS, CANDIDATE_SCORINGS
from keepgym.envs.pruning import CRITERIA
from keepgym.experiments.common import CliError, arg

__all__ = [
    "ALGOS",
    "BACKENDS",
    "SB3_ALGOS",
    "STAGED_ALGOS",
    "TIMING_KEYS",
    "PruneConfig",
    "check_resume",
    "env_kwargs",
    "validate",
]

STAGED_ALGOS = ("rlpruner", "uniform", "global")
SB3_ALGOS = ("ppo", "sac", "a2c")
ALGOS = STAGED_ALGOS + SB3_ALGOS
BACKENDS = tuple(EVALUATORS)
#: Summary fields that measure time and may differ between two runs with the same seed.
TIMING_KEYS = (
    "wall_seconds",
    "latency_ms_b1",
    "latency_ms_b64",
    "speedup_b1",
    "speedup_b64",
    "search_seconds",
    "kd_seconds",
    "seconds",
    "finished",
    "images_per_second_b64",
)


@dataclass
class PruneConfig:
    """Settings of one ``keepgym prune`` run (saved as ``config.json``)."""

    sparsity: float | None = arg(
        None,
        help="target channel sparsity in (0, 1): fraction of prunable channels removed "
        "(give this, --target-macs or --target-params)",
    )
    target_macs: float | None = arg(
        None, help="prune until the model has at most this fraction of its original MACs, e.g. 0.5"
    )
    target_params: float | None = arg(
        None, help="prune until the model has at most this fraction of its original parameters"
    )
    env: str | None = arg(None, help="env id, e.g. RLPrune-Digits-v0 (instead of --model/--dataset/--checkpoint)")
    model: str | None = arg(
        None,
        help="zoo name (e.g. vgg11, resnet56), torchvision:NAME, timm:NAME or pkg.module:factory, as given to "
        "`keepgym train` (with --dataset and --checkpoint)",
    )
    dataset: str | None = arg(None, help=f"dataset: {', '.join(DATASETS)}")
    checkpoint: str | None = arg(None, help="trained model file (`keepgym train` writes DIR/model.pt)")
    out: str | None = arg(None, help="run folder (default: runs/prune__<model>__<algo>__s<seed>__<time>)")
    stage_sparsity: float = arg(
        0.05,
        help="channels removed per stage, as a fraction of the original total; with --target-macs "
        "(--target-params): the fraction of the original MACs (params) each stage removes",
    )
    algo: str = arg("rlpruner", help=f"pruning agent: {', '.join(ALGOS)}")
    finetune_epochs: int = arg(1, help="KD epochs over the training split after every stage (0: none)")
    final_finetune_epochs: int = arg(5, help="KD epochs after the last stage (best validation epoch kept)")
    kd_learning_rate: float = arg(1e-3, help="SGD learning rate of the distillation (cosine to 1e-6)")
    kd_batch_size: int = arg(128, help="distillation batch size")
    teacher_swap: bool = arg(True, help="a pruned model that beats the teacher on validation becomes the teacher")
    width_mult: float | None = arg(None, help="channel width multiplier of the model (default: the env's)")
    criterion: str = arg("taylor", help=f"channel importance inside a group: {', '.join(CRITERIA)}")
    alpha: float = arg(0.0, help="reward weight of the MACs reduction")
    beta: float = arg(0.0, help="reward weight of the params reduction")
    sample_num: int = arg(10, help="RL-Pruner: candidates per round (K)")
    rounds_per_stage: int = arg(10, help="RL-Pruner: rounds of K candidates per stage (E)")
    racing: bool = arg(
        False,
        help="RL-Pruner: race each round's candidates over slices of the scoring images (successive halving; "
        "about 3.5x fewer images scored per stage at K = 10, see `keepgym bench search`)",
    )
    racing_eta: float = arg(3.5, help="--racing: halving factor (>= 2): the best 1/eta of a slice go on to the next")
    racing_keep: int = arg(2, help="--racing: candidates of a round scored on every image")
    action_param: str | None = arg(
        None,
        help="how an action maps to the stage's split: weights or log_prior (log-factors around the "
        "width-proportional split) (default: log_prior for ppo/sac/a2c, weights for the others and for --env)",
        choices=ACTION_PARAMS,
    )
    val_size: float | None = arg(
        None, help="validation fraction (default: the split recorded in the checkpoint; 0.1 if none is)"
    )
    calibration_size: int = arg(128, help="training images of the Taylor importance pass")
    eval_size: int | None = arg(None, help="score candidates on this many validation images (default: all)")
    candidate_scoring: str = arg(
        "vanilla",
        help="how candidates are scored: accuracy right after masking (vanilla) or after re-estimating "
        "BatchNorm statistics on training images (adaptive_bn, EagleEye)",
        choices=CANDIDATE_SCORINGS,
    )
    bn_calibration_size: int = arg(512, help="--candidate-scoring adaptive_bn: training images per stage")
    candidate_path: str = arg(
        "auto",
        help="where a candidate's forward runs: masked full-width model, physically pruned copy, or auto "
        "(the cheaper by the stage's measured costs; same scores either way)",
        choices=CANDIDATE_PATHS,
    )
    backend: str = arg("serial", help=f"candidate evaluation backend: {', '.join(BACKENDS)}")
    workers: int = arg(1, help="candidate evaluation workers (--backend ray)")
    ray_address: str | None = arg(None, help="--backend ray: cluster address for ray.init (default: local Ray)")
    ray_gpus_per_worker: float = arg(0.0, help="--backend ray: GPUs per evaluator actor (0.25: four per GPU)")
    episodes: int = arg(1, help="ppo/sac/a2c: training episodes (the best one on validation is kept)")
    latency_repeats: int = arg(20, help="timed passes per latency figure (0: skip latency)")
    latency_threads: int | None = arg(
        None, help="torch CPU threads while timing (default: torch's; 1 is steadier on a shared machine)"
    )
    data_root: str | None = arg(
        None, help="folder of the torchvision datasets; --dataset folder: the image folder (or .tar.gz/.zip of one)"
    )
    train_size: int | None = arg(
        None, help="training images used (default: the split recorded in the checkpoint; all if none is)"
    )
    image_size: int | None = arg(None, help="resize images to this square size (as given to `keepgym train`)")
    device: str = arg("auto", help="cpu, cuda, cuda:N or auto")
    seed: int = arg(0, help="random seed (agent, env sampling, distillation)")
    force: bool = arg(False, help="overwrite an existing run folder")
    resume: bool = arg(False, help="continue the interrupted run in --out")
    keep_checkpoints: int = arg(2, help="stage checkpoints kept (the newest N; search/ and final_kd/ always)")
    progress: bool = arg(True, help="show a progress bar")


Config = PruneConfig


def validate(cfg: PruneConfig) -> None:
    """Check every setting before any work starts; raise :class:`CliError` with the valid choices."""
    import keepgym  # noqa: F401  (registers the env ids)
    from keepgym.envs import PRUNE_ENV_IDS

    if cfg.env is not None:
        if cfg.env.removeprefix("keepgym:") not in PRUNE_ENV_IDS:
            raise CliError(f"unknown env {cfg.env!r}; valid envs: {', '.join(PRUNE_ENV_IDS)}")
    else:
        missing = [f"--{k}" for k in ("model", "dataset", "checkpoint") if getattr(cfg, k) is None]
        if missing:
            raise CliError(
                f"give --env ID or all of --model, --dataset and --checkpoint (missing {', '.join(missing)})"
            )
        from keepgym.models import list_models, resolve_model

        cnns = [m for m in list_models() if not m.startswith("vit")]
        if ":" not in cfg.model and cfg.model not in cnns:
            raise CliError(
                f"unknown model {cfg.model!r}; valid models: {', '.join(cnns)}, or torchvision:NAME, timm:NAME, "
                "pkg.module:factory"
            )
        try:
            resolve_model(cfg.model)
        except ValueError as err:
            raise CliError(str(err)) from None
        if cfg.dataset not in DATASETS:
            raise CliError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise CliError(f"--checkpoint {cfg.checkpoint}: no such file")
    if cfg.algo not in ALGOS:
        raise CliError(f"unknown algo {cfg.algo!r}; valid algos: {', '.join(ALGOS)}")
    if cfg.criterion not in CRITERIA:
        raise CliError(f"unknown criterion {cfg.criterion!r}; valid criteria: {', '.join(CRITERIA)}")
    if cfg.backend not in BACKENDS:
        raise CliError(f"unknown backend {cfg.backend!r}; valid backends: {', '.join(BACKENDS)}")
    if cfg.bn_calibration_size < 1:
        raise CliError(f"--bn-calibration-size must be >= 1, got {cfg.bn_calibration_size}")
    if cfg.eval_size is not None and cfg.eval_size < 1:
        raise CliError(f"--eval-size must be >= 1, got {cfg.eval_size}")
    targets = {
        name: value
        for name, value in (
            ("--sparsity", cfg.sparsity),
            ("--target-macs", cfg.target_macs),
            ("--target-params", cfg.target_params),
        )
        if value is not None
    }
    if len(targets) != 1:
        raise CliError(
            "give one target: --sparsity (channels), --target-macs or --target-params"
            + (f" (got {', '.join(targets)})" if targets else "")
        )
    ((flag, target),) = targets.items()
    # a channel target removes `target` of the channels; a compute target keeps `target` of the cost
    removed = target if flag == "--sparsity" else 1.0 - target
    checks = [
        (0.0 < target < 1.0, f"{flag} must be in (0, 1), got {target}"),
        (0.0 < cfg.stage_sparsity < 1.0, f"--stage-sparsity must be in (0, 1), got {cfg.stage_sparsity}"),
        (
            cfg.stage_sparsity <= removed + 1e-12,
            f"--stage-sparsity ({cfg.stage_sparsity}) must not exceed "
            + (f"--sparsity ({target})" if flag == "--sparsity" else f"1 - {flag} ({removed:g})"),
        ),
        (cfg.train_size is None or cfg.train_size >= 10, f"--train-size must be >= 10, got {cfg.train_size}"),
        (cfg.image_size is None or cfg.image_size >= 4, f"--image-size must be >= 4, got {cfg.image_size}"),
        (cfg.finetune_epochs >= 0, f"--finetune-epochs must be >= 0, got {cfg.finetune_epochs}"),
        (
            cfg.final_finetune_epochs >= 0,
            f"--final-finetune-epochs must be >= 0, got {cfg.final_finetune_epochs}",
        ),
        (
            cfg.kd_learning_rate > 0 and math.isfinite(cfg.kd_learning_rate),
            f"--kd-learning-rate must be > 0 and finite, got {cfg.kd_learning_rate}",
        ),
        (cfg.kd_batch_size >= 1, f"--kd-batch-size must be >= 1, got {cfg.kd_batch_size}"),
        (cfg.width_mult is None or cfg.width_mult > 0, f"--width-mult must be > 0, got {cfg.width_mult}"),
        (math.isfinite(cfg.alpha) and cfg.alpha >= 0, f"--alpha must be >= 0, got {cfg.alpha}"),
        (math.isfinite(cfg.beta) and cfg.beta >= 0, f"--beta must be >= 0, got {cfg.beta}"),
        (cfg.sample_num >= 1, f"--sample-num must be >= 1, got {cfg.sample_num}"),
        (cfg.rounds_per_stage >= 1, f"--rounds-per-stage must be >= 1, got {cfg.rounds_per_stage}"),
        (cfg.val_size is None or 0.0 < cfg.val_size < 1.0, f"--val-size must be in (0, 1), got {cfg.val_size}"),
        (cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}"),
        (cfg.calibration_size >= 1, f"--calibration-size must be >= 1, got {cfg.calibration_size}"),
        (cfg.workers >= 1, f"--workers must be >= 1, got {cfg.workers}"),
        (cfg.episodes >= 1, f"--episodes must be >= 1, got {cfg.episodes}"),
        (cfg.racing_eta >= 2, f"--racing-eta must be >= 2, got {cfg.racing_eta}"),
        (cfg.racing_keep >= 1, f"--racing-keep must be >= 1, got {cfg.racing_keep}"),
        (not cfg.racing or cfg.algo == "rlpruner", f"--racing is RL-Pruner's search; --algo {cfg.algo} has none"),
        (not cfg.racing or cfg.backend == "serial", "--racing scores image slices: it needs --backend serial"),
        (
            cfg.action_param != "log_prior" or cfg.algo in SB3_ALGOS,
            f"--action-param log_prior is for ppo/sac/a2c; --algo {cfg.algo} searches over split weights",
        ),
        (cfg.latency_repeats >= 0, f"--latency-repeats must be >= 0, got {cfg.latency_repeats}"),
        (
            cfg.latency_threads is None or cfg.latency_threads >= 1,
            f"--latency-threads must be >= 1, got {cfg.latency_threads}",
        ),
        (cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise CliError(msg)
    if cfg.resume and cfg.force:
        raise CliError("--resume and --force contradict each other; give one")
    if cfg.resume and cfg.out is None:
        raise CliError("--resume needs --out DIR (the folder of the interrupted run)")
    if cfg.resume and cfg.algo in SB3_ALGOS:
        raise CliError(f"--resume is supported for {', '.join(STAGED_ALGOS)}; a {cfg.algo} run restarts from scratch")
    if cfg.data_root is not None and not Path(cfg.data_root).expanduser().exists():
        raise CliError(f"--data-root {cfg.data_root} does not exist")
    if cfg.dataset == "folder" and cfg.data_root is None:
        raise CliError("--dataset folder needs --data-root DIR (DIR/train/<class>/*, DIR/test/<class>/*)")


def check_resume(out: Path, cfg: PruneConfig) -> None:
    """Refuse ``--resume`` when ``out`` has no ``config.json`` or its settings differ from ``cfg``'s."""
    path = out / "config.json"
    if not path.exists():
        raise CliError(f"--resume: {out} has no config.json")
    saved = json.loads(path.read_text())
    ignore = {"resume", "force", "progress", "device", "out", "latency_repeats", "ray_address", "keep_checkpoints"}
    diff = [k for k, v in saved.items() if k not in ignore and getattr(cfg, k, v) != v]
    if diff:
        raise CliError(f"--resume: settings differ from the saved run in {', '.join(sorted(diff))}")


def env_kwargs(cfg: PruneConfig, device: str = "cpu") -> dict[str, Any]:
    """The ``PruneEnv`` keyword arguments a config stands for (its recovery and evaluator aside)."""
    kwargs: dict[str, Any] = {
        "stage_sparsity": cfg.stage_sparsity,
        "criterion": cfg.criterion,
        "alpha": cfg.alpha,
        "beta": cfg.beta,
        "calibration_size": cfg.calibration_size,
        "candidate_scoring": cfg.candidate_scoring,
        "bn_calibration_size": cfg.bn_calibration_size,
        "candidate_path": cfg.candidate_path,
        "device": device,
    }
    optional = {
        "eval_size": cfg.eval_size,
        "target_sparsity": cfg.sparsity,
        "target_macs": cfg.target_macs,
        "target_params": cfg.target_params,
        "train_size": cfg.train_size,
        "image_size": cfg.image_size,
        "val_size": cfg.val_size,  # else the checkpoint's recorded split (PruneEnv)
        "checkpoint": cfg.checkpoint,
        "width_mult": cfg.width_mult,
        "data_root": cfg.data_root,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if cfg.env is None:
        kwargs.update(model_name=cfg.model, dataset=cfg.dataset)
    action_param = cfg.action_param
    if action_param is None and cfg.env is None:
        action_param = "log_prior" if cfg.algo in SB3_ALGOS else "weights"
    if action_param is not None:
        kwargs["action_param"] = action_param
    return kwargs
