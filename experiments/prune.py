"""``keepgym prune``: compress a trained CNN with RL-Pruner (or a baseline) and knowledge distillation.

    keepgym train --model vgg11 --dataset digits --width-mult 0.25 --epochs 30 --out runs/base_vgg11
    keepgym prune --model vgg11 --dataset digits --width-mult 0.25 --checkpoint runs/base_vgg11/model.pt \\
        --sparsity 0.5 --stage-sparsity 0.1 --algo rlpruner --out runs/prune_vgg11

One run = one episode of :class:`keepgym.envs.prune_env.PruneEnv`: the agent commits one pruning *stage* per
timestep until ``--sparsity`` of the prunable channels are gone. After every stage the pruned model is
distilled from the teacher for ``--finetune-epochs`` epochs of the training split (the best epoch on the
*validation* split is kept); the teacher is the unpruned model, replaced by the pruned one whenever the
latter beats it on validation (RL-Pruner's rule, ``--teacher-swap``). A final distillation of
``--final-finetune-epochs`` epochs follows, again keeping the best validation epoch. The test split is
scored once, at the very end, for the baseline and for the compressed model.

Outputs in ``--out``:

* ``compressed.pt``: the compressed model (:func:`keepgym.models.save_model`; ``torch.load(weights_only=True)``);
* ``summary.json``: ``baseline`` and ``final`` blocks (val/test accuracy, MACs, params, latency at batch
  1 and 64 measured side by side in this process), ratios, sparsity, per-group widths, per-stage history,
  number of candidate evaluations, wall time;
* ``policy.png``: final layer distribution and per-group sparsity; ``config.json``; TensorBoard events
  under ``tb/``;
* ``stages/NNN/``: a complete checkpoint after every stage (pruned model, teacher, agent zip, env and RNG
  state), written to a temporary folder and renamed, so a kill never leaves half a checkpoint.
  ``--resume`` continues from the last complete one and ends with the same compressed model and summary
  (timings aside) as an uninterrupted run with the same seed. The last ``--keep-checkpoints`` (2) are
  kept; ``search/`` and ``final_kd/`` (the end of the search, the final distillation) always are.
  The agent zip is JSON plus tensors (:mod:`keepgym.agents.serialization`): nothing in it is unpickled;
* ``.lock``: held while the run is live; a second command on the same folder is refused (``--force`` too).

The validation split is the one recorded in the checkpoint (``keepgym train`` records it; see
:mod:`keepgym.envs.splits`), so the reward never scores the baseline's training images.

Under ``torchrun --nproc-per-node N`` (``gloo`` on CPU, ``nccl`` on GPU) the KD fine-tunes are
data-parallel (:func:`keepgym.envs.distill.distill` with ``distributed=True``: each rank distils on its slice of
every ``--kd-batch-size`` global batch, gradients all-reduced by DistributedDataParallel). The pruning
search is not split: every rank runs the same seeded search on the same model, and the env draws the
same Taylor calibration batch on every rank (from its seeded ``np_random``), so the importance needs no
reduction; the action each stage commits is rank 0's, broadcast, and the ranks check after every stage
that they hold the same widths. Rank 0 alone writes files (the run folder must be shared by the ranks
for ``--resume``, as it is on one machine); every rank returns rank 0's summary.

``--algo ppo|sac|a2c`` trains a plain Stable-Baselines3 algorithm on the same env (one timestep = one
stage) for ``--episodes`` episodes and keeps the episode whose final model is best on validation; these
runs are not resumable mid-way (SB3's rollout state is not checkpointed), ``--resume`` refuses them.

:func:`compress` is the library entry point (the demo calls it); :func:`run` is the CLI's.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from keepgym.envs.data import DATASETS
from keepgym.envs.distributed import (
    DistributedInfo,
    all_gather_objects,
    cleanup_distributed,
    init_distributed,
    is_main_process,
    main_first,
)
from keepgym.envs.prune_env import CANDIDATE_SCORINGS
from keepgym.experiments.common import (
    CliError,
    arg,
    atomic_torch_save,
    load_state,
    prepare_run_dir,
    release_run_dir,
    resolve_device,
    run_name,
    seed_everything,
    write_json,
)
from keepgym.models.checkpoints import (
    complete_checkpoints,
    remove_partial_checkpoints,
    retain_checkpoints,
    write_dir_atomically,
)

__all__ = ["COMMAND", "DESCRIPTION", "Config", "PruneConfig", "compress", "run", "validate", "ALGOS"]

logger = logging.getLogger(__name__)

COMMAND = "prune"
DESCRIPTION = "Compress a trained CNN with RL-Pruner (or a baseline) plus knowledge distillation."

STAGED_ALGOS = ("rlpruner", "uniform", "global")
SB3_ALGOS = ("ppo", "sac", "a2c")
ALGOS = STAGED_ALGOS + SB3_ALGOS
CRITERIA = ("taylor", "l1", "l2", "random")
BACKENDS = ("serial", "ray")
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
_STATE_FILE = "state.pt"


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
    env: str | None = arg(
        None, help="env id, e.g. RLPrune-Digits-v0 (instead of --model/--dataset/--checkpoint)"
    )
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
    teacher_swap: bool = arg(
        True, help="a pruned model that beats the teacher on validation becomes the teacher"
    )
    width_mult: float | None = arg(None, help="channel width multiplier of the model (default: the env's)")
    criterion: str = arg("taylor", help=f"channel importance inside a group: {', '.join(CRITERIA)}")
    alpha: float = arg(0.0, help="reward weight of the MACs reduction")
    beta: float = arg(0.0, help="reward weight of the params reduction")
    sample_num: int = arg(10, help="RL-Pruner: candidates per round (K)")
    rounds_per_stage: int = arg(10, help="RL-Pruner: rounds of K candidates per stage (E)")
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


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


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
        for name, value in (("--sparsity", cfg.sparsity), ("--target-macs", cfg.target_macs),
                            ("--target-params", cfg.target_params))
        if value is not None
    }
    if len(targets) != 1:
        raise CliError(
            "give one target: --sparsity (channels), --target-macs or --target-params"
            + (f" (got {', '.join(targets)})" if targets else "")
        )
    (flag, target), = targets.items()
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
        raise CliError(
            f"--resume is supported for {', '.join(STAGED_ALGOS)}; a {cfg.algo} run restarts from scratch"
        )
    if cfg.data_root is not None and not Path(cfg.data_root).expanduser().exists():
        raise CliError(f"--data-root {cfg.data_root} does not exist")
    if cfg.dataset == "folder" and cfg.data_root is None:
        raise CliError("--dataset folder needs --data-root DIR (DIR/train/<class>/*, DIR/test/<class>/*)")


# --------------------------------------------------------------------------------------------------
# env construction and state
# --------------------------------------------------------------------------------------------------


def _env_kwargs(cfg: PruneConfig, device: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "stage_sparsity": cfg.stage_sparsity,
        "criterion": cfg.criterion,
        "alpha": cfg.alpha,
        "beta": cfg.beta,
        "calibration_size": cfg.calibration_size,
        "candidate_scoring": cfg.candidate_scoring,
        "bn_calibration_size": cfg.bn_calibration_size,
        "finetune_steps": 0,  # the command distils between stages itself (epochs, best-on-validation)
        "device": device,
    }
    if cfg.eval_size is not None:
        kwargs["eval_size"] = cfg.eval_size
    for key, value in (
        ("target_sparsity", cfg.sparsity),
        ("target_macs", cfg.target_macs),
        ("target_params", cfg.target_params),
        ("train_size", cfg.train_size),
        ("image_size", cfg.image_size),
    ):
        if value is not None:
            kwargs[key] = value
    if cfg.val_size is not None:  # else the checkpoint's recorded split (PruneEnv)
        kwargs["val_size"] = cfg.val_size
    if cfg.env is None:
        kwargs.update(model_name=cfg.model, dataset=cfg.dataset)
    if cfg.checkpoint is not None:
        kwargs["checkpoint"] = cfg.checkpoint
    if cfg.width_mult is not None:
        kwargs["width_mult"] = cfg.width_mult
    if cfg.data_root is not None:
        kwargs["data_root"] = cfg.data_root
    return kwargs


def _make_env(cfg: PruneConfig, device: str) -> gym.Env:
    import keepgym  # noqa: F401
    from keepgym.envs import prune_env

    kwargs = _env_kwargs(cfg, device)
    try:
        if cfg.env is not None:
            env = gym.make(cfg.env, disable_env_checker=True, **kwargs)
        else:
            env = prune_env.PruneEnv(**kwargs)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(" ".join(str(err).split())) from None
    except NotImplementedError as err:  # a layer the pruning graph cannot handle (the message names it)
        raise CliError(f"{cfg.model or cfg.env} cannot be pruned: {' '.join(str(err).split())}") from None
    if cfg.backend == "ray":
        try:
            from keepgym.envs.ray_backend import register_ray_backend

            register_ray_backend(cfg.ray_address, cfg.workers, num_gpus=cfg.ray_gpus_per_worker)
        except ImportError as err:
            raise CliError(f"--backend ray: {err}") from None
    if cfg.backend != "serial":
        if cfg.backend not in prune_env._EVALUATE_BACKENDS:
            raise CliError(
                f"--backend {cfg.backend}: not available (install the extra, e.g. pip install -e .[ray])"
            )
        raw = env.unwrapped
        # The agents call raw.evaluate_many(actions); route them to the chosen backend.
        raw.evaluate_many = functools.partial(
            type(raw).evaluate_many, raw, backend=cfg.backend, workers=cfg.workers
        )
    return env


def _env_data(raw: Any) -> Any:
    data = getattr(raw, "data", None)
    if data is None:
        raise RuntimeError("PruneEnv exposes no `data` (DatasetSplits); keepgym prune needs its splits")
    return data


def _input_size(data: Any) -> tuple[int, int, int, int]:
    return (1, data.in_chans, data.image_size, data.image_size)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": _plain_numpy_state(np.random.get_state()),
        "python": _plain_python_state(random.getstate()),
    }


def _plain_numpy_state(state: tuple) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = state
    return {
        "kind": kind,
        "keys": torch.as_tensor(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _plain_python_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------------
# distillation between stages (a gym wrapper, so every algorithm gets exactly the same recovery)
# --------------------------------------------------------------------------------------------------


def _kd_seed(seed: int, stage: int, epoch: int) -> int:
    """A distinct, reproducible distillation seed for every (run seed, stage, epoch)."""
    return (seed * 1_000_003 + stage * 1_009 + epoch) % (2**31 - 1)


def _cosine(lr: float, min_lr: float, frac: float) -> float:
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def _kd_epochs(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data: Any,
    epochs: int,
    *,
    seed: int,
    stage: int,
    learning_rate: float,
    batch_size: int,
    device: str,
    start_epoch: int = 0,
    best: tuple[float, dict] | None = None,
    on_epoch: Any = None,
    distributed: bool = False,
) -> tuple[float, list[dict]]:
    """Distil ``student`` for ``epochs`` epochs (one cosine over all of them); keep the best validation epoch.

    Each epoch is one :func:`keepgym.envs.distill.distill` call with its own seed and the slice of the global
    cosine schedule, so a run resumed between epochs is bit-identical. The student ends with the weights
    of its best validation epoch (or its entry weights, if no epoch beat ``best``).

    Args:
        best: ``(accuracy, state_dict)`` to beat (default: the student's entry weights and their
            validation accuracy); the student ends with the best weights seen.
        on_epoch: ``on_epoch(epoch, best_accuracy, best_state, records)`` after every epoch (checkpoints).
        distributed: data-parallel distillation over the open process group; all ranks end with the
            same student, so their validation scores and the kept epoch agree.

    Returns:
        (best validation accuracy, per-epoch records).
    """
    from keepgym.envs.distill import distill
    from keepgym.envs.metrics import evaluate_accuracy

    steps = max(1, math.ceil(len(data.train_y) / batch_size))
    min_lr = 1e-6
    if best is None:
        best = (
            evaluate_accuracy(student, data.val_x, data.val_y, data.normalize, device=device),
            copy.deepcopy(student.state_dict()),
        )
    best_acc, best_state = best
    records = []
    for epoch in range(start_epoch, epochs):
        stats = distill(
            student,
            teacher,
            data,
            steps,
            learning_rate=_cosine(learning_rate, min_lr, epoch / epochs),
            min_learning_rate=_cosine(learning_rate, min_lr, (epoch + 1) / epochs),
            batch_size=batch_size,
            device=device,
            seed=_kd_seed(seed, stage, epoch),
            distributed=distributed,
        )
        acc = evaluate_accuracy(student, data.val_x, data.val_y, data.normalize, device=device)
        records.append(
            {
                "epoch": epoch,
                "val_accuracy": acc,
                "loss": stats.mean_loss,
                "diverged": stats.diverged,
                "seconds": stats.seconds,
            }
        )
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(student.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, best_acc, best_state, records)
    student.load_state_dict(best_state)
    return best_acc, records


class _StageRecovery(gym.Wrapper):
    """Distils the pruned model after every committed stage and keeps RL-Pruner's teacher.

    ``step`` commits the stage on the env, then runs ``finetune_epochs`` KD epochs (best validation epoch
    kept), tells the env (``model_changed``: new validation accuracy, next stage's importance from the
    distilled weights) and replaces the teacher by the student if it is better on validation
    (``teacher_swap``). The observation carries the post-distillation accuracy, ``info["accuracy"]``
    the committed pre-distillation one (``info["accuracy_after_kd"]`` the other). At the end of an
    episode it keeps a copy of the episode's final model if it is the best episode so far (for the SB3
    algorithms, whose vectorised env resets as soon as an episode ends).
    """

    def __init__(self, env: gym.Env, cfg: PruneConfig, data: Any, device: str, distributed: bool = False) -> None:
        super().__init__(env)
        self.cfg = cfg
        self.distributed = distributed
        self.data = data
        self.device = device
        raw = env.unwrapped
        self.original = copy.deepcopy(_original_model(raw)).eval()
        self.original_val = self._val(self.original)
        self.teacher = self.original
        self.teacher_val = self.original_val
        self.teacher_swaps: list[int] = []
        self.stage_records: list[dict[str, Any]] = []
        self.best_episode: dict[str, Any] | None = None
        self.episode = 0

    def _val(self, model: torch.nn.Module) -> float:
        from keepgym.envs.metrics import evaluate_accuracy

        return evaluate_accuracy(
            model, self.data.val_x, self.data.val_y, self.data.normalize, device=self.device
        )

    def reset(self, **kwargs: Any):
        self.teacher, self.teacher_val = self.original, self.original_val
        return self.env.reset(**kwargs)

    def step(self, action: Any):
        raw = self.env.unwrapped
        stage = int(raw.stage)
        t0 = time.perf_counter()
        if self.distributed:
            action = main_first(lambda: action)  # every rank commits rank 0's decision
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.distributed:
            _check_same_widths(raw)
        info = dict(info)
        record: dict[str, Any] = {
            "episode": self.episode,
            "stage": stage + 1,
            "reward": float(reward),
            "accuracy_before_kd": info.get("accuracy"),
            "macs_ratio": info.get("macs_ratio"),
            "params_ratio": info.get("params_ratio"),
            "sparsity": info.get("sparsity"),
        }
        kd_t0 = time.perf_counter()
        if self.cfg.finetune_epochs > 0:
            acc, epochs = _kd_epochs(
                raw.model,
                self.teacher,
                self.data,
                self.cfg.finetune_epochs,
                seed=self.cfg.seed,
                stage=stage + 1,
                learning_rate=self.cfg.kd_learning_rate,
                batch_size=self.cfg.kd_batch_size,
                device=self.device,
                distributed=self.distributed,
            )
            obs, env_acc = _after_kd(raw)
            # info["accuracy"] stays the committed (pre-distillation) accuracy: RL-Pruner's collapse guard
            # compares a candidate with the previous stage's pre-fine-tune accuracy (reference code).
            info["accuracy_after_kd"] = env_acc
            record["kd_val_accuracies"] = [e["val_accuracy"] for e in epochs]
        else:
            acc = self._val(raw.model)
        record["val_accuracy"] = acc
        record["kd_seconds"] = time.perf_counter() - kd_t0
        record["seconds"] = time.perf_counter() - t0
        record["teacher_swapped"] = False
        if self.cfg.teacher_swap and acc > self.teacher_val:
            self.teacher, self.teacher_val = copy.deepcopy(raw.model).eval(), acc
            self.teacher_swaps.append(stage + 1)
            record["teacher_swapped"] = True
        self.stage_records.append(record)
        if terminated or truncated:
            if self.best_episode is None or acc > self.best_episode["val_accuracy"]:
                self.best_episode = {
                    "episode": self.episode,
                    "val_accuracy": acc,
                    "model": copy.deepcopy(raw.model).eval(),
                    "widths": np.asarray(raw.group_widths).tolist(),
                    "info": _plain_info(info),
                }
            self.episode += 1
        return obs, reward, terminated, truncated, info

    # -- checkpointing ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "teacher_val": self.teacher_val,
            "teacher_swaps": list(self.teacher_swaps),
            "stage_records": json.loads(json.dumps(self.stage_records, default=_json_default)),
            "episode": self.episode,
            "teacher_is_original": self.teacher is self.original,
        }

    def load_state(self, state: dict[str, Any], teacher: torch.nn.Module | None) -> None:
        self.teacher_val = float(state["teacher_val"])
        self.teacher_swaps = list(state["teacher_swaps"])
        self.stage_records = list(state["stage_records"])
        self.episode = int(state["episode"])
        self.teacher = self.original if state["teacher_is_original"] or teacher is None else teacher.eval()


def _check_same_widths(raw: Any) -> None:
    """Stop every rank if the ranks' models differ (e.g. non-deterministic importance on a GPU)."""
    widths = all_gather_objects(np.asarray(raw.group_widths).tolist())
    if any(w != widths[0] for w in widths):
        raise RuntimeError(f"ranks pruned different channels (group widths {widths}); stopping")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | torch.Tensor):
        return obj.tolist()
    return str(obj)


