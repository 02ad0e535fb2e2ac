"""``keepgym prune``: compress a trained CNN with RL-Pruner (or a baseline) and knowledge distillation.

    keepgym train --model vgg11 --dataset digits --width-mult 0.25 --epochs 30 --out runs/base_vgg11
    keepgym prune --model vgg11 --dataset digits --width-mult 0.25 --checkpoint runs/base_vgg11/model.pt \\
        --sparsity 0.5 --stage-sparsity 0.1 --algo rlpruner --out runs/prune_vgg11

One run = one episode of :class:`keepgym.envs.prune_env.PruneEnv`: the agent commits one pruning *stage* per
timestep until the target is met. The env's recovery (:class:`keepgym.envs.recovery.KDRecovery`) distils the
pruned model for ``--finetune-epochs`` epochs after every stage (best validation epoch kept; the teacher is the
unpruned model, replaced by a pruned one that beats it on validation, ``--teacher-swap``). A final distillation of
``--final-finetune-epochs`` epochs follows (the same epoch function). The test split is scored once, at the end.
The validation split is the one recorded in the checkpoint (:mod:`keepgym.envs.splits`).

Outputs in ``--out``: ``compressed.pt`` (:func:`keepgym.models.save_model`), ``summary.json`` (``baseline`` and
``final`` blocks with val/test accuracy, MACs, params, latency at batch 1 and 64 measured side by side; ratios,
sparsity, widths, per-stage history, candidate evaluations, wall time), ``policy.png``, ``config.json``, ``tb/``;
``stages/NNN/`` after every stage (:class:`keepgym.agents.callbacks.StageCheckpointCallback`: the env's
``state_dict`` with the recovery and its teacher, ``model.pt``, ``agent.zip``; nothing is unpickled), of which
the last ``--keep-checkpoints`` are kept, and ``search/`` and ``final_kd/``. ``--resume`` continues from the last
complete checkpoint and ends with the same compressed model and summary (timings aside) as an uninterrupted run;
``.lock`` refuses a second command on a live run folder.

Under ``torchrun --nproc-per-node N`` the distillations are data-parallel (``KDRecovery(distributed=True)``); every
rank runs the same seeded search, commits rank 0's action and checks that the widths agree after every stage;
rank 0 alone writes files and every rank returns rank 0's summary.

``--algo ppo|sac|a2c`` trains a plain Stable-Baselines3 algorithm on the same env for ``--episodes`` episodes and
keeps the best episode's model (:class:`keepgym.envs.recovery.KeepBestEpisode`); not resumable mid-way.

The same run in Python (``tests/experiments/test_prune_cli.py`` checks they agree stage by stage)::

    env = PruneEnv(..., recovery=KDRecovery(epochs=1, learning_rate=1e-3, batch_size=128, seed=0))
    RLPruner("MlpPolicy", env, seed=0).learn(env.num_stages, callback=StageCheckpointCallback("run/stages"))

:func:`compress` is the library entry point (the demo calls it); :func:`run` is the CLI's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from keepgym.agents.callbacks import EnvInfoCallback, StageCheckpointCallback, load_stage_checkpoint
from keepgym.agents.prune_agents import make_prune_agent, prune_agent_class
from keepgym.envs.distill import distill_epochs_checkpointed
from keepgym.envs.distributed import DistributedInfo, cleanup_distributed, init_distributed, main_first
from keepgym.envs.metrics import evaluate_accuracy
from keepgym.envs.recovery import KDRecovery, KeepBestEpisode
from keepgym.experiments.common import (
    CliError,
    atomic_torch_save,
    load_state,
    prepare_run_dir,
    release_run_dir,
    resolve_device,
    run_name,
    seed_everything,
    write_json,
)
from keepgym.experiments.prune_config import (
    ALGOS,
    SB3_ALGOS,
    STAGED_ALGOS,
    TIMING_KEYS,
    Config,
    PruneConfig,
    check_resume,
    env_kwargs,
    validate,
)
from keepgym.experiments.prune_report import write_report
from keepgym.models.checkpoints import (
    global_rng_state,
    remove_partial_checkpoints,
    write_dir_atomically,
)

__all__ = [
    "ALGOS",
    "COMMAND",
    "DESCRIPTION",
    "SB3_ALGOS",
    "STAGED_ALGOS",
    "TIMING_KEYS",
    "Config",
    "PruneConfig",
    "compress",
    "make_env",
    "run",
    "validate",
]

logger = logging.getLogger(__name__)

COMMAND = "prune"
DESCRIPTION = "Compress a trained CNN with RL-Pruner (or a baseline) plus knowledge distillation."
_STATE_FILE = "state.pt"


def _after_checkpoint(stage: int) -> None:
    """Called after every complete stage checkpoint (tests replace it to simulate an interruption)."""


class _Clock:
    """Wall seconds of the run, including those spent before an interruption."""

    def __init__(self, previous: float = 0.0) -> None:
        self.previous = float(previous)
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return self.previous + time.perf_counter() - self.start


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | torch.Tensor):
        return obj.tolist()
    return str(obj)


# --------------------------------------------------------------------------------------------------
# build: env (with its recovery and evaluator) and agent
# --------------------------------------------------------------------------------------------------


def make_env(cfg: PruneConfig, device: str = "cpu", distributed: bool = False) -> gym.Env:
    """The ``PruneEnv`` of a run, with its KD recovery and candidate evaluator (user errors: :class:`CliError`)."""
    import keepgym  # noqa: F401  (registers the env ids)
    from keepgym.envs.evaluators import make_evaluator
    from keepgym.envs.prune_env import PruneEnv

    try:
        options = {"address": cfg.ray_address, "num_gpus": cfg.ray_gpus_per_worker} if cfg.backend == "ray" else {}
        workers = cfg.workers if cfg.backend != "serial" else None
        evaluator = make_evaluator(cfg.backend, workers=workers, **options)
    except (ImportError, ValueError) as err:
        raise CliError(f"--backend {cfg.backend}: {' '.join(str(err).split())}") from None
    recovery = KDRecovery(
        epochs=cfg.finetune_epochs,
        learning_rate=cfg.kd_learning_rate,
        batch_size=cfg.kd_batch_size,
        teacher_swap=cfg.teacher_swap,
        seed=cfg.seed,
        distributed=distributed,
    )
    kwargs = {**env_kwargs(cfg, device), "recovery": recovery, "evaluator": evaluator}
    try:
        if cfg.env is not None:
            return gym.make(cfg.env, disable_env_checker=True, **kwargs)
        return PruneEnv(**kwargs)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(" ".join(str(err).split())) from None
    except NotImplementedError as err:  # a layer the pruning graph cannot handle (the message names it)
        raise CliError(f"{cfg.model or cfg.env} cannot be pruned: {' '.join(str(err).split())}") from None


def _make_agent(cfg: PruneConfig, env: gym.Env, tb: str | None, num_stages: int) -> Any:
    keys = ("sample_num", "rounds_per_stage", "racing", "racing_eta", "racing_keep")
    settings = {key: getattr(cfg, key) for key in keys}
    return make_prune_agent(cfg.algo, env, num_stages=num_stages, seed=cfg.seed, tensorboard_log=tb, **settings)


# --------------------------------------------------------------------------------------------------
# the search (one committed stage per timestep), then its record
# --------------------------------------------------------------------------------------------------


def _search_staged(cfg: PruneConfig, env: gym.Env, out: Path, tb: str | None, clock: _Clock, main: bool) -> dict:
    """RL-Pruner or a baseline: checkpointed after every stage, resumable."""
    from tqdm.auto import tqdm

    raw = env.unwrapped
    num_stages = int(raw.num_stages)
    stages_dir = out / "stages"
    agent, done = None, 0
    loaded = (
        load_stage_checkpoint(
            stages_dir, env, prune_agent_class(cfg.algo), seed=cfg.seed, tensorboard_log=tb, device="cpu"
        )
        if cfg.resume
        else None
    )
    if loaded is not None:
        agent, state = loaded
        clock.previous, done = float(state["extra"]["wall"]), int(state["stage"])
        logger.info("resuming %s after stage %d of %d", out, done, num_stages)
    elif cfg.resume:
        logger.info("--resume: no complete stage in %s; starting from the beginning", stages_dir)
    if agent is None:
        agent = _make_agent(cfg, env, tb, num_stages)
    bar = tqdm(total=num_stages, initial=done, desc=f"prune {cfg.algo}", disable=not (cfg.progress and main))

    def on_checkpoint(stage: int) -> None:
        record = raw.recovery.stage_records[-1]
        bar.update(1)
        bar.set_postfix(val=f"{record['val_accuracy']:.3f}", macs=f"{record['macs_ratio']:.2f}")
        _after_checkpoint(stage)  # looked up at call time: tests replace it

    checkpoints = StageCheckpointCallback(
        stages_dir, cfg.keep_checkpoints, lambda: {"wall": clock()}, on_checkpoint, save=main
    )
    try:
        agent.learn(
            num_stages - done,
            # env/* tags, group sparsity histogram + image, config text + hparams, as for --algo ppo
            callback=[EnvInfoCallback(config=dataclasses.asdict(cfg)), checkpoints],
            reset_num_timesteps=done == 0,
            tb_log_name=cfg.algo,
        )
    finally:
        bar.close()
    history = getattr(agent, "history", [])
    return {
        "evaluations": int(sum(int(r.get("candidates", 0)) for r in history)),
        "distribution": np.asarray(agent.distribution).tolist() if cfg.algo == "rlpruner" else None,
        "widths": np.asarray(raw.group_widths).tolist(),
        "info": {},
        "collapse_stages": [list(x) for x in getattr(agent, "collapse_stages", [])],
        "model": raw.model,
    }


def _search_sb3(cfg: PruneConfig, env: gym.Env, tb: str | None, main: bool) -> dict:
    """PPO/SAC/A2C for ``--episodes`` episodes; the best episode's final model (not resumable)."""
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm.auto import tqdm

    num_stages = int(env.unwrapped.num_stages)
    keep = KeepBestEpisode(env)
    agent = _make_agent(cfg, keep, tb, num_stages)
    bar = tqdm(total=num_stages * cfg.episodes, desc=f"prune {cfg.algo}", disable=not (cfg.progress and main))

    class _Bar(BaseCallback):
        def _on_step(self) -> bool:
            bar.update(1)
            return True

    try:
        # one TensorBoard point per stage (SAC/A2C would otherwise dump only every few episodes)
        info_cb = EnvInfoCallback(config=dataclasses.asdict(cfg))
        agent.learn(num_stages * cfg.episodes, callback=[info_cb, _Bar()], tb_log_name=cfg.algo, log_interval=1)
    finally:
        bar.close()
    best = keep.best
    if best is None:
        raise RuntimeError(f"{cfg.algo} finished no episode in {num_stages * cfg.episodes} timesteps")
    return {
        "evaluations": 0,
        "distribution": None,
        "widths": best["widths"],
        "info": best["info"],
        "best_episode": best["episode"],
        "collapse_stages": [],
        "model": best["model"],
    }


