"""Atomic checkpoint folders and plain-value RNG states for every long run (train, prune, agentvit).

A checkpoint is a folder written under a temporary hidden name (``.NAME.XXXX``), its files fsynced,
then renamed into place in one ``os.replace``: a folder with a final name is always complete, so a
kill at any instant leaves either the previous checkpoint or the new one, never a mix. Resume reads
only complete folders; the temporary folders a kill leaves behind are removed on the next start.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "complete_checkpoints",
    "global_rng_state",
    "remove_partial_checkpoints",
    "retain_checkpoints",
    "set_global_rng_state",
    "write_dir_atomically",
]


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Build a folder under a temporary name with ``write(tmp)`` and rename it to ``final``.

    An existing ``final`` is replaced. On any exception (a kill included, for the next start) the
    temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def complete_checkpoints(parent: Path, marker: str = "state.pt") -> list[Path]:
    """The complete checkpoint folders in ``parent`` (numeric names holding ``marker``), oldest first."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and p.name.isdigit() and (p / marker).exists())


def remove_partial_checkpoints(parents: Iterable[Path]) -> None:
    """Delete the hidden temporary folders and files (``.NAME.*``) a kill left behind mid-write."""
    for parent in parents:
        parent = Path(parent)
        if not parent.is_dir():
            continue
        for tmp in parent.glob(".*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.name.endswith(".tmp"):
                tmp.unlink(missing_ok=True)


def retain_checkpoints(parent: Path, keep_last: int, marker: str = "state.pt", pinned: Iterable[Path] = ()) -> None:
    """Keep the newest ``keep_last`` complete checkpoints in ``parent`` (and any ``pinned`` one)."""
    keep = {Path(p).resolve() for p in pinned}
    complete = complete_checkpoints(parent, marker)
    for old in complete[: max(len(complete) - keep_last, 0)]:
        if old.resolve() not in keep:
            shutil.rmtree(old, ignore_errors=True)


def global_rng_state() -> dict[str, Any]:
    """The global torch, NumPy and Python RNG states as tensors and plain values.

    Unlike the tuples the libraries return, the result saves and loads with
    ``torch.load(weights_only=True)``; :func:`set_global_rng_state` puts it back.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.as_tensor(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": [version, list(internal), gauss],
    }


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNGs from :func:`global_rng_state` (bit for bit)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
