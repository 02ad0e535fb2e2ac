"""Compare pruning agents at equal settings: several algorithms x seeds, one table (mean +- std).

    python -m keepgym.experiments.compare_prune --model vgg11 --dataset digits --width-mult 0.25 \\
        --checkpoint runs/base_vgg11/model.pt --sparsity 0.5 --stage-sparsity 0.1 \\
        --algos rlpruner uniform global --seeds 0 1 2 --out-root runs/compare

Every run is one :func:`keepgym.experiments.prune.compress` with the same stage size, KD budget and data; only
``algo`` and ``seed`` change. Runs already finished in ``out_root`` are read back, not redone, so an
interrupted comparison continues where it stopped. :func:`compare` is what the demo reuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keepgym.experiments.prune import PruneConfig, compress

__all__ = ["compare", "aggregate", "format_markdown", "latency_speedups", "main"]

logger = logging.getLogger(__name__)

#: Figures aggregated per algorithm (from summary.json).
METRICS = (
    ("test_accuracy", lambda s: s["final"]["test_accuracy"]),
    ("val_accuracy", lambda s: s["final"]["val_accuracy"]),
    ("macs_reduction", lambda s: s["macs_reduction"]),
    ("params_reduction", lambda s: s["params_reduction"]),
    ("speedup_b1", lambda s: s["speedup_b1"]),
    ("speedup_b64", lambda s: s["speedup_b64"]),
    ("evaluations", lambda s: s["evaluations"]),
    ("wall_seconds", lambda s: s["wall_seconds"]),
)


def compare(
    base: PruneConfig,
    algos: Sequence[str] = ("rlpruner", "uniform", "global"),
    seeds: Sequence[int] = (0, 1, 2),
    out_root: str | Path = "runs/compare",
) -> dict[str, Any]:
    """Run ``base`` once per (algo, seed) under ``out_root/<algo>_s<seed>`` and aggregate.

    Returns:
        ``{"runs": [per-run rows], "table": {algo: {metric: (mean, std)}}, "baseline": {...}}``.
    """
    out_root = Path(out_root)
    rows, baseline = [], None
    for algo in algos:
        for seed in seeds:
            out = out_root / f"{algo}_s{seed}"
            summary_path = out / "summary.json"
            if summary_path.exists():
                summary = json.loads(summary_path.read_text())
            else:
                resume = (out / "config.json").exists()
                cfg = dataclasses.replace(
                    base, algo=algo, seed=seed, out=str(out), resume=resume, force=not resume, progress=False
                )
                logger.info("running %s seed %d -> %s", algo, seed, out)
                summary = compress(cfg)
            baseline = baseline or summary["baseline"]
            rows.append({"algo": algo, "seed": seed, **{k: f(summary) for k, f in METRICS}})
    return {"runs": rows, "table": aggregate(rows), "baseline": baseline}


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and (sample) standard deviation of every metric, per algorithm."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for algo in dict.fromkeys(r["algo"] for r in rows):
        mine = [r for r in rows if r["algo"] == algo]
        table[algo] = {}
        for key, _ in METRICS:
            values = np.array([r[key] for r in mine if r[key] is not None], dtype=np.float64)
            if values.size == 0:
                continue
            std = float(values.std(ddof=1)) if values.size > 1 else 0.0
            table[algo][key] = (float(values.mean()), std)
    return table


def latency_speedups(
    baseline: str | Path,
    compressed: Sequence[str | Path],
    input_size: Sequence[int],
    repeats: int = 50,
    rounds: int = 5,
    device: str = "cpu",
) -> list[dict[str, float]]:
    """Re-measure latency of compressed models against their baseline, interleaved round by round.

    On a shared machine one latency figure is noisy; here every round times the baseline and every
    compressed model back to back (batch 1 then 64) and the median over rounds is reported.

    Returns:
        One row per compressed model: ``latency_ms_b1``, ``latency_ms_b64``, ``speedup_b1``, ``speedup_b64``
        (baseline figures in the row ``"baseline"`` first).
    """
    import torch

    from keepgym.envs.metrics import measure_latency
    from keepgym.models import load_model

    paths = [Path(baseline), *[Path(p) for p in compressed]]
    models = [load_model(p).to(device).eval() for p in paths]
    times = {(i, b): [] for i in range(len(models)) for b in (1, 64)}
    with torch.no_grad():
        for _ in range(rounds):
            for batch, reps in ((1, repeats), (64, max(3, repeats // 5))):
                for i, model in enumerate(models):
                    ms = measure_latency(model, input_size, batch_size=batch, repeats=reps, device=device)
                    times[(i, batch)].append(ms["median_ms"])
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = []
    for i, path in enumerate(paths):
        rows.append(
            {
                "model": "baseline" if i == 0 else str(path),
                "latency_ms_b1": med[(i, 1)],
                "latency_ms_b64": med[(i, 64)],
                "speedup_b1": med[(0, 1)] / med[(i, 1)],
                "speedup_b64": med[(0, 64)] / med[(i, 64)],
            }
        )
    return rows


def format_markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table (percentages for accuracies and reductions)."""
    header = (
        "| algo | n | test acc % | MACs red. % | params red. % | speed-up b1 | speed-up b64 "
        "| evaluations | wall s |"
    )
    lines = [header, "|" + "---|" * 9]
    counts = {}
    for r in result["runs"]:
        counts[r["algo"]] = counts.get(r["algo"], 0) + 1

    def pct(v: tuple[float, float] | None) -> str:
        return "-" if v is None else f"{100 * v[0]:.2f} ± {100 * v[1]:.2f}"

    def num(v: tuple[float, float] | None, digits: int = 2) -> str:
        return "-" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"

    for algo, m in result["table"].items():
        lines.append(
            f"| {algo} | {counts[algo]} | {pct(m.get('test_accuracy'))} | {pct(m.get('macs_reduction'))} | "
            f"{pct(m.get('params_reduction'))} | {num(m.get('speedup_b1'))} | {num(m.get('speedup_b64'))} | "
            f"{num(m.get('evaluations'), 0)} | {num(m.get('wall_seconds'), 0)} |"
        )
    b = result.get("baseline")
    if b:
        lines.append("")
        lines.append(
            f"baseline: test acc {100 * b['test_accuracy']:.2f} %, {b['macs'] / 1e6:.2f}M MACs, "
            f"{b['params'] / 1e6:.3f}M params, latency b1 {b['latency_ms_b1']:.2f} ms, "
            f"b64 {b['latency_ms_b64']:.2f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m keepgym.experiments.compare_prune``: run the grid and print/write the table."""
    p = argparse.ArgumentParser(
        prog="python -m keepgym.experiments.compare_prune", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--width-mult", type=float, default=None)
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--stage-sparsity", type=float, default=0.1)
    p.add_argument("--sample-num", type=int, default=10)
    p.add_argument("--rounds-per-stage", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--final-finetune-epochs", type=int, default=5)
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--algos", nargs="+", default=["rlpruner", "uniform", "global"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out-root", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = PruneConfig(
        sparsity=args.sparsity,
        model=args.model,
        dataset=args.dataset,
        checkpoint=args.checkpoint,
        width_mult=args.width_mult,
        stage_sparsity=args.stage_sparsity,
        sample_num=args.sample_num,
        rounds_per_stage=args.rounds_per_stage,
        finetune_epochs=args.finetune_epochs,
        final_finetune_epochs=args.final_finetune_epochs,
        eval_size=args.eval_size,
        device=args.device,
    )
    result = compare(base, args.algos, args.seeds, args.out_root)
    text = format_markdown(result)
    print(text)
    out = Path(args.out_root)
    (out / "comparison.md").write_text(text + "\n")
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