def _save_search(out: Path, raw: Any, search: dict, clock: _Clock) -> None:
    """Checkpoint the end of the search: the pruned model, its teacher and the search's record."""
    from keepgym.models import save_model

    recovery = raw.recovery
    model = search.pop("model")
    search.update(
        initial_widths=np.asarray(raw.initial_group_widths).tolist(),
        stage_records=recovery.stage_records,
        teacher_swaps=recovery.teacher_swaps,
        teacher_val=recovery.teacher_val,
    )

    def write(tmp: Path) -> None:
        save_model(model, tmp / "model.pt")
        if recovery.teacher is not None and recovery.teacher is not raw.original_model:
            save_model(recovery.teacher, tmp / "teacher.pt")
        blob = json.dumps(search, default=_json_default)
        atomic_torch_save({"search_json": blob, "rng": global_rng_state(), "wall": clock()}, tmp / _STATE_FILE)

    main_first(lambda: write_dir_atomically(out / "search", write))  # the other ranks then read it


def _final_kd(cfg: PruneConfig, raw: Any, out: Path, device: str, clock: _Clock, dist: DistributedInfo):
    """The final distillation, checkpointed (and resumable) per epoch in ``out/final_kd``."""
    from keepgym.models import load_model

    data = raw.data
    student = load_model(out / "search" / "model.pt").to(device)
    teacher_path = out / "search" / "teacher.pt"
    teacher = load_model(teacher_path).to(device).eval() if teacher_path.exists() else raw.original_model
    def on_resume(state: dict) -> None:
        clock.previous = float(state["wall"])

    return distill_epochs_checkpointed(
        student,
        teacher,
        data,
        cfg.final_finetune_epochs,
        out / "final_kd",
        evaluate=lambda model: evaluate_accuracy(model, data.val_x, data.val_y, data.normalize, device=device),
        seed=cfg.seed,
        learning_rate=cfg.kd_learning_rate,
        batch_size=cfg.kd_batch_size,
        device=device,
        save=dist.is_main,
        extra_state=lambda: {"wall": clock()},
        on_resume=on_resume,
        distributed=dist.enabled,
    )


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


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


