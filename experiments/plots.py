"""Matplotlib figures shared by the ``keepgym`` commands (Agg canvas: no display, no global pyplot state).

* :func:`plot_policy`: the final layer (coupling-group) distribution of a pruning run and the sparsity
  of every group, as in RL-Pruner's figure of the learned sparsity distribution.
* :func:`plot_kept_patches`: example images and, below each, the patches each selector keeps (AgentViT).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from keepgym.models.serialization import atomic_write

__all__ = ["plot_kept_patches", "plot_policy"]


def _canvas(figsize: tuple[float, float], nrows: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True)
    return fig, axes


def _save_png(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG atomically (a kill never leaves half a figure)."""
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png"))


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
    return _save_png(fig, path)


def plot_kept_patches(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: Sequence[int],
    rows: Sequence[tuple[str, Sequence[Sequence[int]], Sequence[int]]],
    patch_size: int,
    title: str = "",
) -> Path:
    """Write a PNG: one column per image, the image on top, then one row per selector.

    Args:
        path: Destination ``.png`` (parent folders are created).
        images: ``(M, C, H, W)`` uint8 images (C = 1 or 3).
        labels: The images' labels.
        rows: ``(name, kept patch indices per image, predicted class per image)`` per selector; kept
            patches are shown bright and framed, the others dimmed.
        patch_size: Patch side in pixels (the grid is ``H / patch_size`` patches a side).
        title: Figure title.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    m, g, p = len(images), images.shape[-1] // patch_size, patch_size
    fig = Figure(figsize=(1.6 * m, 1.7 * (len(rows) + 1) + 0.1), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows) + 1, m, squeeze=False)
    for j in range(m):
        img = np.transpose(images[j], (1, 2, 0)).astype(np.float32) / 255.0
        img = img[..., 0] if img.shape[-1] == 1 else img
        cmap = "gray" if img.ndim == 2 else None
        for r in range(len(rows) + 1):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
                ax.set_title(f"label {int(labels[j])}", fontsize=8)
                continue
            _, keeps, preds = rows[r - 1]
            kept = {int(i) for i in keeps[j]}
            shade = np.full((g, g), 0.25, dtype=np.float32)
            for idx in kept:
                shade[idx // g, idx % g] = 1.0
            shade = np.kron(shade, np.ones((p, p), dtype=np.float32))
            ax.imshow(img * shade if img.ndim == 2 else img * shade[..., None], cmap=cmap, vmin=0, vmax=1)
            for idx in kept:
                corner = ((idx % g) * p - 0.5, (idx // g) * p - 0.5)
                ax.add_patch(Rectangle(corner, p, p, fill=False, edgecolor="lime", linewidth=0.6))
            ax.set_title(f"{len(kept)} kept, pred {int(preds[j])}", fontsize=7)
    for r, name in enumerate(["image", *(row[0] for row in rows)]):
        axes[r][0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_png(fig, path)
