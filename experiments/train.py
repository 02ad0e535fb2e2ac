"""``keepgym train``: train a baseline classifier (SGD + cosine) and save it for pruning.

Writes ``DIR/model.pt`` (best validation epoch, :func:`keepgym.models.save_model`, with the data split it
was trained with: dataset, seed, ``val_size``, ``train_size`` and a fingerprint of the validation images),
``DIR/summary.json``, ``DIR/config.json``, TensorBoard events and, after every epoch, one atomic checkpoint
folder ``DIR/checkpoints/NNN/`` (trainer state and the best model so far, written under a temporary name
and renamed in one step; the last ``--keep-checkpoints`` and the best epoch's are kept). Ctrl-C or a kill
at any instant leaves a usable model, and ``--resume`` finishes the run exactly as an uninterrupted one
would. ``DIR/.lock`` is held while the run is live: a second command on the same folder is refused.

Data-parallel on N processes (DistributedDataParallel; ``gloo`` on CPU, ``nccl`` on GPU, one GPU per
process)::

    torchrun --nproc-per-node N -m keepgym train --model vgg11 --dataset cifar10 --out runs/vgg11

``--batch-size`` is the global batch, split between the ranks; rank 0 writes every output.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from keepgym.envs.data import DATASETS, load_dataset
from keepgym.envs.distributed import DistributedInfo, cleanup_distributed, init_distributed, main_first
from keepgym.envs.metrics import count_macs_params, evaluate_accuracy
from keepgym.envs.splits import split_record
from keepgym.envs.trainer import Trainer
from keepgym.experiments.common import (
    CliError,
    arg,
    atomic_torch_save,
    load_state,
    prepare_run_dir,
    release_run_dir,
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

__all__ = ["TrainConfig", "run", "COMMAND", "DESCRIPTION", "Config"]

logger = logging.getLogger(__name__)

COMMAND = "train"
DESCRIPTION = "Train a baseline classifier (SGD + cosine schedule) and save it for pruning."


@dataclass
class TrainConfig:
    """Settings of one ``keepgym train`` run (saved as ``config.json``)."""

    model: str = arg(
        help="zoo name (see --list-models, e.g. vgg11, resnet56), torchvision:NAME (e.g. torchvision:resnet18), "
        "timm:NAME or pkg.module:factory (your own model; gets num_classes from the dataset)"
    )
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
    data_root: str | None = arg(
        None,
        help="folder of the torchvision datasets; --dataset folder: an ImageFolder tree DIR/train/<class>/*, "
        "DIR/test|val/<class>/* (or a .tar.gz/.zip of one), decoded once and cached",
    )
    image_size: int | None = arg(
        None, help="resize images to this square size (--dataset folder: shorter side, centre crop)"
    )
    download: bool = arg(False, help="download a missing torchvision dataset (needs internet)")
    device: str = arg("auto", help="cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)")
    amp: bool = arg(False, help="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = arg(True, help="channels_last memory format on CUDA (ignored on CPU)")
    seed: int = arg(0, help="random seed")
    force: bool = arg(False, help="overwrite an existing run folder")
    resume: bool = arg(False, help="continue the interrupted run in --out")
    keep_checkpoints: int = arg(2, help="epoch checkpoints kept (the newest N, plus the best epoch's)")
    progress: bool = arg(True, help="show a progress bar")


Config = TrainConfig
_STATE_FILE = "state.pt"


def default_epochs(dataset: str) -> int:
    """Epochs when ``--epochs`` is not given: small offline sets converge fast, CIFAR-size ones do not."""
    return 15 if dataset in ("digits", "synthetic") else 200


def validate(cfg: TrainConfig) -> None:
    """Check every setting before any work starts."""
    from keepgym.models import resolve_model

    try:
        resolve_model(cfg.model)
    except ValueError as err:
        raise CliError(str(err)) from None
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
        (cfg.image_size is None or cfg.image_size >= 4, f"--image-size must be >= 4, got {cfg.image_size}"),
        (cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise CliError(msg)
    if cfg.dataset == "folder" and cfg.data_root is None:
        raise CliError("--dataset folder needs --data-root DIR (DIR/train/<class>/*, DIR/test/<class>/*)")
    if cfg.data_root is not None and not Path(cfg.data_root).expanduser().exists() and not cfg.download:
        raise CliError(f"--data-root {cfg.data_root} does not exist")


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
        release_run_dir(cfg.out)
        cleanup_distributed()


def _prepare(cfg: TrainConfig) -> Path:
    # The data first (in memory, cached): a missing dataset or sizes that leave no training images
    # must fail before a run folder exists.
    try:
        load_dataset(
            cfg.dataset, cfg.data_root, val_size=cfg.val_size, seed=cfg.seed, download=cfg.download,
            train_size=cfg.train_size, image_size=cfg.image_size,
        )
    except ValueError as err:
        raise CliError(str(err)) from None
    out = prepare_run_dir(cfg.out, force=cfg.force, resume=cfg.resume)
    if cfg.resume:
        _check_resume(out, cfg)
        remove_partial_checkpoints([out / "checkpoints"])
    write_json(out / "config.json", cfg)
    return out


def _run(cfg: TrainConfig, dist_info: DistributedInfo) -> dict:
    from keepgym.models import create_model, load_model

    device, main = dist_info.device, dist_info.is_main
    if dist_info.enabled and cfg.batch_size < dist_info.world_size:
        raise CliError(f"--batch-size {cfg.batch_size} is smaller than the {dist_info.world_size} processes")
    out = main_first(lambda: _prepare(cfg))  # rank 0 makes the folder; a refusal ends every rank
    ckpt_dir = out / "checkpoints"
    seed_everything(cfg.seed)
    data = load_dataset(
        cfg.dataset,
        cfg.data_root,
        val_size=cfg.val_size,
        seed=cfg.seed,
        download=cfg.download,
        train_size=cfg.train_size,
        image_size=cfg.image_size,
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
    split = split_record(data, seed=cfg.seed, val_size=cfg.val_size, train_size=cfg.train_size)
    best = {"val_accuracy": -1.0, "epoch": 0}
    complete = complete_checkpoints(ckpt_dir, _STATE_FILE) if cfg.resume else []
    if complete:
        last = complete[-1]
        state = load_state(last / _STATE_FILE, map_location=device)
        trainer.load_state_dict(state["trainer"])
        best = {"val_accuracy": float(state["best"]["val_accuracy"]), "epoch": int(state["best"]["epoch"])}
        if main and (last / "best.pt").exists():
            # model.pt is written after the checkpoint: a kill in between left the previous best there
            atomic_copy(last / "best.pt", out / "model.pt")
        logger.info("resuming %s after epoch %d", out, trainer.epoch)
    # every rank trains (the epoch statistics are reduced, so all see the same); rank 0 writes
    writer = SummaryWriter(str(out / "tb" / "train")) if main else None
    if writer is not None and trainer.epoch == 0:
        writer.add_text("config", _config_markdown(cfg))
    show = cfg.progress and main
    bar = tqdm(total=cfg.epochs, initial=trainer.epoch, desc=f"train {cfg.model}", disable=not show)
    try:
        while trainer.epoch < cfg.epochs:
            stats = trainer.train_epoch()
            improved = stats.val_accuracy > best["val_accuracy"]
            if improved:
                best = {"val_accuracy": stats.val_accuracy, "epoch": stats.epoch}
            if writer is not None:
                for key in ("train_loss", "train_accuracy", "val_accuracy", "learning_rate"):
                    writer.add_scalar(f"train/{key}", getattr(stats, key), stats.epoch)
                _write_checkpoint(ckpt_dir, trainer, best, improved, cfg, split)
                if improved:
                    atomic_copy(ckpt_dir / f"{stats.epoch:03d}" / "best.pt", out / "model.pt")
                pinned = [ckpt_dir / f"{best['epoch']:03d}"]
                retain_checkpoints(ckpt_dir, cfg.keep_checkpoints, _STATE_FILE, pinned=pinned)
                _after_checkpoint(stats.epoch)
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


def _after_checkpoint(epoch: int) -> None:
    """Called after every complete epoch checkpoint (tests replace it to simulate an interruption)."""


def _write_checkpoint(
    ckpt_dir: Path, trainer: Trainer, best: dict, improved: bool, cfg: TrainConfig, split: dict
) -> None:
    """One atomic folder ``checkpoints/NNN/``: trainer state and the best model so far (copied if unchanged)."""
    from keepgym.models import save_model

    epoch = trainer.epoch
    previous = complete_checkpoints(ckpt_dir, _STATE_FILE)

    def write(tmp: Path) -> None:
        if improved or not previous or not (previous[-1] / "best.pt").exists():
            save_model(trainer.model, tmp / "best.pt", dataset=cfg.dataset, val_accuracy=best["val_accuracy"],
                       epoch=best["epoch"], split=split)
        else:
            shutil.copyfile(previous[-1] / "best.pt", tmp / "best.pt")
        atomic_torch_save({"trainer": trainer.state_dict(), "best": best}, tmp / _STATE_FILE)

    write_dir_atomically(ckpt_dir / f"{epoch:03d}", write)


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary file and a rename (a kill leaves the old or the new)."""
    tmp = dst.with_name(f".{dst.name}.copy.tmp")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_resume(out: Path, cfg: TrainConfig) -> None:
    import json

    path = out / "config.json"
    if not path.exists():
        raise CliError(f"--resume: {out} has no config.json")
    saved = json.loads(path.read_text())
    ignore = {"resume", "force", "progress", "device", "keep_checkpoints"}
    diff = [k for k, v in saved.items() if k not in ignore and getattr(cfg, k, v) != v]
    if diff:
        raise CliError(f"--resume: settings differ from the saved run in {', '.join(sorted(diff))}")


def _config_markdown(cfg: object) -> str:
    from dataclasses import asdict

    rows = "\n".join(f"| {k} | {v} |" for k, v in asdict(cfg).items())
    return "| setting | value |\n|---|---|\n" + rows