def _prepare_out(cfg: PruneConfig) -> Path:
    """Create (or reopen, with ``--resume``) the run folder and write ``config.json``."""
    out = prepare_run_dir(cfg.out, force=cfg.force, resume=cfg.resume)
    if cfg.resume:
        check_resume(out, cfg)
        remove_partial_checkpoints((out, out / "stages"))
    else:
        write_json(out / "config.json", cfg)
    return out


def _compress(cfg: PruneConfig, dist_info: DistributedInfo) -> dict[str, Any] | None:
    device, main = dist_info.device, dist_info.is_main
    if cfg.out is None:
        name = cfg.model or (cfg.env or "env").removeprefix("keepgym:")
        # rank 0 names the run (the name holds the time) and tells the others
        out_name = main_first(lambda: str(Path("runs") / run_name("prune", name, cfg.algo, f"s{cfg.seed}")))
        cfg = dataclasses.replace(cfg, out=out_name)
    clock = _Clock()
    seed_everything(cfg.seed)
    # The env first: it reads the checkpoint and the data, so a bad or foreign model file, a missing
    # dataset or a model that does not fit it is refused before a run folder exists.
    env = make_env(cfg, device, distributed=dist_info.enabled)
    out = main_first(lambda: _prepare_out(cfg))  # rank 0 makes the folder; a refusal ends every rank
    raw = env.unwrapped
    tb = str(out / "tb") if main else None  # the agents log to TensorBoard on rank 0 only
    if not (out / "search" / _STATE_FILE).exists():
        if cfg.algo in STAGED_ALGOS:
            search = _search_staged(cfg, env, out, tb, clock, main)
        else:
            search = _search_sb3(cfg, env, tb, main)
        _save_search(out, raw, search, clock)
    search_state = load_state(out / "search" / _STATE_FILE)
    search = json.loads(search_state["search_json"])
    if cfg.resume:
        clock.previous = max(clock.previous, float(search_state["wall"]))
    student, final_records = _final_kd(cfg, raw, out, device, clock, dist_info)
    if not main:  # every rank holds the same compressed model; rank 0 measures it and writes
        env.close()
        return None
    summary = write_report(cfg, raw, out, student, search, final_records, clock(), dist_info)
    env.close()
    return summary


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
