"""Tables and the plot of ``keepgym frontier``: per-method mean and sample std over seeds, Markdown, PNG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from keepgym.experiments.frontier_methods import LABELS, METHODS
from keepgym.models.serialization import atomic_write

__all__ = ["frontier_markdown", "frontier_table", "plot_frontier"]


def frontier_table(records: list[dict], methods: tuple[str, ...], targets: tuple[float, ...]) -> list[dict]:
    rows = []
    for target in sorted(targets, reverse=True):
        for method in methods:
            runs = [r for r in records if r["method"] == method and r["target_macs"] == target]
            if not runs:
                continue
            acc = np.array([r["test_accuracy"] for r in runs])
            macs = np.array([r["macs_ratio"] for r in runs])
            sparsity = np.array([r["channel_sparsity"] for r in runs])
            rows.append(
                {
                    "method": method,
                    "target_macs": target,
                    "seeds": [r["seed"] for r in runs],
                    "n": len(runs),
                    # sample std over seeds (ddof=1); 0 for one seed
                    "test_accuracy_mean": float(acc.mean()),
                    "test_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                    "macs_ratio_mean": float(macs.mean()),
                    "macs_ratio_std": float(macs.std(ddof=1)) if len(macs) > 1 else 0.0,
                    "channel_sparsity_mean": float(sparsity.mean()),
                    "params_ratio_mean": float(np.mean([r["params_ratio"] for r in runs])),
                    "evaluations_mean": float(np.mean([r["evaluations"] for r in runs])),
                    "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in runs])),
                }
            )
    return rows


def frontier_markdown(rows: list[dict], baseline: dict, model: str, width_mult: float) -> str:
    if "test_accuracy" in baseline:
        head = (
            f"Baseline {model} (width {width_mult:g}): test accuracy {100 * baseline['test_accuracy']:.2f} %, "
            f"{baseline.get('macs', 0) / 1e6:.2f}M MACs, {baseline.get('params', 0) / 1e6:.3f}M params."
        )
    else:  # --checkpoint: a model trained elsewhere, not re-measured here
        head = f"Baseline {model} (width {width_mult:g}): `{baseline.get('checkpoint', '?')}` (given, not re-measured)."
    lines = [
        head,
        "",
        "| MACs target | method | test acc % (mean ± std) | MACs kept | channel sparsity | params kept | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target_macs']:g} | {LABELS[r['method']]} | {100 * r['test_accuracy_mean']:.2f} ± "
            f"{100 * r['test_accuracy_std']:.2f} | {r['macs_ratio_mean']:.3f} | {r['channel_sparsity_mean']:.3f} | "
            f"{r['params_ratio_mean']:.3f} | {r['n']} |"
        )
    return "\n".join(lines) + "\n"


def plot_frontier(path: Path, rows: list[dict], baseline: dict, methods: tuple[str, ...], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    markers = dict(zip(METHODS, "osD^vP*Xp", strict=True))
    for method in methods:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["macs_ratio_mean"])
        if not mine:
            continue
        ax.errorbar(
            [r["macs_ratio_mean"] for r in mine],
            [100 * r["test_accuracy_mean"] for r in mine],
            yerr=[100 * r["test_accuracy_std"] for r in mine],
            marker=markers[method],
            capsize=3,
            label=LABELS[method],
        )
    if baseline.get("test_accuracy") is not None:
        ax.axhline(100 * baseline["test_accuracy"], color="grey", linestyle="--", label="baseline (unpruned)")
    ax.set_xlabel("MACs kept (fraction of the baseline)")
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))