def _plain_info(info: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(info, default=_json_default))


def _original_model(raw: Any) -> torch.nn.Module:
    for name in ("original_model", "teacher"):
        model = getattr(raw, name, None)
        if isinstance(model, torch.nn.Module):
            return model
    return raw.model


def _after_kd(raw: Any) -> tuple[np.ndarray, float]:
    """Tell the env its model's weights changed outside ``step`` (distilled); return the new observation.

    The env re-scores the model on its validation images and recomputes the next stage's channel
    importance from the distilled weights (``PruneEnv.model_changed()``).
    """
    new_obs = np.asarray(raw.model_changed(), dtype=np.float32)
    return new_obs, float(new_obs[-1])


def _env_get_state(raw: Any) -> dict[str, Any]:
    """The env's episode state as plain tensors and numbers (its model is saved separately)."""
    snap = raw.snapshot()
    snap.pop("model")
    return _to_device(snap, "cpu")


def _env_set_state(env: gym.Env, state: dict[str, Any], model: torch.nn.Module, seed: int) -> None:
    """Put the env back into a :func:`_env_get_state` state with ``model`` as its (pruned) model."""
    # Reset through the wrappers (gym.make's OrderEnforcing refuses step() before its own reset()); the
    # env must be started, and restore() then overwrites the whole episode state.
    env.reset(seed=seed)
    raw = env.unwrapped
    snap = _to_device(dict(state), raw.device)
    snap["model"] = model.to(raw.device)
    raw.restore(snap)


