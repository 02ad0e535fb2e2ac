"""``keepgym evaluate``: accuracy, MACs, params and CPU/GPU latency of any saved keepgym model.

    keepgym evaluate --checkpoint runs/prune/compressed.pt --dataset digits
    keepgym evaluate --checkpoint runs/base/model.pt --dataset cifar100 --split val --out eval.json

Prints a small table and, with ``--out``, writes the same figures as JSON. The model file is read
with ``torch.load(weights_only=True)`` (through :func:`keepgym.models.load_model`); a truncated file, a file
that is not a keepgym model or a model that does not fit the dataset ends with one clear line.

Second mode (AgentViT): ``--vit`` hands the whole config to ``keepgym.experiments.agentvit_report.evaluate_agentvit``
(see :func:`run`); that function owns its flags' meaning.
"""

from __future__ import annotations

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
    model: str | None = arg(
        None,
        help="the pkg.module:factory the model file was built with: a user factory's model file loads only "
        "when named here, since rebuilding it imports and runs that code",
    )
    dataset: str | None = arg(None, help=f"dataset: {', '.join(DATASETS)}")
    split: str = arg("test", help=f"split to score: {', '.join(SPLITS)}")
    out: str | None = arg(None, help="also write the figures to this JSON file")
    device: str = arg("cpu", help="cpu, cuda, cuda:N or auto")
    batch_size: int = arg(512, help="evaluation batch size")
    latency_repeats: int = arg(20, help="timed forward passes per latency figure (0: skip latency)")
    val_size: float = arg(
        0.1, help="validation hold-out, for model files that record no split (default: 0.1; files written by "
        "`keepgym train` record theirs, and it is used)"
    )
    seed: int = arg(0, help="seed of the validation hold-out, for model files that record no split (default: 0)")
    data_root: str | None = arg(None, help="folder of the torchvision datasets")
    exported: tuple[str, ...] = arg(
        (),
        help="exported files of this model (`keepgym export`: .onnx via ONNX Runtime, .pt2, .torchscript.pt) "
        "to score and time beside it; prints their speed-up over the eager model (default: none)",
    )
    baseline: str | None = arg(
        None, help="the unpruned model file: scored and timed beside this one; prints the speed-up of pruning"
    )
    latency_threads: int | None = arg(
        None, help="CPU threads of torch and ONNX Runtime while timing (default: torch's; 1 is steadier)"
    )
    # AgentViT mode (experiments/agentvit_report.py owns it): evaluate a ViT + patch agent.
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
    for other in (*cfg.exported, *([cfg.baseline] if cfg.baseline else [])):
        if not Path(other).is_file():
            raise CliError(f"{other}: no such file")
    checks = [
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.latency_repeats >= 0, f"--latency-repeats must be >= 0, got {cfg.latency_repeats}"),
        (
            cfg.latency_threads is None or cfg.latency_threads >= 1,
            f"--latency-threads must be >= 1, got {cfg.latency_threads}",
        ),
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


