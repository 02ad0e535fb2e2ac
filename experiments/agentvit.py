"""``keepgym agentvit``: train a ViT while an RL agent learns which patches it sees (AgentViT).

    keepgym agentvit --dataset digits --epochs 15 --baseline --out runs/agentvit-digits
    keepgym evaluate --vit runs/agentvit-digits/vit.pt --agent runs/agentvit-digits/agent.zip --dataset digits

One ``PatchSelectEnv`` step is one ViT training step on one mini-batch, with the patches the agent
chooses (AgentViT; Cauteruccio et al., Applied Intelligence 2025); an epoch is an episode. The agent
(``keepgym.agents.DDQN`` by default, or SB3's DQN, PPO, A2C) is trained by its own ``learn`` loop, which
drives the env, so ViT and agent learn jointly and online. Warm-up epochs (all patches, nothing for
the agent to learn) are run inside the env's own ``reset``, so the agent only ever stores
transitions that carry a reward.

``--action-mode patches`` is the mode in which the agent decides **which** patches each image keeps
(``PatchSelectEnv``'s per-patch features, ``DDQN``'s per-patch Q head, ``--target-keep`` patches per
image, rewarded by the loss gap to all patches on the same images). ``ratio`` (how many; which ones
is attention top-k) and ``mask`` (one set per batch) remain for SB3's discrete-action algorithms.

CIFAR-10 on a 2-core CPU, the reduced preset the README reports (``vit_small``: dim 64, depth 4, 64
patches of 4x4, 30 kept; 8,000 training images of which 800 held out for validation; 6 epochs; no
warm-up; 3 seeds in parallel, one thread each, about 14 minutes in all on the shared machine)::

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C ~/.cache/keepgym/cifar10-jpeg
    keepgym agentvit --dataset folder --data-root ~/.cache/keepgym/cifar10-jpeg --action-mode patches \\
        --preset vit_small --train-size 8000 --epochs 6 --warmup-epochs 0 --baseline --num-threads 1 --seed 0

After training, the jointly trained ViT is scored on the **test** split four ways at the same mean
number of kept patches ``k`` (the agent's own mean on the test split), through the env's own
``evaluate``/``evaluate_policy``:

* ``agent``: the agent chooses per batch, as during training (ViT: the joint one);
* ``random``: ``k`` random patches per image (joint ViT);
* ``topk``: the ``k`` patches with the highest block-``state_layer`` attention, per image, EViT-like
  (joint ViT);
* ``full``: all patches. With ``--baseline`` this is a *separate* ViT trained with the same settings
  (epochs, seed, data order, initialisation) on all patches and no agent, and ``full.train_seconds``
  is its training time; without ``--baseline`` it is the joint ViT on all patches.
* ``joint_full`` (always): the joint ViT on all patches.

``images_per_second`` of the blocks is measured side by side (interleaved rounds, median), at the
training batch size; ``macs_per_image`` counts the forward pass plus the scoring pass where the
selection needs scores (``agent``, ``topk``), with both parts also given separately.

Outputs in ``--out``: ``summary.json``, ``config.json``, ``agent.zip``, ``vit.pt`` (the joint ViT,
:func:`keepgym.models.save_model`, with the selection settings ``keepgym evaluate --vit`` needs),
``baseline_vit.pt`` (with ``--baseline``), ``patches.png``, TensorBoard events (agent logs,
``env/*`` from :class:`keepgym.agents.callbacks.EnvInfoCallback`, ``eval/*`` per epoch) and
``checkpoint/NNNN/`` (one atomic folder per epoch, the newest ``--keep-checkpoints`` kept: the env's
``state_dict`` (ViT, optimiser, data order, RNG), the agent, its replay buffer and the process RNGs),
from which ``--resume`` continues exactly: a kill at any instant resumes to the uninterrupted result.

Under ``torchrun --nproc-per-node N`` (``gloo`` on CPU, ``nccl`` on GPU) the joint ViT training is
data-parallel: every rank builds the same seeded env and agent, each ViT step trains on the rank's slice
of the ``--batch-size`` global batch with gradients all-reduced (DistributedDataParallel), and the loss
in the reward is the global-batch mean, so all ranks hold the same ViT and see the same observations
and rewards. The action each step commits is rank 0's agent's, broadcast (the other ranks' agents
would choose the same from the same seed and inputs on deterministic kernels; the broadcast makes it
so on any). Rank 0 alone writes files and runs the per-epoch validation, the ``--baseline`` ViT and
the final report (single-process); every rank returns rank 0's summary.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from keepgym.agents.serialization import load_replay_buffer, save_replay_buffer
from keepgym.envs.data import DATASETS, BatchLoader, DatasetSplits, load_dataset
from keepgym.envs.distributed import DistributedInfo, cleanup_distributed, init_distributed, is_main_process, main_first
from keepgym.envs.metrics import synchronize
from keepgym.experiments.common import (
    CliError,
    arg,
    atomic_torch_save,
    prepare_run_dir,
    resolve_device,
    seed_everything,
    write_json,
)
from keepgym.models.checkpoints import (
    complete_checkpoints,
    remove_partial_checkpoints,
    retain_checkpoints,
    write_dir_atomically,
)

__all__ = [
    "AgentViTConfig",
    "Config",
    "COMMAND",
    "DESCRIPTION",
    "train_agentvit",
    "run",
    "evaluate_agentvit",
    "benchmark_agentvit",
]

logger = logging.getLogger(__name__)

COMMAND = "agentvit"
DESCRIPTION = (
    "Train a ViT jointly with an RL agent that picks its patches (AgentViT); compare with heuristics. "
    "CIFAR-10 preset for a 2-core CPU (reduced: vit_small = dim 64, depth 4; 8,000 training images; "
    "6 epochs; README): --dataset folder --data-root DIR --action-mode patches --preset vit_small "
    "--train-size 8000 --epochs 6 --warmup-epochs 0 --baseline --num-threads 1."
)

ALGOS = ("ddqn", "dqn", "ppo", "a2c")
ACTION_MODES = ("ratio", "mask", "patches")
VIT_PRESETS = ("vit_tiny", "vit_small", "vit_cifar")
AGENT_PRESETS = ("ours", "agentvit")
STATES = ("attention", "agentvit")
BLOCKS = ("full", "agent", "random", "topk", "joint_full")
_TB_NAME = "agentvit"
_STATE_FILE = "state.pt"


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
    algo: str = arg(
        "ddqn", help="agent: ddqn (agents.DDQN), dqn, ppo, a2c (Stable-Baselines3)", choices=ALGOS
    )
    agent_preset: str = arg(
        "ours",
        help="ddqn hyper-parameters: ours (DDQN defaults) or agentvit (reference)",
        choices=AGENT_PRESETS,
    )
    preset: str = arg("vit_small", help="ViT size", choices=VIT_PRESETS)
    patch_size: int = arg(4, help="patch side in pixels (must divide the image size)")
    image_size: int | None = arg(None, help="resize images to this size (default: the dataset's own)")
    batch_size: int = arg(128, help="ViT training batch size (one env step)")
    learning_rate: float = arg(1e-3, help="ViT Adam learning rate")
    warmup_epochs: int = arg(1, help="first epochs on all patches, before the agent acts")
    target_keep: int | None = arg(None, help="patches the reward aims for (default round(30/64 * N))")
    keep_ratios: tuple[float, ...] = arg((0.25, 0.375, 0.5, 0.75, 1.0), help="keep ratios of the ratio mode")
    patch_weight: float = arg(20.0, help="weight of the patch-count reward term")
    reward_images: int | None = arg(
        None, help="patches mode: images per batch whose all-patch loss sets the reward (default batch/8)"
    )
    state: str = arg(
        "attention", help="observation: attention received per patch, or agentvit", choices=STATES
    )
    state_layer: int = arg(0, help="block whose attention makes the observation")
    augment: bool = arg(True, help="random crop + flip on training batches")
    baseline: bool = arg(False, help="also train a full-patch ViT with the same settings (full block)")
    train_size: int | None = arg(
        None, help="use at most this many training images (synthetic: generate this many)"
    )
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


Config = AgentViTConfig


class _Stop(Exception):
    """Raised by the checkpoint callback to simulate an interruption (tests)."""


# --------------------------------------------------------------------------- validation
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
        ("--preset", cfg.preset, VIT_PRESETS),
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
            f"--warmup-epochs ({cfg.warmup_epochs}) must be smaller than --epochs ({cfg.epochs}) "
            "so the agent acts",
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
            raise CliError(
                f"--patch-size {cfg.patch_size} leaves {n} patch; patch selection needs at least 2"
            )
        if cfg.target_keep is not None and not 1 <= cfg.target_keep <= n - 1:
            raise CliError(f"--target-keep must be in [1, {n - 1}] for {n} patches, got {cfg.target_keep}")
    depth = _vit_dims(cfg.preset)["depth"]
    if cfg.state_layer >= depth:
        raise CliError(f"--state-layer must be < the depth {depth} of {cfg.preset}, got {cfg.state_layer}")
    if cfg.dataset == "folder" and cfg.data_root is None:
        raise CliError("--dataset folder needs --data-root DIR (an image folder, or a .tar.gz/.zip of one)")
    if cfg.data_root is not None and not Path(cfg.data_root).expanduser().exists() and not cfg.download:
        raise CliError(f"--data-root {cfg.data_root} does not exist")


def _vit_dims(preset: str) -> dict[str, int]:
    """Width, depth and heads of a ViT preset, as ``PatchSelectEnv`` keyword arguments."""
    from keepgym.models import create_model

    vit = create_model(preset, num_classes=2, in_chans=1, image_size=8, patch_size=4)
    return dict(dim=vit.dim, depth=vit.depth, heads=vit.heads, mlp_dim=vit.mlp_dim, dim_head=vit.dim_head)


# --------------------------------------------------------------------------- env wrapper
class _JointTraining(gym.Wrapper):
    """``PatchSelectEnv`` as the CLI drives it: a progress hook, steps counted, checkpoint restore.

    Warm-up and the at-least-one-patch rule are the env's own. :meth:`state` is the env's public
    ``state_dict`` plus the steps taken in the epoch; :meth:`restore_on_next_reset` makes the next
    ``reset`` (the one ``learn`` makes on a resumed agent) load it instead of starting a run.
    """

    def __init__(self, env: gym.Env, on_step: Callable[[dict], None] | None = None) -> None:
        super().__init__(env)
        self.on_step = on_step
        self.steps_in_epoch = 0
        self._pending: dict[str, Any] | None = None

    @property
    def core(self) -> Any:
        return self.env.unwrapped

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.core.load_state_dict(state["env"])
            self.steps_in_epoch = int(state["steps_in_epoch"])
            return self.core.observe(), {"epoch": self.core.epoch}
        obs, info = self.env.reset(seed=seed, options=options)
        self.steps_in_epoch = 0
        return obs, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps_in_epoch += 1
        if self.on_step is not None:
            self.on_step(info)
        return obs, reward, terminated, truncated, info

    def state(self) -> dict[str, Any]:
        """The env's training state (between two steps) and the steps taken in its epoch."""
        return {"env": self.core.state_dict(), "steps_in_epoch": self.steps_in_epoch}

    def restore_on_next_reset(self, state: dict[str, Any]) -> None:
        """Make the next ``reset`` rebuild ``state`` instead of starting or continuing a run."""
        self._pending = state