def _to_device(obj: Any, device: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) if k != "rng" else copy.deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------


def _after_checkpoint(stage: int) -> None:
    """Called after every complete stage checkpoint (tests replace it to simulate an interruption)."""


class _Clock:
    """Wall seconds of the run, including those spent before an interruption."""

    def __init__(self, previous: float = 0.0) -> None:
        self.previous = float(previous)
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return self.previous + time.perf_counter() - self.start


class _StageCheckpoint(BaseCallback):
    """Writes ``stages/NNN/`` after every committed stage (SB3 callback of the staged pruners)."""

    def __init__(
        self, stages_dir: Path, recovery: _StageRecovery, clock: _Clock, keep_last: int = 2, bar: Any = None
    ) -> None:
        super().__init__()
        self.clock = clock
        self.stages_dir = stages_dir
        self.recovery = recovery
        self.keep_last = keep_last
        self.bar = bar

    def _on_step(self) -> bool:
        from keepgym.models import save_model

        if not is_main_process():  # every rank holds the same state; rank 0 writes it
            return True
        raw = self.recovery.env.unwrapped
        stage = int(raw.stage)
        record = self.recovery.stage_records[-1] if self.recovery.stage_records else {}
        for key in ("val_accuracy", "macs_ratio", "sparsity"):
            if record.get(key) is not None:
                self.logger.record(f"kd/{key}", float(record[key]))
        self.logger.record("kd/teacher_val_accuracy", float(self.recovery.teacher_val))
        self.logger.dump(step=self.num_timesteps)

        def write(tmp: Path) -> None:
            save_model(raw.model, tmp / "model.pt", stage=stage)
            if self.recovery.teacher is not self.recovery.original:
                save_model(self.recovery.teacher, tmp / "teacher.pt", stage=stage)
            self.model.save(tmp / "agent.zip")
            atomic_torch_save(
                {
                    "stage": stage,
                    "env": _env_get_state(raw),
                    "recovery": self.recovery.state(),
                    "rng": _rng_state(),
                    "wall": self.clock(),
                },
                tmp / _STATE_FILE,
            )

        write_dir_atomically(self.stages_dir / f"{stage:03d}", write)
        retain_checkpoints(self.stages_dir, self.keep_last, _STATE_FILE)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                val=f"{record.get('val_accuracy', float('nan')):.3f}",
                macs=f"{record.get('macs_ratio') or float('nan'):.2f}",
            )
        _after_checkpoint(stage)
        return True


