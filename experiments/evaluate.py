"""``keepgym evaluate``: accuracy, MACs, params and CPU/GPU latency of any saved keepgym model.

    keepgym evaluate --checkpoint runs/prune/compressed.pt --dataset digits
    keepgym evaluate --checkpoint runs/base/model.pt --dataset cifar100 --split val --out eval.json

Prints a small table and, with ``--out``, writes the same figures as JSON. The model file is read
with ``torch.load(weights_only=True)`` (through :func:`keepgym.models.load_model`); a truncated file, a file
that is not a keepgym model or a model that does not fit the dataset ends with one clear line.

Second mode (AgentViT): ``--vit`` hands the whole config to ``keepgym.experiments.agentvit.evaluate_agentvit``
(see :func:`run`); that function owns its flags' meaning.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from keepgym.envs.data import DATASETS
from keepgym.experiments.common import CliError, arg, resolve_device, write_json

__all__ = ["COMMAND", "DESCRIPTION", "Config", "EvaluateConfig", "evaluate_model", "run", "format_table"]

logger = logging.getLogger(__name__)

COMMAND = "evaluate"
DESCRIPTION = "Accuracy, MACs, params and latency (batch 1 and 64) of a saved model."

SPLITS = ("test", "val", "train")


@dataclass
class EvaluateConfig:
    """Settings of one ``keepgym evaluate`` call."""

    checkpoint: str | None = arg(None, help="keepgym model file (model.pt, compressed.pt)")
    dataset: str | None = arg(None, help=f"dataset: {', '.join(DATASETS)}")
    split: str = arg("test", help=f"split to score: {', '.join(SPLITS)}")
    out: str | None = arg(None, help="also write the figures to this JSON file")
    device: str = arg("cpu", help="cpu, cuda, cuda:N or auto")
    batch_size: int = arg(512, help="evaluation batch size")
    latency_repeats: int = arg(20, help="timed forward passes per latency figure (0: skip latency)")
    val_size: float = arg(0.1, help="validation hold-out used when the model was trained (for --split val)")
    seed: int = arg(0, help="seed of the validation hold-out (as in `keepgym train --seed`)")
    data_root: str | None = arg(None, help="folder of the torchvision datasets")
    # Hook for the AgentViT mode (experiments/agentvit.py owns it): evaluate a ViT + patch agent.
    vit: str | None = arg(None, help="AgentViT mode: ViT model file (see `keepgym agentvit`)")
    agent: str | None = arg(None, help="AgentViT mode: agent zip saved by `keepgym agentvit`")


Config = EvaluateConfig


def validate(cfg: EvaluateConfig) -> None:
    """Check the CNN-mode settings before any work."""
    if cfg.checkpoint is None:
        raise CliError("--checkpoint PATH is required (or --vit PATH for the AgentViT mode)")
    if cfg.dataset is None:
        raise CliError(f"--dataset is required; valid datasets: {', '.join(DATASETS)}")
    if cfg.dataset not in DATASETS:
        raise CliError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if cfg.split not in SPLITS:
        raise CliError(f"unknown split {cfg.split!r}; valid splits: {', '.join(SPLITS)}")
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise CliError(f"--checkpoint {path}: no such file")
    checks = [
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.latency_repeats >= 0, f"--latency-repeats must be >= 0, got {cfg.latency_repeats}"),
        (0 < cfg.val_size < 1, f"--val-size must be in (0, 1), got {cfg.val_size}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise CliError(msg)


def evaluate_model(
    model: Any,
    data: Any,
    split: str = "test",
    device: str = "cpu",
    batch_size: int = 512,
    latency_repeats: int = 20,
) -> dict[str, Any]:
    """Accuracy on ``split``, MACs/params at ``1 x C x H x W`` and median latency at batch 1 and 64.

    Args:
        model: A classifier (moved to ``device``).
        data: :class:`keepgym.envs.data.DatasetSplits`.
        split: ``test``, ``val`` or ``train``.
        device: Torch device.
        batch_size: Evaluation batch size.
        latency_repeats: Timed passes per latency figure (0 skips latency).

    Returns:
        ``{"accuracy", "macs", "params", "latency_ms_b1", "latency_ms_b64", "images_per_second_b64"}``.
    """
    from keepgym.envs.metrics import count_macs_params, evaluate_accuracy, measure_latency

    model = model.to(device).eval()
    x, y = data.split(split)
    shape = (1, data.in_chans, data.image_size, data.image_size)
    macs, params = count_macs_params(model, shape)
    result: dict[str, Any] = {
        "accuracy": evaluate_accuracy(model, x, y, data.normalize, batch_size=batch_size, device=device),
        "macs": macs,
        "params": params,
        "latency_ms_b1": None,
        "latency_ms_b64": None,
        "images_per_second_b64": None,
    }
    if latency_repeats > 0:
        b1 = measure_latency(model, shape, batch_size=1, repeats=latency_repeats, device=device)
        b64 = measure_latency(
            model, shape, batch_size=64, repeats=max(3, latency_repeats // 4), device=device
        )
        result.update(
            latency_ms_b1=b1["median_ms"],
            latency_ms_b64=b64["median_ms"],
            images_per_second_b64=b64["images_per_second"],
        )
    return result


def format_table(rows: dict[str, Any]) -> str:
    """A two-column text table of ``rows`` (numbers formatted for reading)."""

    def fmt(key: str, v: Any) -> str:
        if v is None:
            return "-"
        if key in ("macs", "params"):
            return f"{v / 1e6:.3f}M"
        if key.endswith("accuracy"):
            return f"{100 * v:.2f}%"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    width = max(len(k) for k in rows)
    return "\n".join(f"{k.ljust(width)}  {fmt(k, v)}" for k, v in rows.items())


def _agentvit_mode(cfg: EvaluateConfig) -> dict:
    """Dispatch to the AgentViT evaluator (lives in experiments/agentvit.py)."""
    try:
        module = importlib.import_module("keepgym.experiments.agentvit")
    except ModuleNotFoundError as err:
        if err.name != "keepgym.experiments.agentvit":
            raise
        module = None
    fn = getattr(module, "evaluate_agentvit", None)
    if fn is None:
        raise CliError(
            "--vit: the AgentViT evaluation is not available in this version (experiments/agentvit.py)"
        )
    return fn(cfg)


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate the model file; print a table; write ``--out`` if given; return the figures."""
    if cfg.vit is not None:
        return _agentvit_mode(cfg)
    validate(cfg)
    from keepgym.envs.data import load_dataset
    from keepgym.models import load_model

    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_root, val_size=cfg.val_size, seed=cfg.seed)
    model = load_model(cfg.checkpoint, map_location="cpu")
    spec = getattr(model, "keepgym_spec", {}).get("kwargs", {})
    if spec.get("in_chans", data.in_chans) != data.in_chans:
        raise CliError(
            f"{cfg.checkpoint}: the model takes {spec['in_chans']}-channel images but {cfg.dataset} has "
            f"{data.in_chans} channel(s)"
        )
    if spec.get("num_classes", data.num_classes) != data.num_classes:
        raise CliError(
            f"{cfg.checkpoint}: the model has {spec['num_classes']} classes but {cfg.dataset} has "
            f"{data.num_classes}"
        )
    try:
        figures = evaluate_model(
            model,
            data,
            cfg.split,
            device=device,
            batch_size=cfg.batch_size,
            latency_repeats=cfg.latency_repeats,
        )
    except RuntimeError as err:  # shape mismatch between the model and the images
        line = str(err).strip().splitlines()[0][:200]
        raise CliError(f"{cfg.checkpoint} cannot run on {cfg.dataset} images: {line}") from None
    rows = {
        "model": getattr(model, "keepgym_spec", {}).get("name", type(model).__name__),
        "dataset": cfg.dataset,
        "split": cfg.split,
        f"{cfg.split}_accuracy": figures["accuracy"],
        "macs": figures["macs"],
        "params": figures["params"],
        "latency_ms_b1": figures["latency_ms_b1"],
        "latency_ms_b64": figures["latency_ms_b64"],
        "device": device,
    }
    print(format_table(rows))
    result = {**rows, **figures, "checkpoint": str(cfg.checkpoint), "config": asdict(cfg)}
    if cfg.out:
        write_json(cfg.out, result)
    return result
