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

CIFAR-10 on a 2-core CPU, the reduced preset the README reports (``vit_medium``: dim 128, depth 6, 4 heads
of 32, 64 patches of 4x4, 30 kept; 16,000 training images of which 1,600 held out for validation; 8 epochs;
no warm-up; 3 seeds in parallel, one thread each, about 26 minutes in all on the shared machine)::

    keepgym agentvit --dataset folder --data-root ../shared/data/cifar10-jpeg.tar.gz --action-mode patches \\
        --preset vit_medium --train-size 16000 --test-size 2000 --epochs 8 --warmup-epochs 0 --baseline \\
        --num-threads 1 --seed 0

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
``env/*`` from :class:`keepgym.agents.callbacks.EnvInfoCallback`, ``epoch/*`` from ``PatchEpochCallback``,
``eval/*`` for every epoch, the last one included) and ``checkpoint/NNNN/``
(:class:`keepgym.agents.callbacks.EpochCheckpointCallback`: one atomic folder per epoch, the newest
``--keep-checkpoints`` kept, with the env's ``state_dict`` (ViT, optimiser, data order, RNG), the agent,
its replay buffer and the process RNGs), from which ``--resume`` (``load_epoch_checkpoint``) continues
exactly: a kill at any instant resumes to the uninterrupted result.

This module only parses, builds and reports: the settings and their checks are in
:mod:`keepgym.experiments.agentvit_config`, the agents in :mod:`keepgym.agents.patch_agents`, the
full-patch baseline and side-by-side timing in :mod:`keepgym.envs.vit_training`, the report, figure and
``keepgym evaluate --vit`` in :mod:`keepgym.experiments.agentvit_report`, and ``keepgym bench agentvit``
in :mod:`keepgym.experiments.agentvit_bench`.

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

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.common.callbacks import BaseCallback

from keepgym.agents.callbacks import (
    CHECKPOINT_STATE_FILE,
    EnvInfoCallback,
    EpochCheckpointCallback,
    NamedProgressBar,
    PatchEpochCallback,
    load_epoch_checkpoint,
)
from keepgym.agents.patch_agents import agent_class, make_patch_agent
from keepgym.envs.data import DatasetSplits, load_dataset
from keepgym.envs.distributed import DistributedInfo, cleanup_distributed, init_distributed, main_first
from keepgym.envs.vit_training import train_all_patches
from keepgym.experiments.agentvit_bench import benchmark_agentvit
from keepgym.experiments.agentvit_config import AgentViTConfig, check_resume, default_out, validate
from keepgym.experiments.agentvit_report import BLOCKS, evaluate_agentvit, final_report, format_summary, patches_figure
from keepgym.experiments.common import CliError, prepare_run_dir, resolve_device, seed_everything, write_json
from keepgym.models.checkpoints import complete_checkpoints, remove_partial_checkpoints
from keepgym.models.vit import VIT_PRESETS

__all__ = [
    "AgentViTConfig",
    "Config",
    "COMMAND",
    "DESCRIPTION",
    "benchmark_agentvit",
    "default_out",
    "evaluate_agentvit",
    "run",
    "train_agentvit",
    "validate",
]

logger = logging.getLogger(__name__)

COMMAND = "agentvit"
DESCRIPTION = (
    "Train a ViT jointly with an RL agent that picks its patches (AgentViT); compare with heuristics. "
    "CIFAR-10 preset for a 2-core CPU (reduced: vit_medium = dim 128, depth 6, 4 heads; 16,000 training "
    "images; 8 epochs; README): --dataset folder --data-root DIR --action-mode patches --preset vit_medium "
    "--train-size 16000 --test-size 2000 --epochs 8 --warmup-epochs 0 --baseline --num-threads 1."
)
Config = AgentViTConfig
_TB_NAME = "agentvit"


class _Stop(Exception):
    """Raised by the test stop points to simulate an interruption."""


class _TestStops(BaseCallback):
    """Tests only: stop (as if killed) after N agent steps, or right after the checkpoint of an epoch."""

    def __init__(self, cfg: AgentViTConfig, checkpoints: EpochCheckpointCallback) -> None:
        super().__init__()
        self.cfg, self.checkpoints = cfg, checkpoints

    def _on_step(self) -> bool:
        if self.cfg._stop_after_steps is not None and self.model.num_timesteps >= self.cfg._stop_after_steps:
            raise _Stop
        return True

    def _on_rollout_start(self) -> None:  # after the checkpoint callback's (callbacks run in order)
        last, stop = self.checkpoints.last_epoch, self.cfg._stop_after_epoch
        if stop is not None and last is not None and last >= stop:
            raise _Stop


def _build_env(
    cfg: AgentViTConfig, data: DatasetSplits, device: torch.device, distributed: bool = False, warmup: bool = True
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
            warmup_epochs=cfg.warmup_epochs if warmup else 0,
            device=device,
            augment=cfg.augment,
            distributed=distributed,
            **VIT_PRESETS[cfg.preset],
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
        check_resume(out, cfg)
    remove_partial_checkpoints((out, out / "checkpoint"))  # what a kill mid-write left behind
    write_json(out / "config.json", cfg)
    return out


def _train(
    cfg: AgentViTConfig, out: Path, device: torch.device, dist_info: DistributedInfo, data: DatasetSplits | None
) -> dict[str, Any] | None:
    from keepgym.models import load_model_with_extra, save_model

    main = dist_info.is_main
    seed_everything(cfg.seed)
    data = data if data is not None else _load_data(cfg)
    env = _build_env(cfg, data, device, dist_info.enabled)
    agent_steps = (cfg.epochs - cfg.warmup_epochs) * env.steps_per_epoch
    ckpt_dir = out / "checkpoint"
    complete = complete_checkpoints(ckpt_dir, CHECKPOINT_STATE_FILE) if cfg.resume else []
    tb = str(out / "tb") if main else None
    state: dict[str, Any] | None = None
    if complete:
        agent, state = load_epoch_checkpoint(complete[-1], agent_class(cfg.algo), env, map_location=device)
        agent.tensorboard_log = tb
        logger.info("resuming %s after epoch %d", out, state["epoch"])
    else:
        agent = make_patch_agent(
            cfg.algo, env, env.steps_per_epoch, cfg.action_mode, cfg.agent_preset, seed=cfg.seed, tensorboard_log=tb
        )

    def stop_in_checkpoint(tmp: Path, epoch: int) -> None:
        if epoch == cfg._stop_in_checkpoint:
            raise _Stop  # tests: a kill while the folder is being written

    checkpoints = EpochCheckpointCallback(
        ckpt_dir,
        keep_last=cfg.keep_checkpoints,
        save=main,  # every rank holds the same ViT; rank 0 scores and saves it
        train_seconds=0.0 if state is None else float(state["train_seconds"]),
        write_extra=stop_in_checkpoint if cfg._stop_in_checkpoint is not None else None,
    )
    callbacks = [
        EnvInfoCallback(config={k: v for k, v in asdict(cfg).items() if not k.startswith("_")}),
        PatchEpochCallback(evaluate=False),  # epoch/* tags + kept-patch grid; eval/* come from `checkpoints`
        checkpoints,
        _TestStops(cfg, checkpoints),
    ]
    if cfg.progress and main:
        callbacks.append(NamedProgressBar(f"agentvit {cfg.dataset} {cfg.algo}", unit="step"))
    if state is None or not state["finished"]:
        try:
            agent.learn(
                agent_steps - agent.num_timesteps,
                callback=callbacks,
                tb_log_name=_TB_NAME,
                reset_num_timesteps=state is None,
                log_interval=1,
            )
        except _Stop:
            return None
        if not main:
            return None  # rank 0 saves, scores and reports (other ranks get its summary)
        assert checkpoints.last_checkpoint is not None
        state = torch.load(checkpoints.last_checkpoint / CHECKPOINT_STATE_FILE, map_location=device, weights_only=True)
    else:  # resumed after training had ended: rebuild the trained ViT from the final checkpoint
        env.load_state_dict(state["env"])
    if not main:
        return None
    train_seconds = float(state["train_seconds"])
    agent.save(out / "agent.zip")
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
    save_model(env.vit, out / "vit.pt", agentvit=selection, data=data_settings, train_seconds=train_seconds)

    base_env, base_seconds = None, 0.0
    if cfg.baseline:
        path, info_path = out / "baseline_vit.pt", out / "baseline.json"
        base_env = _build_env(cfg, data, device, warmup=False)
        if cfg.resume and path.exists() and info_path.exists():
            base_env.reset(seed=cfg.seed)
            base_env.vit.load_state_dict(load_model_with_extra(path)[0].state_dict())
            base_seconds = json.loads(info_path.read_text())["train_seconds"]
        else:
            base_seconds = train_all_patches(
                base_env, cfg.epochs, cfg.seed, progress=cfg.progress, desc=f"baseline {cfg.dataset}"
            )
            save_model(base_env.vit, path, data=data_settings, train_seconds=base_seconds)
            write_json(info_path, {"train_seconds": base_seconds})

    summary = final_report(env, agent, base_env, base_seconds, seed=cfg.seed, speed_rounds=cfg.speed_rounds)
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
        steps_per_epoch=env.steps_per_epoch,
        train_images=len(data.train_y),
        device=str(device),
        threads=torch.get_num_threads(),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    if dist_info.enabled:
        summary["world_size"] = dist_info.world_size
    k = max(1, int(round(summary["agent"]["kept_patches"])))
    try:
        patches_figure(out / "patches.png", env, agent, k, cfg.examples, _figure_title(cfg))
    except Exception as err:  # noqa: BLE001 - a missing figure must not lose the run's results
        logger.warning("could not draw patches.png: %s", err)
    write_json(out / "summary.json", summary)
    writer_dir = out / "tb" / f"{_TB_NAME}_final"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(writer_dir)) as writer:
        for block in BLOCKS:
            writer.add_scalar(f"final/test_accuracy_{block}", summary[block]["test_accuracy"], cfg.epochs)
    return summary


def _figure_title(cfg: AgentViTConfig) -> str:
    title = f"{cfg.dataset}: kept patches (bright, green boxes) on test images"
    if cfg.action_mode == "patches":
        title += "\n(patches mode: the agent picks which patches, per image)"
    if cfg.action_mode == "ratio":
        title += "\n(ratio mode: the agent picks how many patches; which ones is attention top-k, per image)"
    return title


def run(cfg: AgentViTConfig) -> dict[str, Any]:
    """``keepgym agentvit``: train, report, print a table; returns the summary."""
    summary = train_agentvit(cfg)
    if summary is None:
        return {}
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return summary
    print(format_summary(summary))
    print(f"run folder: {cfg.out}")
    return summary
