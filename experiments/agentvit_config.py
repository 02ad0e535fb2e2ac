"""The settings of one ``keepgym agentvit`` run: the dataclass the flags are built from, and its checks.

``AgentViTConfig`` is saved as ``runs/<name>/config.json``; :func:`validate` refuses a bad setting in one
line before any work starts and :func:`check_resume` a ``--resume`` whose settings differ from the run's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from keepgym.agents.patch_agents import AGENT_PRESETS, ALGOS
from keepgym.envs.data import DATASETS
from keepgym.envs.patch_select_env import ACTION_MODES, DEFAULT_KEEP_RATIOS, STATES
from keepgym.experiments.common import CliError, arg
from keepgym.models.vit import VIT_PRESETS

__all__ = ["AgentViTConfig", "check_resume", "default_out", "validate"]

# Settings that may change between a run and its --resume.
_RESUMABLE = {"resume", "force", "progress", "device", "num_threads", "out", "keep_checkpoints"}


@dataclass
class AgentViTConfig:
    """Settings of one ``keepgym agentvit`` run (saved as ``config.json``)."""

    dataset: str = arg(help="dataset", choices=DATASETS)
    out: str | None = arg(None, help="run folder (default runs/agentvit-DATASET-ALGO-MODE-sSEED)")
    epochs: int = arg(15, help="training epochs (one epoch = one episode)")
    action_mode: str = arg(
        "ratio",
        help="ratio: a keep ratio per batch, top-k per image; mask: one mask per batch; "
        "patches: the agent picks which --target-keep patches each image keeps (ddqn)",
        choices=ACTION_MODES,
    )
    algo: str = arg("ddqn", help="agent: ddqn (agents.DDQN), dqn, ppo, a2c (Stable-Baselines3)", choices=ALGOS)
    agent_preset: str = arg(
        "ours",
        help="ddqn hyper-parameters: ours (DDQN defaults) or agentvit (reference)",
        choices=AGENT_PRESETS,
    )
    preset: str = arg("vit_small", help="ViT size", choices=tuple(VIT_PRESETS))
    patch_size: int = arg(4, help="patch side in pixels (must divide the image size)")
    image_size: int | None = arg(None, help="resize images to this size (default: the dataset's own)")
    batch_size: int = arg(128, help="ViT training batch size (one env step)")
    learning_rate: float = arg(1e-3, help="ViT Adam learning rate")
    warmup_epochs: int = arg(1, help="first epochs on all patches, before the agent acts")
    target_keep: int | None = arg(None, help="patches the reward aims for (default round(30/64 * N))")
    keep_ratios: tuple[float, ...] = arg(DEFAULT_KEEP_RATIOS, help="keep ratios of the ratio mode")
    patch_weight: float = arg(20.0, help="weight of the patch-count reward term")
    reward_images: int | None = arg(
        None, help="patches mode: images per batch whose all-patch loss sets the reward (default batch/8)"
    )
    state: str = arg("attention", help="observation: attention received per patch, or agentvit", choices=STATES)
    state_layer: int = arg(0, help="block whose attention makes the observation")
    augment: bool = arg(True, help="random crop + flip on training batches")
    baseline: bool = arg(False, help="also train a full-patch ViT with the same settings (full block)")
    train_size: int | None = arg(None, help="use at most this many training images (synthetic: generate this many)")
    test_size: int | None = arg(None, help="use at most this many test images")
    val_size: float = arg(0.1, help="fraction of the training images held out for validation")
    data_root: str | None = arg(None, help="folder of the torchvision datasets")
    download: bool = arg(False, help="download a missing torchvision dataset (needs internet)")
    examples: int = arg(8, help="test images shown in patches.png")
    speed_rounds: int = arg(3, help="interleaved rounds of the final images/s measurement")
    num_threads: int | None = arg(None, help="torch CPU threads (default: leave as set)")
    device: str = arg("auto", help="cpu, cuda, cuda:N or auto")
    seed: int = arg(0, help="random seed (data split, ViT initialisation, data order, agent)")
    force: bool = arg(False, help="overwrite an existing run folder")
    resume: bool = arg(False, help="continue the interrupted run in --out")
    keep_checkpoints: int = arg(2, help="epoch checkpoints kept (the newest N)")
    progress: bool = arg(True, help="show a progress bar")
    # Tests only: stop (as if killed) right after the checkpoint of this epoch.
    _stop_after_epoch: int | None = None
    # Tests only: stop (as if killed) while writing the checkpoint of this epoch (a partial folder stays).
    _stop_in_checkpoint: int | None = None
    # Tests only: stop (as if killed) after this many agent steps (mid-epoch, no checkpoint).
    _stop_after_steps: int | None = None


def default_out(cfg: AgentViTConfig) -> str:
    """The run folder used when ``--out`` is not given."""
    return f"runs/agentvit-{cfg.dataset}-{cfg.algo}-{cfg.action_mode}-s{cfg.seed}"


def validate(cfg: AgentViTConfig) -> None:
    """Check every setting before any work starts (raises :class:`CliError`)."""
    if cfg.dataset not in DATASETS:
        raise CliError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    for name, value, choices in (
        ("--algo", cfg.algo, ALGOS),
        ("--action-mode", cfg.action_mode, ACTION_MODES),
        ("--preset", cfg.preset, tuple(VIT_PRESETS)),
        ("--agent-preset", cfg.agent_preset, AGENT_PRESETS),
        ("--state", cfg.state, STATES),
    ):
        if value not in choices:
            raise CliError(f"{name} {value!r} is not one of {', '.join(choices)}")
    checks = [
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}"),
        (
            cfg.warmup_epochs < cfg.epochs,
            f"--warmup-epochs ({cfg.warmup_epochs}) must be smaller than --epochs ({cfg.epochs}) so the agent acts",
        ),
        (cfg.batch_size >= 2, f"--batch-size must be >= 2, got {cfg.batch_size}"),
        (cfg.learning_rate > 0, f"--learning-rate must be > 0, got {cfg.learning_rate}"),
        (cfg.patch_size >= 1, f"--patch-size must be >= 1, got {cfg.patch_size}"),
        (cfg.image_size is None or cfg.image_size >= 4, f"--image-size must be >= 4, got {cfg.image_size}"),
        (
            len(cfg.keep_ratios) >= 1 and all(0 < r <= 1 for r in cfg.keep_ratios),
            f"--keep-ratios must be values in (0, 1], got {list(cfg.keep_ratios)}",
        ),
        (cfg.patch_weight >= 0, f"--patch-weight must be >= 0, got {cfg.patch_weight}"),
        (cfg.state_layer >= 0, f"--state-layer must be >= 0, got {cfg.state_layer}"),
        (0 < cfg.val_size < 1, f"--val-size must be in (0, 1), got {cfg.val_size}"),
        (cfg.train_size is None or cfg.train_size >= 10, f"--train-size must be >= 10, got {cfg.train_size}"),
        (cfg.test_size is None or cfg.test_size >= 1, f"--test-size must be >= 1, got {cfg.test_size}"),
        (cfg.examples >= 1, f"--examples must be >= 1, got {cfg.examples}"),
        (cfg.speed_rounds >= 1, f"--speed-rounds must be >= 1, got {cfg.speed_rounds}"),
        (
            cfg.num_threads is None or cfg.num_threads >= 1,
            f"--num-threads must be >= 1, got {cfg.num_threads}",
        ),
        (not (cfg.force and cfg.resume), "--force and --resume exclude each other"),
        (
            not (cfg.algo == "dqn" and cfg.action_mode == "mask"),
            "--algo dqn supports only --action-mode ratio (SB3's DQN needs a Discrete action space); "
            "use --algo ddqn, ppo or a2c for masks",
        ),
        (
            cfg.action_mode != "patches" or cfg.algo == "ddqn",
            "--action-mode patches needs --algo ddqn (a per-patch Q head); SB3's algorithms use ratio or mask",
        ),
        (
            cfg.reward_images is None or 1 <= cfg.reward_images <= cfg.batch_size,
            f"--reward-images must be in [1, --batch-size], got {cfg.reward_images}",
        ),
        (cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise CliError(msg)
    size = cfg.image_size or (32 if cfg.dataset in ("digits", "synthetic") else None)
    if size is not None and size % cfg.patch_size:
        raise CliError(f"--patch-size {cfg.patch_size} does not divide the image size {size}")
    if size is not None:
        n = (size // cfg.patch_size) ** 2
        if n < 2:
            raise CliError(f"--patch-size {cfg.patch_size} leaves {n} patch; patch selection needs at least 2")
        if cfg.target_keep is not None and not 1 <= cfg.target_keep <= n - 1:
            raise CliError(f"--target-keep must be in [1, {n - 1}] for {n} patches, got {cfg.target_keep}")
    depth = VIT_PRESETS[cfg.preset]["depth"]
    if cfg.state_layer >= depth:
        raise CliError(f"--state-layer must be < the depth {depth} of {cfg.preset}, got {cfg.state_layer}")
    if cfg.dataset == "folder" and cfg.data_root is None:
        raise CliError("--dataset folder needs --data-root DIR (an image folder, or a .tar.gz/.zip of one)")
    if cfg.data_root is not None and not Path(cfg.data_root).expanduser().exists() and not cfg.download:
        raise CliError(f"--data-root {cfg.data_root} does not exist")


def check_resume(out: Path, cfg: AgentViTConfig) -> None:
    """Refuse a ``--resume`` of ``out`` whose settings differ from its ``config.json``."""
    path = out / "config.json"
    if not path.exists():
        raise CliError(f"--resume: {out} has no config.json")
    saved = json.loads(path.read_text())
    current = asdict(cfg)
    diff = [
        k
        for k, v in saved.items()
        if k not in _RESUMABLE and not k.startswith("_") and k in current and _jsonish(current[k]) != v
    ]
    if diff:
        raise CliError(f"--resume: settings differ from the saved run in {', '.join(sorted(diff))}")


def _jsonish(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