def _interleaved_latency(models: dict[str, Any], shape: tuple[int, ...], repeats: int, device: str) -> dict:
    """Median latency (ms) at batch 1 and 64 of each model, timed in interleaved rounds (same machine state)."""
    import statistics

    from keepgym.envs.metrics import measure_latency

    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch, reps in ((1, repeats), (64, max(3, repeats // 4))):
        samples: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(3):
            for name, m in models.items():
                timing = measure_latency(m, shape, batch_size=batch, repeats=reps, device=device)
                samples[name].append(timing["median_ms"])
        for name in models:
            out[name][f"latency_ms_b{batch}"] = statistics.median(samples[name])
    return out


def _compare(cfg: EvaluateConfig, model: Any, data: Any, device: str) -> dict[str, Any]:
    """Score and time ``--exported`` files and the ``--baseline`` model beside ``model`` in one run.

    Returns ``{"rows": {name: figures}, "exported_speedup": {name: {b1, b64}}, "pruning_speedup": {b1, b64}}``;
    a speed-up is the reference's latency over the row's (> 1: faster).
    """
    import torch

    from keepgym.envs.metrics import count_macs_params, evaluate_accuracy
    from keepgym.models import load_model
    from keepgym.models.export import load_exported, max_logit_diff

    x, y = data.split(cfg.split)
    shape = (1, data.in_chans, data.image_size, data.image_size)
    model = model.to(device).eval()
    probe = data.normalize(x[:16]).to(device)
    models: dict[str, Any] = {"model": model}
    rows: dict[str, dict[str, Any]] = {"model": {}}
    threads = cfg.latency_threads or torch.get_num_threads()  # the same for torch and ONNX Runtime
    for path in cfg.exported:
        try:
            runner = load_exported(path, device=device, threads=threads)
            diff = max_logit_diff(model, runner, probe)
        except ImportError as err:
            raise CliError(f"--exported {path}: {err}") from None
        except (ValueError, RuntimeError) as err:
            line = " ".join(str(err).split())[:200]
            raise CliError(f"--exported {path}: cannot run it on {cfg.dataset} images: {line}") from None
        name = f"{runner.format} ({Path(path).name})"
        models[name] = runner
        rows[name] = {"path": str(path), "max_abs_diff": diff}
    if cfg.baseline:
        base = load_model(cfg.baseline, map_location="cpu", trust_factory=cfg.model).to(device).eval()
        models["baseline"] = base
        rows["baseline"] = {"path": str(cfg.baseline)}
    for name, m in models.items():
        rows[name]["accuracy"] = evaluate_accuracy(m, x, y, data.normalize, batch_size=cfg.batch_size, device=device)
        if isinstance(m, torch.nn.Module) and name in ("model", "baseline"):
            rows[name]["macs"], rows[name]["params"] = count_macs_params(m, shape)
    result: dict[str, Any] = {"rows": rows, "exported_speedup": {}, "pruning_speedup": None}
    if cfg.latency_repeats > 0:
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            timed = _interleaved_latency(models, shape, cfg.latency_repeats, device)
        finally:
            torch.set_num_threads(saved_threads)
        result["threads"] = threads
        for name in models:
            rows[name].update(timed[name])
        ref = timed["model"]
        for name in models:
            if name not in ("model", "baseline"):
                result["exported_speedup"][name] = {
                    f"b{b}": ref[f"latency_ms_b{b}"] / timed[name][f"latency_ms_b{b}"] for b in (1, 64)
                }
        if "baseline" in timed:
            result["pruning_speedup"] = {
                f"b{b}": timed["baseline"][f"latency_ms_b{b}"] / ref[f"latency_ms_b{b}"] for b in (1, 64)
            }
    return result


def _comparison_table(comparison: dict[str, Any]) -> str:
    """The side-by-side table of :func:`_compare`'s figures."""

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = comparison["rows"]
    width = max(len(n) for n in rows) + 2
    lines = [f"{'':{width}}{'accuracy':>9} {'MACs':>9} {'ms b1':>8} {'ms b64':>8} {'max|dlogit|':>11}"]
    for name, r in rows.items():
        acc = r.get("accuracy")
        macs = r.get("macs")
        lines.append(
            f"{name:{width}}{num(None if acc is None else 100 * acc, '8.2f') + ('%' if acc is not None else ''):>9} "
            f"{num(None if macs is None else macs / 1e6, '8.3f') + ('M' if macs is not None else ''):>9} "
            f"{num(r.get('latency_ms_b1'), '8.3f'):>8} {num(r.get('latency_ms_b64'), '8.3f'):>8} "
            f"{num(r.get('max_abs_diff'), '11.2e'):>11}"
        )
    for name, s in comparison["exported_speedup"].items():
        lines.append(f"speed-up of {name} over the eager model: x{s['b1']:.2f} (batch 1), x{s['b64']:.2f} (batch 64)")
    if comparison["pruning_speedup"]:
        s = comparison["pruning_speedup"]
        lines.append(f"speed-up of pruning (baseline / this model, eager): x{s['b1']:.2f} (batch 1), x{s['b64']:.2f} "
                     "(batch 64)")
    return "\n".join(lines)


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
    """Hand over to the AgentViT evaluator (``keepgym.experiments.agentvit_report.evaluate_agentvit``)."""
    from keepgym.experiments.agentvit_report import evaluate_agentvit

    return evaluate_agentvit(cfg)


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate the model file; print a table; write ``--out`` if given; return the figures."""
    if cfg.vit is not None:
        return _agentvit_mode(cfg)
    validate(cfg)
    from keepgym.envs.data import load_dataset
    from keepgym.envs.splits import check_split, read_split
    from keepgym.models import load_model

    device = resolve_device(cfg.device)
    split = read_split(cfg.checkpoint)  # the model's own train/val split, when its file records one
    if split is not None and split["dataset"] == cfg.dataset:
        size = split.get("image_size") if cfg.dataset == "folder" else None
        data = load_dataset(
            cfg.dataset, cfg.data_root, val_size=split["val_size"], seed=int(split["seed"]),
            train_size=split["train_size"], image_size=size,
        )  # fmt: skip
        if cfg.split == "val":
            check_split(data, split, cfg.checkpoint)
    else:
        data = load_dataset(cfg.dataset, cfg.data_root, val_size=cfg.val_size, seed=cfg.seed)
    model = load_model(cfg.checkpoint, map_location="cpu", trust_factory=cfg.model)
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
    import torch

    saved_threads = torch.get_num_threads()
    try:
        if cfg.latency_threads:
            torch.set_num_threads(cfg.latency_threads)
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
    finally:
        torch.set_num_threads(saved_threads)
    rows = {
        "model": getattr(model, "keepgym_spec", {}).get("name", type(model).__name__),
        "dataset": cfg.dataset,
        "split": cfg.split,
        f"{cfg.split}_accuracy": figures["accuracy"],
        "images": int(len(data.split(cfg.split)[1])),
        "macs": figures["macs"],
        "params": figures["params"],
        "latency_ms_b1": figures["latency_ms_b1"],
        "latency_ms_b64": figures["latency_ms_b64"],
        "device": device,
    }
    print(format_table(rows))
    result = {**rows, **figures, "checkpoint": str(cfg.checkpoint), "config": asdict(cfg)}
    if cfg.exported or cfg.baseline:
        result["comparison"] = _compare(cfg, model, data, device)
        print(_comparison_table(result["comparison"]))
    if cfg.out:
        write_json(cfg.out, result)
    return result
