"""``keepgym train``: train a baseline classifier (SGD + cosine) and save it for pruning.

Writes ``DIR/model.pt`` (best validation epoch, :func:`keepgym.models.save_model`), ``DIR/summary.json``,
``DIR/config.json``, TensorBoard events and ``DIR/checkpoint.pt`` after every epoch, so Ctrl-C or a
kill leaves a usable model and ``--resume`` finishes the run exactly as an uninterrupted one would.

Data-parallel on N processes (DistributedDataParallel; ``gloo`` on CPU, ``nccl`` on GPU, one GPU per
process)::

    torchrun --nproc-per-node N -m keepgym train --model vgg11 --dataset cifar10 --out runs/vgg11

``--batch-size`` is the global batch, split between the ranks; rank 0 writes every output.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from keepgym.envs.data import DATASETS, load_dataset
from keepgym.envs.distributed import DistributedInfo, cleanup_distributed, init_distributed, main_first
from keepgym.envs.metrics import count_macs_params, evaluate_accuracy
from keepgym.envs.trainer import Trainer
from keepgym.experiments.common import (
    CliError,
    arg,
    atomic_torch_save,
    prepare_run_dir,
    resolve_device,
    seed_everything,
    write_json,
)

__all__ = ["TrainConfig", "run", "COMMAND", "DESCRIPTION", "Config"]

logger = logging.getLogger(__name__)

COMMAND = "train"
DESCRIPTION = "Train a baseline classifier (SGD + cosine schedule) and save it for pruning."


@dataclass
class TrainConfig:
    """Settings of one ``keepgym train`` run (saved as ``config.json``)."""

    model: str = arg(help="model name (see `keepgym train --list-models`), e.g. vgg11, resnet56")
    dataset: str = arg(help="dataset", choices=DATASETS)
    out: str = arg(help="run folder for model.pt, summary.json, config.json and TensorBoard events")
    epochs: int | None = arg(None, help="training epochs (default: 15 for digits/synthetic, 200 otherwise)")
    width_mult: float = arg(1.0, help="channel width multiplier (e.g. 0.25 for CPU-sized runs)")
    batch_size: int = arg(128, help="batch size")
    learning_rate: float = arg(0.05, help="peak SGD learning rate")
    momentum: float = arg(0.9, help="SGD momentum")
    weight_decay: float = arg(5e-4, help="SGD weight decay")
    label_smoothing: float = arg(0.0, help="cross-entropy label smoothing")
    val_size: float = arg(0.1, help="fraction of the training images held out for validation")
    train_size: int | None = arg(None, help="use at most this many training images")
    data_root: str | None = arg(None, help="folder of the torchvision datasets")
    download: bool = arg(False, help="download a missing torchvision dataset (needs internet)")
    device: str = arg("auto", help="cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)")
    amp: bool = arg(False, help="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = arg(True, help="channels_last memory format on CUDA (ignored on CPU)")
    seed: int = arg(0, help="random seed")
    force: bool = arg(False, help="overwrite an existing run folder")
    resume: bool = arg(False, help="continue the interrupted run in --out")
    progress: bool = arg(True, help="show a progress bar")


Config = TrainConfig


def default_epochs(dataset: str) -> int:
    """Epochs when ``--epochs`` is not given: small offline sets converge fast, CIFAR-size ones do not."""
    return 15 if dataset in ("digits", "synthetic") else 200


def validate(cfg: TrainConfig) -> None:
    """Check every setting before any work starts."""
    from keepgym.models import list_models

    if cfg.model not in list_models():
        raise CliError(f"unknown model {cfg.model!r}; valid models: {', '.join(list_models())}")
    finite = math.isfinite
    checks = [
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (0 < cfg.width_mult <= 64, f"--width-mult must be in (0, 64], got {cfg.width_mult}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.learning_rate > 0 and finite(cfg.learning_rate), f"--learning-rate must be > 0, got {cfg.learning_rate}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.weight_decay >= 0 and finite(cfg.weight_decay), f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (0 < cfg.val_size < 1, f"--val-size must be in (0, 1), got {cfg.val_size}"),
        (0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}"),
        (cfg.train_size is None or cfg.train_size >= 10, "--train-size must be >= 10"),
    ]
    for ok, msg in checks:
        if not ok:
            raise CliError(msg)
    if cfg.data_root is not None and not Path(cfg.data_root).is_dir() and not cfg.download:
        raise CliError(f"--data-root {cfg.data_root} is not a folder")


def run(cfg: TrainConfig) -> dict:
    """Train, checkpoint every epoch, evaluate once on the test split; returns the summary.

    Under ``torchrun`` every rank runs this function; rank 0 alone writes files.
    """
    if cfg.epochs is None:
        cfg = dataclasses.replace(cfg, epochs=default_epochs(cfg.dataset))
    validate(cfg)
    dist_info = init_distributed(resolve_device(cfg.device))
    try:
        return _run(cfg, dist_info)
    finally:
        cleanup_distributed()


def _prepare(cfg: TrainConfig) -> Path:
    # The data first (in memory, cached): a missing dataset or sizes that leave no training images
    # must fail before a run folder exists.
    try:
        load_dataset(
            cfg.dataset, cfg.data_root, val_size=cfg.val_size, seed=cfg.seed, download=cfg.download,
            train_size=cfg.train_size,
        )
    except ValueError as err:
        raise CliError(str(err)) from None
    out = prepare_run_dir(cfg.out, force=cfg.force, resume=cfg.resume)
    if cfg.resume:
        _check_resume(out, cfg)
    write_json(out / "config.json", cfg)
    return out


def _run(cfg: TrainConfig, dist_info: DistributedInfo) -> dict:
    from keepgym.models import create_model, load_model, save_model

    device, main = dist_info.device, dist_info.is_main
    if dist_info.enabled and cfg.batch_size < dist_info.world_size:
        raise CliError(f"--batch-size {cfg.batch_size} is smaller than the {dist_info.world_size} processes")
    out = main_first(lambda: _prepare(cfg))  # rank 0 makes the folder; a refusal ends every rank
    ckpt_path = out / "checkpoint.pt"
    seed_everything(cfg.seed)
    data = load_dataset(
        cfg.dataset,
        cfg.data_root,
        val_size=cfg.val_size,
        seed=cfg.seed,
        download=cfg.download,
        train_size=cfg.train_size,
    )
    model = create_model(cfg.model, num_classes=data.num_classes, width_mult=cfg.width_mult, in_chans=data.in_chans)
    trainer = Trainer(
        model,
        data,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        label_smoothing=cfg.label_smoothing,
        device=device,
        seed=cfg.seed,
        distributed=dist_info.enabled,
        amp=cfg.amp,
        channels_last=cfg.channels_last,
    )
    best = {"val_accuracy": -1.0, "epoch": 0}
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        trainer.load_state_dict(state["trainer"])
        best = dict(state["best"])
        logger.info("resuming %s after epoch %d", out, trainer.epoch)
    # every rank trains (the epoch statistics are reduced, so all see the same); rank 0 writes
    writer = SummaryWriter(str(out)) if main else None
    if writer is not None and trainer.epoch == 0:
        writer.add_text("config", _config_markdown(cfg))
    show = cfg.progress and main
    bar = tqdm(total=cfg.epochs, initial=trainer.epoch, desc=f"train {cfg.model}", disable=not show)
    try:
        while trainer.epoch < cfg.epochs:
            stats = trainer.train_epoch()
            if stats.val_accuracy > best["val_accuracy"]:
                best = {"val_accuracy": stats.val_accuracy, "epoch": stats.epoch}
                if main:
                    save_model(trainer.model, out / "model.pt", dataset=cfg.dataset, val_accuracy=stats.val_accuracy)
            if writer is not None:
                for key in ("train_loss", "train_accuracy", "val_accuracy", "learning_rate"):
                    writer.add_scalar(f"train/{key}", getattr(stats, key), stats.epoch)
                atomic_torch_save({"trainer": trainer.state_dict(), "best": best}, ckpt_path)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.train_loss:.3f}", val=f"{stats.val_accuracy:.3f}")
    finally:
        bar.close()
        if writer is not None:
            writer.flush()

    def finish() -> dict:
        model = load_model(out / "model.pt").to(device)
        channels, size = data.in_chans, data.image_size
        macs, params = count_macs_params(model, (1, channels, size, size))
        test_acc = evaluate_accuracy(model, data.test_x, data.test_y, data.normalize, device=device)
        summary = {
            "model": cfg.model,
            "dataset": cfg.dataset,
            "width_mult": cfg.width_mult,
            "epochs": cfg.epochs,
            "best_epoch": best["epoch"],
            "val_accuracy": best["val_accuracy"],
            "test_accuracy": test_acc,
            "macs": macs,
            "params": params,
            "train_seconds": trainer.train_seconds,
            "divergence_events": trainer.divergence_events,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if dist_info.enabled:
            summary["world_size"] = dist_info.world_size
        writer.add_scalar("final/test_accuracy", summary["test_accuracy"], cfg.epochs)
        writer.close()
        write_json(out / "summary.json", summary)
        return summary

    return main_first(finish)  # the other ranks get rank 0's summary


def _check_resume(out: Path, cfg: TrainConfig) -> None:
    import json

    path = out / "config.json"
    if not path.exists():
        raise CliError(f"--resume: {out} has no config.json")
    saved = json.loads(path.read_text())
    ignore = {"resume", "force", "progress", "device"}
    diff = [k for k, v in saved.items() if k not in ignore and getattr(cfg, k, v) != v]
    if diff:
        raise CliError(f"--resume: settings differ from the saved run in {', '.join(sorted(diff))}")


def _config_markdown(cfg: object) -> str:
    from dataclasses import asdict

    rows = "\n".join(f"| {k} | {v} |" for k, v in asdict(cfg).items())
    return "| setting | value |\n|---|---|\n" + rows
