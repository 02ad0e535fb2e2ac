"""``keepgym export``: write a saved model as TorchScript, ExportedProgram and ONNX, each checked.

    keepgym export --checkpoint runs/prune/compressed.pt --dataset digits
    keepgym export --checkpoint runs/prune/compressed.pt --image-size 32 --formats onnx --out deploy/

Writes ``OUT/model.torchscript.pt``, ``OUT/model.pt2`` and ``OUT/model.onnx`` (default ``OUT``: an
``export`` folder beside the checkpoint) and ``OUT/export.json``. Every file is loaded back and run on
a batch (test images of ``--dataset`` when given, else random ones) beside the PyTorch model; an export
whose logits differ by more than ``--tolerance`` (times ``max(1, max |logit|)``) is an error. The files
need torch (or ONNX Runtime) to run, not keepgym. ONNX needs the ``export`` extra (``pip install 'keepgym[export]'``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from keepgym.envs.data import DATASETS
from keepgym.experiments.common import CliError, arg, write_json

__all__ = ["COMMAND", "DESCRIPTION", "Config", "ExportConfig", "run"]

logger = logging.getLogger(__name__)

COMMAND = "export"
DESCRIPTION = "Export a saved model to TorchScript, torch.export (ExportedProgram) and ONNX, each checked."

_FORMATS = ("torchscript", "exported", "onnx")


@dataclass
class ExportConfig:
    """Settings of one ``keepgym export`` call (written into ``export.json``)."""

    checkpoint: str = arg(help="keepgym model file (model.pt, compressed.pt)")
    model: str | None = arg(
        None,
        help="the pkg.module:factory the model file was built with: a user factory's model file loads only "
        "when named here, since rebuilding it imports and runs that code",
    )
    out: str | None = arg(None, help="output folder (default: an 'export' folder beside the checkpoint)")
    formats: tuple[str, ...] = arg(_FORMATS, help=f"formats to write (default: all): {', '.join(_FORMATS)}")
    dataset: str | None = arg(None, help=f"check on this dataset's test images (and take its image size): "
                              f"{', '.join(DATASETS)}")
    data_root: str | None = arg(
        None, help="folder of the torchvision datasets (--dataset folder: the image folder or its archive)"
    )
    image_size: int | None = arg(None, help="input height = width (default: the dataset's, else 32)")
    batch_size: int = arg(8, help="images in the parity-check batch (>= 3)")
    tolerance: float = arg(
        1e-4, help="largest accepted max |logit diff| between an export and the model, per unit of max(1, max |logit|)"
    )
    force: bool = arg(False, help="overwrite existing export files")


Config = ExportConfig


def validate(cfg: ExportConfig) -> None:
    """Check the settings before any work."""
    if not Path(cfg.checkpoint).is_file():
        raise CliError(f"--checkpoint {cfg.checkpoint}: no such file")
    unknown = [f for f in cfg.formats if f not in _FORMATS]
    if unknown or not cfg.formats:
        raise CliError(f"unknown format(s) {', '.join(unknown) or '(none)'}; valid formats: {', '.join(_FORMATS)}")
    if cfg.dataset is not None and cfg.dataset not in DATASETS:
        raise CliError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    checks = [
        (cfg.image_size is None or cfg.image_size >= 4, f"--image-size must be >= 4, got {cfg.image_size}"),
        (cfg.batch_size >= 3, f"--batch-size must be >= 3, got {cfg.batch_size}"),
        (cfg.tolerance > 0, f"--tolerance must be > 0, got {cfg.tolerance}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise CliError(msg)


def _batches(cfg: ExportConfig, in_chans: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(tracing example, parity batch, where the parity images come from)."""
    if cfg.dataset is not None:
        from keepgym.envs.data import load_dataset

        data = load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size)
        if data.in_chans != in_chans:
            raise CliError(
                f"{cfg.checkpoint}: the model takes {in_chans}-channel images but {cfg.dataset} has {data.in_chans}"
            )
        x = data.normalize(data.test_x[: cfg.batch_size])
        source = f"{cfg.dataset} test images (normalised: mean {list(data.mean)}, std {list(data.std)})"
        return x[:2].clone(), x, source
    size = cfg.image_size or 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn((cfg.batch_size, in_chans, size, size), generator=g)
    return x[:2].clone(), x, "random images"


def run(cfg: ExportConfig) -> dict[str, Any]:
    """Export the model file in each format, check each, write ``export.json`` and return it."""
    validate(cfg)
    from keepgym.models import load_model
    from keepgym.models.export import EXPORT_FORMATS, ExportError, export_model

    model = load_model(cfg.checkpoint, map_location="cpu", trust_factory=cfg.model).eval()
    spec = getattr(model, "keepgym_spec", {}) or {}
    in_chans = int(spec.get("kwargs", {}).get("in_chans", 3))
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).parent / "export"
    existing = [out / f"model{EXPORT_FORMATS[f]}" for f in cfg.formats if (out / f"model{EXPORT_FORMATS[f]}").exists()]
    if existing and not cfg.force:
        raise CliError(f"{existing[0]} exists; pass --force to overwrite it")
    example, batch, source = _batches(cfg, in_chans)
    try:
        with torch.no_grad():
            model(batch)
    except RuntimeError as err:
        line = str(err).strip().splitlines()[0][:200]
        raise CliError(f"{cfg.checkpoint} cannot run on {tuple(batch.shape[1:])} inputs: {line}") from None
    try:
        results = export_model(model, example, out, cfg.formats, check_batch=batch, tolerance=cfg.tolerance)
    except ImportError as err:
        others = " ".join(f for f in cfg.formats if f != "onnx") or "torchscript exported"
        raise CliError(f"{err} (or leave ONNX out: --formats {others})") from None
    except ExportError as err:
        raise CliError(str(err)) from None
    report = {
        "checkpoint": str(cfg.checkpoint),
        "model": spec.get("name", type(model).__name__),
        "input_shape": [None, *batch.shape[1:]],
        "checked_on": f"{len(batch)} {source}",
        "exports": results,
        "config": asdict(cfg),
    }
    write_json(out / "export.json", report)
    for fmt, r in results.items():
        print(f"{fmt:<12} {r['path']}  ({r['bytes'] / 1e6:.2f} MB, max |logit diff| {r['max_abs_diff']:.2e})")
    return report
