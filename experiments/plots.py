"""Matplotlib figures shared by the ``keepgym`` commands (Agg canvas: no display, no global pyplot state).

* :func:`plot_policy`: the final layer (coupling-group) distribution of a pruning run and the sparsity
  of every group, as in RL-Pruner's figure of the learned sparsity distribution.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_policy"]


def _canvas(figsize: tuple[float, float], nrows: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True)
    return fig, axes


def plot_policy(
    path: str | os.PathLike,
    initial_widths: Sequence[int],
    final_widths: Sequence[int],
    distribution: Sequence[float] | None = None,
    group_names: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Write a PNG: the final distribution over groups (top) and each group's channel sparsity (bottom).

    Args:
        path: Destination ``.png`` (parent folders are created).
        initial_widths: Channels of every group in the unpruned model.
        final_widths: Channels of every group after pruning.
        distribution: The agent's final distribution ``pi`` over the groups (None: the share of the
            removed channels that each group gave, which is what a fixed-rule baseline "learned").
        group_names: Labels of the x axis (e.g. the first layer of each group).
        title: Figure title.

    Returns:
        The path written.
    """
    initial = np.asarray(initial_widths, dtype=np.float64)
    final = np.asarray(final_widths, dtype=np.float64)
    if initial.shape != final.shape:
        raise ValueError(f"initial and final widths differ in length: {initial.shape} vs {final.shape}")
    removed = initial - final
    sparsity = np.where(initial > 0, removed / np.maximum(initial, 1.0), 0.0)
    if distribution is None:
        total = removed.sum()
        dist = removed / total if total > 0 else np.zeros_like(removed)
        dist_label = "share of removed channels"
    else:
        dist = np.asarray(distribution, dtype=np.float64)
        dist_label = "final distribution $\\pi$"
    groups = np.arange(len(initial))
    fig, (ax_pi, ax_sp) = _canvas((max(6.0, 0.35 * len(groups) + 3.0), 5.5), 2)
    ax_pi.bar(groups, dist, color="tab:blue")
    ax_pi.set_ylabel(dist_label)
    ax_pi.set_title(title or "layer distribution and per-layer sparsity")
    ax_sp.bar(groups, sparsity, color="tab:orange", label="sparsity")
    for g, (s, w0, w1) in enumerate(zip(sparsity, initial, final, strict=True)):
        if len(groups) <= 40:
            ax_sp.text(g, min(s + 0.02, 0.95), f"{int(w1)}/{int(w0)}", ha="center", va="bottom", fontsize=6)
    overall = removed.sum() / max(initial.sum(), 1.0)
    ax_sp.axhline(overall, color="grey", linestyle="--", linewidth=1, label=f"overall {overall:.2f}")
    ax_sp.set_ylim(0.0, 1.0)
    ax_sp.set_ylabel("channel sparsity")
    ax_sp.legend(loc="upper right", fontsize=7)
    ax_sp.set_xticks(groups)
    labels = list(group_names) if group_names is not None else [str(g) for g in groups]
    ax_sp.set_xticklabels(labels, rotation=70 if len(groups) > 8 else 0, fontsize=7, ha="right")
    ax_sp.set_xlabel("coupling group")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
