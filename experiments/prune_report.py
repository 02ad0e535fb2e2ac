"""The end of ``keepgym prune``: measure, save the compressed model, plot the policy, write ``summary.json``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keepgym.envs.distributed import DistributedInfo
from keepgym.envs.metrics import latency_side_by_side, measure_model
from keepgym.experiments.common import write_json
from keepgym.experiments.prune_config import PruneConfig

__all__ = ["write_report"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else float(a) / float(b)


def write_report(
    cfg: PruneConfig,
    raw: Any,
    out: Path,
    student: torch.nn.Module,
    search: dict[str, Any],
    final_records: list[dict],
    wall_seconds: float,
    dist_info: DistributedInfo,
) -> dict[str, Any]:
    """Measure the baseline and the compressed model side by side (the test split is read here only) and write
    ``compressed.pt``, ``policy.png``, ``summary.json`` and the final TensorBoard points; return the summary.

    Args:
        cfg: the run's config.
        raw: the run's ``PruneEnv`` (its data, original model, groups).
        out: the run folder.
        student: the compressed model.
        search: the search's record (widths, distribution, stage records, ...).
        final_records: the final distillation's per-epoch records.
        wall_seconds: the run's wall time so far.
        dist_info: the process group (``world_size`` is recorded under ``torchrun``).
    """
    from keepgym.experiments.plots import plot_policy
    from keepgym.models import save_model

    data, device, original = raw.data, dist_info.device, raw.original_model
    base, final = measure_model(original, data, device), measure_model(student, data, device)
    lat = latency_side_by_side(
        {"baseline": original, "final": student}, raw.input_size, device, cfg.latency_repeats, cfg.latency_threads
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
    group_names = [str(g.root_name) for g in raw.groups]
    plot_policy(
        out / "policy.png",
        initial_widths,
        widths,
        search.get("distribution"),
        group_names,
        title=f"{cfg.algo}: sparsity {sparsity:.2f}, MACs x{_ratio(base['macs'], final['macs']) or 0:.2f}",
    )
    summary = {
        "algo": cfg.algo,
        "model": (getattr(original, "keepgym_spec", None) or {}).get("name", cfg.model),
        "dataset": data.name,
        "seed": cfg.seed,
        "target_sparsity": cfg.sparsity,
        "target_macs": cfg.target_macs,
        "target_params": cfg.target_params,
        "stage_sparsity": cfg.stage_sparsity,
        "num_stages": int(raw.num_stages),
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
        "wall_seconds": wall_seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if dist_info.enabled:
        summary["world_size"] = dist_info.world_size
    write_json(out / "summary.json", summary)
    _log_final(out / "tb", cfg.algo, summary)
    return summary


def _log_final(tb: Path, algo: str, summary: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb / f"{algo}_final"))
    try:
        step = int(summary["num_stages"])
        for block in ("baseline", "final"):
            for key in ("val_accuracy", "test_accuracy", "macs", "params"):
                writer.add_scalar(f"{block}/{key}", summary[block][key], step)
        writer.add_scalar("final/macs_reduction", summary["macs_reduction"], step)
        writer.add_scalar("final/params_reduction", summary["params_reduction"], step)
    finally:
        writer.close()