# --------------------------------------------------------------------------- agents
def _agent_class(algo: str) -> type:
    if algo == "ddqn":
        from keepgym.agents.ddqn import DDQN

        return DDQN
    import stable_baselines3 as sb3

    return {"dqn": sb3.DQN, "ppo": sb3.PPO, "a2c": sb3.A2C}[algo]


def _make_agent(cfg: AgentViTConfig, env: gym.Env, steps_per_epoch: int, tensorboard_log: str | None) -> Any:
    """The agent of ``cfg.algo`` with defaults scaled to the run length (see the comments)."""
    common = dict(seed=cfg.seed, tensorboard_log=tensorboard_log, device="cpu", verbose=0)
    # One epoch of exploration before learning: runs are tens of epochs of ~10-400 steps, so SB3's
    # fixed learning_starts=100 (DQN) would be most of a short run.
    starts = max(1, min(100, steps_per_epoch))
    cls = _agent_class(cfg.algo)
    if cfg.algo == "ddqn":
        if cfg.action_mode == "patches":
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
        if cfg.agent_preset == "agentvit":
            return cls.agentvit(env, **common)
        return cls("MlpPolicy", env, learning_starts=starts, **common)
    if cfg.algo == "dqn":
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
    if cfg.algo == "ppo":
        # One rollout = one epoch, so updates (and checkpoints) fall on epoch boundaries.
        n_steps = max(2, steps_per_epoch)
        return cls(
            "MlpPolicy", env, n_steps=n_steps, batch_size=max(2, min(64, n_steps)), gamma=0.9, **common
        )
    return cls("MlpPolicy", env, n_steps=max(1, min(8, steps_per_epoch)), gamma=0.9, **common)