# --------------------------------------------------------------------------------------------------
# agents
# --------------------------------------------------------------------------------------------------


def _agent_class(algo: str) -> type:
    if algo == "rlpruner":
        from keepgym.agents.rl_pruner import RLPruner

        return RLPruner
    if algo in ("uniform", "global"):
        from keepgym.agents.baselines import GlobalPruner, UniformPruner

        return UniformPruner if algo == "uniform" else GlobalPruner
    import stable_baselines3 as sb3

    return {"ppo": sb3.PPO, "sac": sb3.SAC, "a2c": sb3.A2C}[algo]


def _make_agent(cfg: PruneConfig, env: gym.Env, tb: str, num_stages: int) -> Any:
    cls = _agent_class(cfg.algo)
    common = {"tensorboard_log": tb, "seed": cfg.seed, "verbose": 0}
    if cfg.algo == "rlpruner":
        return cls(
            "PruneDistributionPolicy",
            env,
            sample_num=cfg.sample_num,
            rounds_per_stage=cfg.rounds_per_stage,
            archive_size=max(cfg.sample_num, 1),
            **common,
        )
    if cfg.algo in ("uniform", "global"):
        return cls("PruneDistributionPolicy", env, **common)
    n = max(2, num_stages)
    if cfg.algo == "ppo":
        return cls("MlpPolicy", env, n_steps=n, batch_size=n, n_epochs=4, device="cpu", **common)
    if cfg.algo == "a2c":
        return cls("MlpPolicy", env, n_steps=n, device="cpu", **common)
    return cls(
        "MlpPolicy", env, learning_starts=n, buffer_size=10_000, batch_size=min(64, n), device="cpu", **common
    )


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def _check_resume(out: Path, cfg: PruneConfig) -> None:
    path = out / "config.json"
    if not path.exists():
        raise CliError(f"--resume: {out} has no config.json")
    saved = json.loads(path.read_text())
    ignore = {"resume", "force", "progress", "device", "out", "latency_repeats", "ray_address", "keep_checkpoints"}
    diff = [k for k, v in saved.items() if k not in ignore and getattr(cfg, k, v) != v]
    if diff:
        raise CliError(f"--resume: settings differ from the saved run in {', '.join(sorted(diff))}")