def _load_agent(algo: str, path: str | Path, env: gym.Env | None = None) -> Any:
    """Load an agent zip without unpickling anything: our DDQN through its own safe ``load``, SB3's
    DQN/PPO/A2C with a replacement for every pickled field (:func:`keepgym.agents.serialization.load_sb3_agent`)."""
    from keepgym.agents.serialization import load_sb3_agent

    return load_sb3_agent(_agent_class(algo), path, env=env, device="cpu")


# --------------------------------------------------------------------------- evaluation
def _block(result: dict[str, float], score_macs: bool = True) -> dict[str, float]:
    """An env ``evaluate`` result as a report block: MACs = forward + scoring pass."""
    score = result["score_macs_per_image"] if score_macs else 0.0
    return {
        "accuracy": result["accuracy"],
        "macs_per_image": result["macs_per_image"] + score,
        "forward_macs_per_image": result["macs_per_image"],
        "score_macs_per_image": score,
        "images_per_second": result["images_per_second"],
        "kept_patches": result["kept_patches"],
    }


def _side_by_side(runs: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict[str, float]]:
    """Call every entry of ``runs`` in interleaved rounds; accuracy from round 1, median images/s."""
    results: dict[str, dict[str, float]] = {}
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for rnd in range(rounds):
        for name, fn in runs.items():
            r = fn()
            if rnd == 0:
                results[name] = r
            speeds[name].append(r["images_per_second"])
    for name, values in speeds.items():
        results[name]["images_per_second"] = float(np.median(values))
    return results