def _measure(model: torch.nn.Module, data: Any, device: str) -> dict[str, Any]:
    from keepgym.envs.metrics import count_macs_params, evaluate_accuracy

    model = model.to(device).eval()
    macs, params = count_macs_params(model, _input_size(data))
    return {
        "val_accuracy": evaluate_accuracy(model, data.val_x, data.val_y, data.normalize, device=device),
        "test_accuracy": evaluate_accuracy(model, data.test_x, data.test_y, data.normalize, device=device),
        "macs": macs,
        "params": params,
    }


def _latency_side_by_side(
    models: dict[str, torch.nn.Module], data: Any, device: str, repeats: int, threads: int | None = None
) -> dict:
    """Median latency at batch 1 and 64 of several models, interleaved so they share the machine's state.

    ``threads`` sets torch's CPU threads while timing (restored afterwards).
    """
    from keepgym.envs.metrics import measure_latency

    out = {name: {"latency_ms_b1": None, "latency_ms_b64": None} for name in models}
    if repeats <= 0:
        return out
    size = _input_size(data)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for batch, key, reps in ((1, "latency_ms_b1", repeats), (64, "latency_ms_b64", max(3, repeats // 4))):
            samples: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(3):  # three interleaved rounds; the median of the medians is reported
                for name, model in models.items():
                    ms = measure_latency(model, size, batch_size=batch, repeats=reps, device=device)
                    samples[name].append(ms["median_ms"])
            for name in models:
                out[name][key] = float(np.median(samples[name]))
    finally:
        torch.set_num_threads(saved_threads)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def compress(config: PruneConfig) -> dict[str, Any]:
    """Run one compression (see the module docstring) and return the summary written to ``summary.json``.

    Under ``torchrun`` every rank calls this; rank 0 writes the files and every rank returns its summary.
    """
    validate(config)
    dist_info = init_distributed(resolve_device(config.device))
    try:
        summary = _compress(config, dist_info)  # None on ranks other than 0
        return main_first(lambda: summary)
    finally:
        release_run_dir()  # the run folder's lock (taken by prepare_run_dir)
        cleanup_distributed()


def _compress(config: PruneConfig, dist_info: DistributedInfo) -> dict[str, Any] | None:
    cfg = config
    validate(cfg)
    from keepgym.experiments.plots import plot_policy
    from keepgym.models import load_model, save_model

    device = dist_info.device
    main = dist_info.is_main
    if cfg.out is None:
        name = cfg.model or (cfg.env or "env").removeprefix("keepgym:")
        # rank 0 names the run (the name holds the time) and tells the others
        out_name = main_first(lambda: str(Path("runs") / run_name("prune", name, cfg.algo, f"s{cfg.seed}")))
        cfg = dataclasses.replace(cfg, out=out_name)
    clock = _Clock()
    seed_everything(cfg.seed)
    # The env first: it reads the checkpoint and the data, so a bad or foreign model file, a missing
    # dataset or a model that does not fit it is refused before a run folder exists.
    env = _make_env(cfg, device)
    out = main_first(lambda: _prepare_out(cfg))  # rank 0 makes the folder; a refusal ends every rank
    raw = env.unwrapped
    data = _env_data(raw)
    num_stages = int(raw.num_stages)
    recovery = _StageRecovery(env, cfg, data, device, distributed=dist_info.enabled)
    tb = str(out / "tb") if main else None  # the agents log to TensorBoard on rank 0 only
    stages_dir = out / "stages"

    from tqdm.auto import tqdm

    agent = None
    done_stages = 0
    search_done = (out / "search" / _STATE_FILE).exists()
    if cfg.algo in STAGED_ALGOS:
        complete = complete_checkpoints(stages_dir, _STATE_FILE) if cfg.resume else []
        if cfg.resume and not complete and not search_done:
            logger.info("--resume: no complete stage in %s; starting from the beginning", stages_dir)
        if complete and not search_done:
            last = complete[-1]
            state = load_state(last / _STATE_FILE)
            _env_set_state(env, state["env"], load_model(last / "model.pt"), cfg.seed)
            teacher = load_model(last / "teacher.pt").to(device) if (last / "teacher.pt").exists() else None
            recovery.load_state(state["recovery"], teacher)
            agent = _agent_class(cfg.algo).load(
                last / "agent.zip", env=recovery, force_reset=False, tensorboard_log=tb, device="cpu"
            )
            _set_rng_state(state["rng"])  # after load(): SB3 reseeds the global RNGs while loading
            clock.previous = float(state["wall"])
            done_stages = int(state["stage"])
            logger.info("resuming %s after stage %d of %d", out, done_stages, num_stages)
        if not search_done:
            if agent is None:
                agent = _make_agent(cfg, recovery, tb, num_stages)
            bar = tqdm(
                total=num_stages,
                initial=done_stages,
                desc=f"prune {cfg.algo}",
                disable=not (cfg.progress and main),
            )
            try:
                from keepgym.agents.callbacks import EnvInfoCallback

                callback = _StageCheckpoint(stages_dir, recovery, clock, keep_last=cfg.keep_checkpoints, bar=bar)
                agent.learn(
                    num_stages - done_stages,
                    # env/* tags, group sparsity histogram + image, config text + hparams, as for --algo ppo
                    callback=[EnvInfoCallback(config=dataclasses.asdict(cfg)), callback],
                    reset_num_timesteps=done_stages == 0,
                    tb_log_name=cfg.algo,
                )
            finally:
                bar.close()
            history = getattr(agent, "history", [])
            search = {
                "evaluations": int(sum(int(r.get("candidates", 0)) for r in history)),
                "distribution": np.asarray(agent.distribution).tolist() if cfg.algo == "rlpruner" else None,
                "widths": np.asarray(raw.group_widths).tolist(),
                "initial_widths": np.asarray(raw.initial_group_widths).tolist(),
                "info": {},
                "stage_records": recovery.stage_records,
                "teacher_swaps": recovery.teacher_swaps,
                "teacher_val": recovery.teacher_val,
                "collapse_stages": [list(x) for x in getattr(agent, "collapse_stages", [])],
            }
            pruned = raw.model
            teacher = recovery.teacher
            _save_search(out, pruned, teacher, recovery, search, clock)
    else:
        agent = _make_agent(cfg, recovery, tb, num_stages)
        bar = tqdm(
            total=num_stages * cfg.episodes, desc=f"prune {cfg.algo}", disable=not (cfg.progress and main)
        )

        class _Bar(BaseCallback):
            def _on_step(self) -> bool:
                bar.update(1)
                return True

        try:
            from keepgym.agents.callbacks import EnvInfoCallback

            # One TensorBoard point per stage (SAC/A2C would otherwise dump only every few episodes).
            info_cb = EnvInfoCallback(config=dataclasses.asdict(cfg))
            agent.learn(num_stages * cfg.episodes, callback=[info_cb, _Bar()], tb_log_name=cfg.algo, log_interval=1)
        finally:
            bar.close()
        best = recovery.best_episode
        if best is None:
            raise RuntimeError(f"{cfg.algo} finished no episode in {num_stages * cfg.episodes} timesteps")
        search = {
            "evaluations": 0,
            "distribution": None,
            "widths": best["widths"],
            "initial_widths": np.asarray(raw.initial_group_widths).tolist(),
            "info": best["info"],
            "stage_records": recovery.stage_records,
            "teacher_swaps": recovery.teacher_swaps,
            "teacher_val": recovery.teacher_val,
            "best_episode": best["episode"],
            "collapse_stages": [],
        }
        _save_search(out, best["model"], recovery.teacher, recovery, search, clock)

    # ---- final distillation (resumable per epoch) ------------------------------------------------
    search_state = load_state(out / "search" / _STATE_FILE)
    search = json.loads(search_state["search_json"])
    clock.previous = max(clock.previous, float(search_state["wall"])) if cfg.resume else clock.previous
    student = load_model(out / "search" / "model.pt").to(device)
    teacher_path = out / "search" / "teacher.pt"
    teacher = load_model(teacher_path).to(device).eval() if teacher_path.exists() else recovery.original
    final_dir = out / "final_kd"
    start_epoch, best_acc, best_state = 0, recovery._val(student), copy.deepcopy(student.state_dict())
    final_records: list[dict] = []
    if (final_dir / _STATE_FILE).exists():
        fstate = load_state(final_dir / _STATE_FILE)
        start_epoch, best_acc = int(fstate["epoch"]) + 1, float(fstate["best_val"])
        final_records = json.loads(fstate["records_json"])
        clock.previous = float(fstate["wall"])
        student = load_model(final_dir / "model.pt").to(device)
        best_state = load_model(final_dir / "best.pt").to(device).state_dict()
        _set_rng_state(fstate["rng"])

    def on_epoch(epoch: int, best_val: float, state: dict, records: list[dict]) -> None:
        def write(tmp: Path) -> None:
            save_model(student, tmp / "model.pt", epoch=epoch)
            best_model = copy.deepcopy(student)
            best_model.load_state_dict(state)
            save_model(best_model, tmp / "best.pt", epoch=epoch)
            atomic_torch_save(
                {
                    "epoch": epoch,
                    "best_val": best_val,
                    "rng": _rng_state(),
                    "wall": clock(),
                    "records_json": json.dumps(final_records + records, default=_json_default),
                },
                tmp / _STATE_FILE,
            )

        if main:
            write_dir_atomically(final_dir, write)

    if cfg.final_finetune_epochs > 0 and start_epoch < cfg.final_finetune_epochs:
        _, records = _kd_epochs(
            student,
            teacher,
            data,
            cfg.final_finetune_epochs,
            seed=cfg.seed,
            stage=10_000,
            learning_rate=cfg.kd_learning_rate,
            batch_size=cfg.kd_batch_size,
            device=device,
            start_epoch=start_epoch,
            best=(best_acc, best_state),
            on_epoch=on_epoch,
            distributed=dist_info.enabled,
        )
        final_records += records
    else:
        student.load_state_dict(best_state)

    # ---- outputs ---------------------------------------------------------------------------------
    if not main:  # every rank holds the same compressed model; rank 0 measures it and writes
        env.close()
        return None
    original = recovery.original
    base = _measure(original, data, device)
    final = _measure(student, data, device)
    lat = _latency_side_by_side(
        {"baseline": original, "final": student}, data, device, cfg.latency_repeats, cfg.latency_threads
    )
    base.update(lat["baseline"])
    final.update(lat["final"])
    initial_widths = np.asarray(search["initial_widths"], dtype=np.int64)
    widths = np.asarray(search["widths"], dtype=np.int64)
    sparsity = float(1.0 - widths.sum() / max(initial_widths.sum(), 1))
    save_model(
        student,
        out / "compressed.pt",
        sparsity=sparsity,
        val_accuracy=final["val_accuracy"],
        algo=cfg.algo,
        widths=widths.tolist(),
    )
    group_names = _group_names(raw, len(widths))
    plot_policy(
        out / "policy.png",
        initial_widths,
        widths,
        search.get("distribution"),
        group_names,
        title=f"{cfg.algo}: sparsity {sparsity:.2f}, MACs x{_ratio(base['macs'], final['macs']) or 0:.2f}",
    )
    wall = clock()
    summary = {
        "algo": cfg.algo,
        "model": (getattr(original, "keepgym_spec", None) or {}).get("name", cfg.model),
        "dataset": data.name,
        "seed": cfg.seed,
        "target_sparsity": cfg.sparsity,
        "target_macs": cfg.target_macs,
        "target_params": cfg.target_params,
        "stage_sparsity": cfg.stage_sparsity,
        "num_stages": num_stages,
        "baseline": base,
        "final": final,
        "macs_reduction": 1.0 - final["macs"] / base["macs"],
        "params_reduction": 1.0 - final["params"] / base["params"],
        "speedup_b1": _ratio(base["latency_ms_b1"], final["latency_ms_b1"]),
        "speedup_b64": _ratio(base["latency_ms_b64"], final["latency_ms_b64"]),
        "sparsity": sparsity,
        "initial_widths": initial_widths.tolist(),
        "widths": widths.tolist(),
        "group_names": group_names,
        "distribution": search.get("distribution"),
        "evaluations": int(search["evaluations"]),
        "teacher_swaps": search["teacher_swaps"],
        "collapse_stages": search.get("collapse_stages", []),
        "stages": search["stage_records"],
        "final_kd": final_records,
        "divergence_events": [r for r in search["stage_records"] + final_records if r.get("diverged")],
        "device": device,
        "wall_seconds": wall,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if dist_info.enabled:
        summary["world_size"] = dist_info.world_size
    write_json(out / "summary.json", summary)
    _log_final(tb, cfg.algo, summary)
    env.close()
    return summary


def _prepare_out(cfg: PruneConfig) -> Path:
    """Create (or reopen, with ``--resume``) the run folder and write ``config.json``."""
    out = prepare_run_dir(cfg.out, force=cfg.force, resume=cfg.resume)
    if cfg.resume:
        _check_resume(out, cfg)
        remove_partial_checkpoints((out, out / "stages"))
    else:
        write_json(out / "config.json", cfg)
    return out


def _save_search(
    out: Path,
    pruned: torch.nn.Module,
    teacher: torch.nn.Module,
    recovery: _StageRecovery,
    search: dict,
    clock: _Clock,
) -> None:
    """Checkpoint the end of the search: the pruned model, its teacher and the search's record."""
    from keepgym.models import save_model

    def write(tmp: Path) -> None:
        save_model(pruned, tmp / "model.pt")
        if teacher is not recovery.original:
            save_model(teacher, tmp / "teacher.pt")
        blob = json.dumps(search, default=_json_default)
        atomic_torch_save({"search_json": blob, "rng": _rng_state(), "wall": clock()}, tmp / _STATE_FILE)

    main_first(lambda: write_dir_atomically(out / "search", write))  # the other ranks then read it


def _group_names(raw: Any, n: int) -> list[str]:
    groups = getattr(raw, "groups", None)
    if groups is not None and len(groups) == n:
        return [str(getattr(g, "root_name", i)) for i, g in enumerate(groups)]
    return [str(i) for i in range(n)]


def _log_final(tb: str, algo: str, summary: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(tb) / f"{algo}_final"))
    try:
        step = int(summary["num_stages"])
        for block in ("baseline", "final"):
            for key in ("val_accuracy", "test_accuracy", "macs", "params"):
                writer.add_scalar(f"{block}/{key}", summary[block][key], step)
        writer.add_scalar("final/macs_reduction", summary["macs_reduction"], step)
        writer.add_scalar("final/params_reduction", summary["params_reduction"], step)
    finally:
        writer.close()


def run(cfg: PruneConfig) -> dict:
    """CLI entry point: :func:`compress` plus a short report on stdout."""
    summary = compress(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return summary
    b, f = summary["baseline"], summary["final"]
    print(
        f"{summary['algo']}: sparsity {summary['sparsity']:.3f}  "
        f"test acc {100 * b['test_accuracy']:.2f}% -> {100 * f['test_accuracy']:.2f}%  "
        f"MACs {b['macs'] / 1e6:.2f}M -> {f['macs'] / 1e6:.2f}M (-{100 * summary['macs_reduction']:.1f}%)  "
        f"params -{100 * summary['params_reduction']:.1f}%"
    )
    return summary