# --------------------------------------------------------------------------- baseline
def _train_baseline(
    env: Any, data: DatasetSplits, cfg: AgentViTConfig, device: torch.device, bar_desc: str
) -> tuple[torch.nn.Module, float]:
    """A full-patch ViT with the joint run's settings: same initialisation and data order, no agent.

    ``env`` (built without warm-up) is reset with the run's seed, which builds the ViT exactly as the
    joint run's first reset did and seeds its data stream; the loop then trains that ViT on all
    patches for ``cfg.epochs`` epochs (the joint run's warm-up epochs included) with the same Adam
    settings and the same batches (a loader started from the env's data-order state), and skips the
    scoring pass the agent needs. The time is the loop's wall time (data, forward, backward,
    optimiser), as the joint run's is that of the agent's ``learn`` loop.
    """
    from tqdm.auto import tqdm

    env.reset(seed=cfg.seed)
    vit = env.vit
    opt = torch.optim.Adam(vit.parameters(), lr=cfg.learning_rate, fused=device.type in ("cpu", "cuda"))
    generator = torch.Generator()
    generator.set_state(env.state_dict()["epoch_data_generator"])
    loader = BatchLoader(
        data.train_x,
        data.train_y,
        data,
        cfg.batch_size,
        shuffle=True,
        augment=cfg.augment,
        drop_last=True,
        device=device,
        generator=generator,
    )
    bar = tqdm(total=cfg.epochs * len(loader), desc=bar_desc, disable=not cfg.progress)
    vit.train()
    synchronize(device)
    start = time.perf_counter()
    try:
        for _ in range(cfg.epochs):
            for xb, yb in loader:
                loss = F.cross_entropy(vit(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        synchronize(device)
    finally:
        bar.close()
    return vit, time.perf_counter() - start


# --------------------------------------------------------------------------- figure
def _patches_figure(
    path: Path,
    env: Any,
    data: DatasetSplits,
    agent: Any,
    k: int,
    cfg: AgentViTConfig,
    device: torch.device,
) -> None:
    """Save example test images with the agent's kept patches (row 2) and attention top-k (row 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from keepgym.models.vit import select_topk

    vit = env.vit
    x_u8, y = data.split("test")
    x_u8, y = x_u8[: cfg.batch_size], y[: cfg.batch_size]
    xb = data.normalize(x_u8.to(device))
    vit.eval()
    with torch.no_grad():
        scores = vit.patch_scores(xb, layer=cfg.state_layer, mode=cfg.state)
        keep_agent = env.choose_patches(agent, xb)
        keep_top = select_topk(scores, max(1, min(k, vit.num_patches)))
        rows_keep = []
        for keep in (keep_agent, keep_top):
            if keep is None:
                keep = torch.arange(vit.num_patches, device=xb.device)
            if keep.dim() == 1:
                keep = keep.unsqueeze(0).expand(len(xb), -1)
            rows_keep.append(keep.cpu())
        preds = [vit(xb, keep=rk.to(xb.device)).argmax(1).cpu() for rk in rows_keep]
    vit.train()
    m = min(cfg.examples, len(xb))
    g, p = vit.grid, vit.patch_size
    fig, axes = plt.subplots(3, m, figsize=(1.6 * m, 5.2), squeeze=False)
    titles = ("image", "agent keeps", f"attention top-{k}")
    for j in range(m):
        img = x_u8[j].permute(1, 2, 0).numpy().astype(np.float32) / 255.0
        img = img[..., 0] if img.shape[-1] == 1 else img
        cmap = "gray" if img.ndim == 2 else None
        for r in range(3):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
                ax.set_title(f"label {int(y[j])}", fontsize=8)
                continue
            kept = set(rows_keep[r - 1][j].tolist())
            shade = np.full((g, g), 0.25, dtype=np.float32)
            for idx in kept:
                shade[idx // g, idx % g] = 1.0
            shade = np.kron(shade, np.ones((p, p), dtype=np.float32))
            shown = img * shade if img.ndim == 2 else img * shade[..., None]
            ax.imshow(shown, cmap=cmap, vmin=0, vmax=1)
            for idx in kept:
                ax.add_patch(
                    Rectangle(
                        ((idx % g) * p - 0.5, (idx // g) * p - 0.5),
                        p,
                        p,
                        fill=False,
                        edgecolor="lime",
                        linewidth=0.6,
                    )
                )
            ax.set_title(f"{len(kept)} kept, pred {int(preds[r - 1][j])}", fontsize=7)
        for r in range(3):
            axes[r][0].set_ylabel(titles[r], fontsize=8)
    title = f"{cfg.dataset}: kept patches (bright, green boxes) on test images"
    if cfg.action_mode == "patches":
        title += "\n(patches mode: the agent picks which patches, per image)"
    if cfg.action_mode == "ratio":
        title += "\n(ratio mode: the agent picks how many patches; which ones is attention top-k, per image)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- training
def _build_env(
    cfg: AgentViTConfig,
    data: DatasetSplits,
    device: torch.device,
    distributed: bool = False,
    warmup_epochs: int | None = None,
) -> Any:
    from keepgym.envs.patch_select_env import PatchSelectEnv

    try:
        return PatchSelectEnv(
            data=data,
            patch_size=cfg.patch_size,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            action_mode=cfg.action_mode,
            keep_ratios=cfg.keep_ratios,
            target_keep=cfg.target_keep,
            patch_weight=cfg.patch_weight,
            reward_images=cfg.reward_images,
            state=cfg.state,
            state_layer=cfg.state_layer,
            warmup_epochs=cfg.warmup_epochs if warmup_epochs is None else warmup_epochs,
            device=device,
            augment=cfg.augment,
            distributed=distributed,
            **_vit_dims(cfg.preset),
        )
    except ValueError as err:
        raise CliError(str(err)) from None


def _load_data(cfg: AgentViTConfig) -> DatasetSplits:
    try:
        return load_dataset(
            cfg.dataset,
            cfg.data_root,
            val_size=cfg.val_size,
            seed=cfg.seed,
            download=cfg.download,
            image_size=cfg.image_size,
            train_size=cfg.train_size,
            test_size=cfg.test_size,
        )
    except ValueError as err:
        raise CliError(str(err)) from None


def _rng_states(agent: Any) -> dict[str, Any]:
    # Plain values and tensors only, so state.pt loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
        "action_space": copy.deepcopy(agent.action_space.np_random.bit_generator.state),
    }


def _set_rng_states(agent: Any, states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(states["python"])
    agent.action_space.np_random.bit_generator.state = states["action_space"]


def _make_callback(
    cfg: AgentViTConfig,
    wrapper: _JointTraining,
    ckpt_dir: Path,
    clock: dict,
) -> Any:
    """Checkpoint + per-epoch validation at the first rollout start after an epoch ended.

    That point comes after the last step's transition is stored and its gradient step taken (SB3's
    ``on_step`` comes before both), so a resumed run continues from a consistent state.
    """
    from stable_baselines3.common.callbacks import BaseCallback

    class _EpochCheckpoint(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.epoch_ended = False

        def _on_step(self) -> bool:
            if np.any(self.locals.get("dones", False)):
                self.epoch_ended = True
            if cfg._stop_after_steps is not None and self.model.num_timesteps >= cfg._stop_after_steps:
                raise _Stop
            return True

        def _on_training_start(self) -> None:
            # A run resumed in the middle of an epoch (A2C's short rollouts) is not at an episode start.
            if getattr(self.model, "_last_episode_starts", None) is not None and wrapper.steps_in_epoch > 0:
                self.model._last_episode_starts = np.zeros_like(self.model._last_episode_starts)

        def _on_rollout_start(self) -> None:
            if not self.epoch_ended:
                return
            self.epoch_ended = False
            start = time.perf_counter()
            epoch = _completed_epochs(wrapper)
            if is_main_process():  # every rank holds the same ViT; rank 0 scores and saves it
                _log_val(self.model, wrapper, epoch)
                _save_checkpoint(cfg, ckpt_dir, self.model, wrapper, clock, epoch, finished=False)
            clock["excluded"] += time.perf_counter() - start
            if cfg._stop_after_epoch is not None and epoch >= cfg._stop_after_epoch:
                raise _Stop

    return _EpochCheckpoint()


def _completed_epochs(wrapper: _JointTraining) -> int:
    core = wrapper.core
    return core.epoch if wrapper.steps_in_epoch < core.steps_per_epoch else core.epoch + 1


def _log_val(agent: Any, wrapper: _JointTraining, epoch: int) -> None:
    core = wrapper.core
    full = core.evaluate(None, "val")
    chosen = core.evaluate_policy(agent, "val")
    agent.logger.record("eval/val_accuracy_full", full["accuracy"])
    agent.logger.record("eval/val_accuracy_agent", chosen["accuracy"])
    agent.logger.record("eval/val_kept_patches", chosen["kept_patches"])
    agent.logger.record("eval/epoch", epoch)
    agent.logger.dump(step=agent.num_timesteps)


def _save_checkpoint(
    cfg: AgentViTConfig,
    ckpt_dir: Path,
    agent: Any,
    wrapper: _JointTraining,
    clock: dict,
    epoch: int,
    finished: bool,
) -> Path:
    """One atomic folder ``ckpt_dir/NNNN`` (agent, replay buffer, env + RNG state); the newest kept."""
    seconds = clock["before"] + (time.perf_counter() - clock["start"]) - clock["excluded"]
    state = {
        "env": wrapper.state(),
        "rng": _rng_states(agent),
        "epoch": epoch,
        "num_timesteps": int(agent.num_timesteps),
        "train_seconds": seconds,
        "finished": finished,
    }

    def write(tmp: Path) -> None:
        agent.save(tmp / "agent.zip")
        if hasattr(agent, "replay_buffer"):  # arrays in an .npz: SB3's own method would pickle the buffer
            save_replay_buffer(agent, tmp / "replay_buffer.npz")
        if cfg._stop_in_checkpoint is not None and epoch == cfg._stop_in_checkpoint:
            raise _Stop  # tests: a kill while the folder is being written
        atomic_torch_save(state, tmp / _STATE_FILE)

    final = write_dir_atomically(ckpt_dir / f"{epoch:04d}", write)
    retain_checkpoints(ckpt_dir, cfg.keep_checkpoints, _STATE_FILE)
    return final


def _check_resume(out: Path, cfg: AgentViTConfig) -> None:
    path = out / "config.json"
    if not path.exists():
        raise CliError(f"--resume: {out} has no config.json")
    saved = json.loads(path.read_text())
    ignore = {"resume", "force", "progress", "device", "num_threads", "out", "keep_checkpoints"}
    current = asdict(cfg)
    diff = [
        k
        for k, v in saved.items()
        if k not in ignore and not k.startswith("_") and k in current and _jsonish(current[k]) != v
    ]
    if diff:
        raise CliError(f"--resume: settings differ from the saved run in {', '.join(sorted(diff))}")


def _jsonish(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def train_agentvit(cfg: AgentViTConfig, data: DatasetSplits | None = None) -> dict[str, Any] | None:
    """Run joint ViT + agent training, the optional baseline and the final four-way test report.

    Args:
        cfg: The run's settings.
        data: Ready data instead of loading ``cfg.dataset`` (scripts with their own images).

    Returns:
        The summary (also written to ``OUT/summary.json``); None if stopped by a test stop point.

    Raises:
        CliError: A bad setting, an occupied run folder, or a resume that does not match.
    """
    validate(cfg)
    if cfg.out is None:
        cfg.out = default_out(cfg)
    dist_info = init_distributed(resolve_device(cfg.device))
    device = torch.device(dist_info.device)
    previous_threads = torch.get_num_threads()
    try:
        out = main_first(lambda: _prepare_out(cfg))  # rank 0 makes the folder; a refusal ends every rank
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        summary = _train(cfg, out, device, dist_info, data)  # None on ranks other than 0
        return main_first(lambda: summary)
    finally:
        torch.set_num_threads(previous_threads)
        cleanup_distributed()


def _prepare_out(cfg: AgentViTConfig) -> Path:
    out = prepare_run_dir(cfg.out, force=cfg.force, resume=cfg.resume)
    if cfg.resume:
        _check_resume(out, cfg)
    remove_partial_checkpoints((out, out / "checkpoint"))  # what a kill mid-write left behind
    write_json(out / "config.json", cfg)
    return out


def _train(
    cfg: AgentViTConfig,
    out: Path,
    device: torch.device,
    dist_info: DistributedInfo | None = None,
    data: DatasetSplits | None = None,
) -> dict[str, Any] | None:
    from tqdm.auto import tqdm

    from keepgym.agents.callbacks import EnvInfoCallback, PatchEpochCallback
    from keepgym.models import load_model_with_extra, save_model

    dist_info = dist_info or DistributedInfo(device=str(device))
    main = dist_info.is_main
    seed_everything(cfg.seed)
    data = data if data is not None else _load_data(cfg)
    env = _build_env(cfg, data, device, dist_info.enabled)
    steps_per_epoch = env.steps_per_epoch
    total_vit_steps = cfg.epochs * steps_per_epoch
    agent_steps = (cfg.epochs - cfg.warmup_epochs) * steps_per_epoch
    ckpt_dir = out / "checkpoint"
    state, ckpt = None, None
    complete = complete_checkpoints(ckpt_dir, _STATE_FILE) if cfg.resume else []
    if complete:
        ckpt = complete[-1]
        state = torch.load(ckpt / _STATE_FILE, map_location=device, weights_only=True)
        logger.info("resuming %s after epoch %d", out, state["epoch"])

    bar = tqdm(
        total=total_vit_steps, desc=f"agentvit {cfg.dataset} {cfg.algo}", disable=not (cfg.progress and main)
    )

    def on_step(info: dict) -> None:
        bar.update(1)
        bar.set_postfix(epoch=info["epoch"], loss=f"{info['loss']:.3f}", kept=info["kept"], refresh=False)

    wrapper = _JointTraining(env, on_step=on_step)
    clock = {"before": 0.0, "excluded": 0.0, "start": time.perf_counter()}
    if state is None:
        agent = _make_agent(cfg, wrapper, steps_per_epoch, str(out / "tb") if main else None)
    else:
        assert ckpt is not None
        agent = _load_agent(cfg.algo, ckpt / "agent.zip", env=wrapper)
        if hasattr(agent, "replay_buffer") and (ckpt / "replay_buffer.npz").exists():
            load_replay_buffer(agent, ckpt / "replay_buffer.npz")
        agent.tensorboard_log = str(out / "tb") if main else None
        _set_rng_states(agent, state["rng"])
        wrapper.restore_on_next_reset(state["env"])
        agent._last_obs = None  # make learn() reset the env, i.e. restore it
        clock["before"] = state["train_seconds"]
        bar.update(cfg.warmup_epochs * steps_per_epoch + int(state["num_timesteps"]))
    finished = state is not None and state["finished"]
    callbacks = [
        EnvInfoCallback(config={k: v for k, v in asdict(cfg).items() if not k.startswith("_")}),
        PatchEpochCallback(evaluate=False),  # epoch/* tags + kept-patch grid; eval/* come from _log_val
        _make_callback(cfg, wrapper, ckpt_dir, clock),
    ]
    try:
        if not finished:
            clock["start"] = time.perf_counter()
            remaining = agent_steps - (agent.num_timesteps if state is not None else 0)
            agent.learn(
                remaining,
                callback=callbacks,
                tb_log_name=_TB_NAME,
                reset_num_timesteps=state is None,
                log_interval=1,
            )
            if not main:
                return None  # rank 0 saves, scores and reports (other ranks get its summary)
            ckpt = _save_checkpoint(cfg, ckpt_dir, agent, wrapper, clock, cfg.epochs, finished=True)
            state = torch.load(ckpt / _STATE_FILE, map_location=device, weights_only=True)
    except _Stop:
        return None
    finally:
        bar.close()
    if not main:
        return None
    train_seconds = float(state["train_seconds"])
    if finished:  # resumed after training had ended: rebuild the trained ViT from the final checkpoint
        wrapper.restore_on_next_reset(state["env"])
        wrapper.reset()
    agent.save(out / "agent.zip")
    vit = env.vit
    selection = {
        "action_mode": cfg.action_mode,
        "keep_ratios": list(cfg.keep_ratios),
        "keep_counts": list(env.keep_counts),
        "target_keep": env.target_keep,
        "state": cfg.state,
        "state_layer": cfg.state_layer,
        "batch_size": cfg.batch_size,
        "algo": cfg.algo,
        "num_patches": env.num_patches,
    }
    data_settings = {
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "val_size": cfg.val_size,
        "train_size": cfg.train_size,
        "test_size": cfg.test_size,
        "image_size": cfg.image_size,
    }
    save_model(vit, out / "vit.pt", agentvit=selection, data=data_settings, train_seconds=train_seconds)

    base_env, base_seconds = None, 0.0
    if cfg.baseline:
        path, info_path = out / "baseline_vit.pt", out / "baseline.json"
        base_env = _build_env(cfg, data, device, warmup_epochs=0)
        if cfg.resume and path.exists() and info_path.exists():
            base_env.reset(seed=cfg.seed)
            base_env.vit.load_state_dict(load_model_with_extra(path)[0].state_dict())
            base_seconds = json.loads(info_path.read_text())["train_seconds"]
        else:
            _, base_seconds = _train_baseline(base_env, data, cfg, device, f"baseline {cfg.dataset}")
            save_model(base_env.vit, path, data=data_settings, train_seconds=base_seconds)
            write_json(info_path, {"train_seconds": base_seconds})

    summary = _final_report(cfg, env, agent, base_env, base_seconds)
    summary["agent"]["train_seconds"] = train_seconds
    if cfg.baseline:
        summary["speedup_train"] = summary["full"]["train_seconds"] / max(train_seconds, 1e-12)
    summary.update(
        dataset=cfg.dataset,
        algo=cfg.algo,
        action_mode=cfg.action_mode,
        preset=cfg.preset,
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        seed=cfg.seed,
        num_patches=env.num_patches,
        target_keep=env.target_keep,
        steps_per_epoch=steps_per_epoch,
        train_images=len(data.train_y),
        device=str(device),
        threads=torch.get_num_threads(),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    if dist_info.enabled:
        summary["world_size"] = dist_info.world_size
    k = max(1, int(round(summary["agent"]["kept_patches"])))
    try:
        _patches_figure(out / "patches.png", env, data, agent, k, cfg, device)
    except Exception as err:  # noqa: BLE001 - a missing figure must not lose the run's results
        logger.warning("could not draw patches.png: %s", err)
    write_json(out / "summary.json", summary)
    writer_dir = out / "tb" / f"{_TB_NAME}_final"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(writer_dir)) as writer:
        for block in ("full", "agent", "random", "topk", "joint_full"):
            writer.add_scalar(f"final/test_accuracy_{block}", summary[block]["test_accuracy"], cfg.epochs)
    return summary


def _final_report(
    cfg: AgentViTConfig, env: Any, agent: Any, base_env: Any | None, base_seconds: float
) -> dict[str, Any]:
    """The four (five) ways on the test split, side by side, plus validation accuracies (env evaluation)."""
    from keepgym.models.vit import select_random_k, select_topk

    bs = cfg.batch_size
    # k = the agent's own mean number of kept patches on the test split.
    agent_test = env.evaluate_policy(agent, "test")
    k = max(1, min(env.num_patches, int(round(agent_test["kept_patches"]))))
    gen_device = env.device if env.device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=gen_device)

    def random_k(split: str) -> dict[str, float]:
        gen.manual_seed(cfg.seed + 12345)  # the same random patches in every round
        return env.evaluate(lambda s: select_random_k(s, k, gen), split, bs, needs_scores=False)

    runs: dict[str, Callable[[], dict[str, float]]] = {
        "joint_full": lambda: env.evaluate(None, "test", bs),
        "agent": lambda: env.evaluate_policy(agent, "test"),
        "random": lambda: random_k("test"),
        "topk": lambda: env.evaluate(lambda s: select_topk(s, k), "test", bs),
    }
    if base_env is not None:
        runs["full"] = lambda: base_env.evaluate(None, "test", bs)
    raw = _side_by_side(runs, cfg.speed_rounds)
    results = {name: _block(r, score_macs=name != "random") for name, r in raw.items()}
    if base_env is None:
        results["full"] = dict(results["joint_full"])
    who = "the agent per image" if cfg.action_mode == "patches" else "the agent per batch"
    descriptions = {
        "full": "baseline ViT (trained on all patches, no agent), all patches"
        if base_env is not None
        else "joint ViT, all patches (no --baseline)",
        "joint_full": "joint ViT, all patches",
        "agent": f"joint ViT, patches chosen by {who}",
        "random": f"joint ViT, {k} random patches per image",
        "topk": f"joint ViT, the {k} most attended patches per image (block {cfg.state_layer})",
    }
    summary: dict[str, Any] = {}
    for name in BLOCKS:
        r = results[name]
        summary[name] = {
            "vit": descriptions[name],
            "test_accuracy": r["accuracy"],
            "macs_per_image": r["macs_per_image"],
            "forward_macs_per_image": r["forward_macs_per_image"],
            "score_macs_per_image": r["score_macs_per_image"],
            "images_per_second": r["images_per_second"],
            "kept_patches": r["kept_patches"],
        }
    summary["agent"]["val_accuracy"] = env.evaluate_policy(agent, "val")["accuracy"]
    summary["joint_full"]["val_accuracy"] = env.evaluate(None, "val", bs)["accuracy"]
    summary["topk"]["val_accuracy"] = env.evaluate(lambda s: select_topk(s, k), "val", bs)["accuracy"]
    summary["random"]["val_accuracy"] = random_k("val")["accuracy"]
    if base_env is not None:
        summary["full"]["val_accuracy"] = base_env.evaluate(None, "val", bs)["accuracy"]
        summary["full"]["train_seconds"] = base_seconds
    else:
        summary["full"]["val_accuracy"] = summary["joint_full"]["val_accuracy"]
    summary["k"] = k
    return summary


def _format(summary: dict[str, Any]) -> str:
    lines = [f"{'block':<11} {'test acc':>8} {'kept':>6} {'MMACs/img':>10} {'img/s':>9}  vit"]
    for name in BLOCKS:
        b = summary[name]
        lines.append(
            f"{name:<11} {100 * b['test_accuracy']:7.2f}% {b['kept_patches']:6.1f} "
            f"{b['macs_per_image'] / 1e6:10.3f} {b['images_per_second']:9.1f}  {b['vit']}"
        )
    line = f"train seconds: agentvit {summary['agent']['train_seconds']:.1f}"
    if "train_seconds" in summary["full"]:
        line += (
            f", full-patch baseline {summary['full']['train_seconds']:.1f} (x{summary['speedup_train']:.2f})"
        )
    lines.append(line)
    return "\n".join(lines)


def run(cfg: AgentViTConfig) -> dict[str, Any]:
    """``keepgym agentvit``: train, report, print a table; returns the summary."""
    summary = train_agentvit(cfg)
    if summary is None:
        return {}
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return summary
    print(_format(summary))
    print(f"run folder: {cfg.out}")
    return summary


# --------------------------------------------------------------------------- evaluate --vit --agent
def evaluate_agentvit(cfg: Any) -> dict[str, Any]:
    """``keepgym evaluate --vit VIT --agent AGENT``: the agent selects patches at inference time.

    The data split is rebuilt from the settings stored in ``vit.pt`` (seed, sizes) so it is the one the
    ViT was trained and validated on; ``--dataset`` must name the same dataset.

    Args:
        cfg: ``keepgym.experiments.evaluate.EvaluateConfig`` (``vit``, ``agent``, ``dataset``, ``split``,
            ``batch_size``, ``device``, ``out``, ``data_root``).

    Returns:
        ``{"agent": {...}, "full": {...}, ...}`` with accuracy, MACs, images/s and kept patches.
    """
    from keepgym.models import load_model_with_extra

    if cfg.agent is None:
        raise CliError("--vit needs --agent AGENT.zip (saved by `keepgym agentvit`)")
    if cfg.checkpoint is not None:
        raise CliError("give either --checkpoint (a CNN/ViT alone) or --vit with --agent, not both")
    for flag, path in (("--vit", cfg.vit), ("--agent", cfg.agent)):
        if not Path(path).is_file():
            raise CliError(f"{flag} {path}: no such file")
    if cfg.dataset is None or cfg.dataset not in DATASETS:
        raise CliError(f"--dataset is required; valid datasets: {', '.join(DATASETS)}")
    if cfg.split not in ("test", "val", "train"):
        raise CliError(f"unknown split {cfg.split!r}; valid splits: test, val, train")
    device = torch.device(resolve_device(cfg.device))
    vit, extra = load_model_with_extra(cfg.vit, map_location="cpu")
    sel, dset = extra.get("agentvit"), extra.get("data", {})
    if sel is None or not hasattr(vit, "patch_scores"):
        raise CliError(
            f"--vit {cfg.vit}: not a ViT saved by `keepgym agentvit` (no patch-selection settings)"
        )
    if dset.get("dataset", cfg.dataset) != cfg.dataset:
        raise CliError(f"--vit {cfg.vit} was trained on {dset['dataset']}, not {cfg.dataset}")
    try:
        agent = _load_agent(sel["algo"], cfg.agent)
    except Exception as err:  # noqa: BLE001 - any unreadable zip is a user error here
        raise CliError(
            f"--agent {cfg.agent}: not a {sel['algo']} agent zip: {str(err).splitlines()[0][:200]}"
        ) from None
    data = load_dataset(
        cfg.dataset,
        cfg.data_root,
        val_size=dset.get("val_size", cfg.val_size),
        seed=dset.get("seed", cfg.seed),
        image_size=dset.get("image_size"),
        train_size=dset.get("train_size"),
        test_size=dset.get("test_size"),
    )
    from keepgym.envs.patch_select_env import PatchSelectEnv

    # The env the agent acted in, around the saved ViT: its own evaluation applies the agent's choices.
    env = PatchSelectEnv(
        data=data,
        model=vit,
        batch_size=min(sel["batch_size"], len(data.train_y)),
        action_mode=sel["action_mode"],
        keep_ratios=sel["keep_ratios"],
        target_keep=sel.get("target_keep"),
        state=sel["state"],
        state_layer=sel["state_layer"],
        warmup_epochs=0,
        device=device,
    )
    if agent.observation_space != env.observation_space or agent.action_space != env.action_space:
        raise CliError(
            f"--agent {cfg.agent} does not fit this ViT: it observes {agent.observation_space.shape} "
            f"and acts in {agent.action_space}; the ViT needs {env.observation_space.shape} and {env.action_space}"
        )
    bs = sel["batch_size"]
    raw = _side_by_side(
        {
            "full": lambda: env.evaluate(None, cfg.split, bs),
            "agent": lambda: env.evaluate_policy(agent, cfg.split, batch_size=bs),
        },
        rounds=2,
    )
    results = {name: _block(r) for name, r in raw.items()}
    print(f"{'patches':<8} {cfg.split + ' acc':>9} {'kept':>6} {'MMACs/img':>10} {'img/s':>9}")
    for name in ("full", "agent"):
        r = results[name]
        print(
            f"{name:<8} {100 * r['accuracy']:8.2f}% {r['kept_patches']:6.1f} "
            f"{r['macs_per_image'] / 1e6:10.3f} {r['images_per_second']:9.1f}"
        )
    result = {
        "vit": str(cfg.vit),
        "agent_path": str(cfg.agent),
        "dataset": cfg.dataset,
        "split": cfg.split,
        "device": str(device),
        **results,
    }
    if cfg.out:
        write_json(cfg.out, result)
    return result


# --------------------------------------------------------------------------- benchmark
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
        **_vit_dims(preset),
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
