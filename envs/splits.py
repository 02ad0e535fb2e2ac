"""The data split a model was trained with, recorded in its model file and checked where it is reused.

``keepgym train`` holds a validation split out of the training images (seeded). A reward or a model
choice measured on another split would score images the model trained on. So the model file records
the split (``extra["split"]``: dataset, seed, val_size, train_size, image_size and a SHA-256 of the validation
images and labels) and :class:`~keepgym.envs.prune_env.PruneEnv` rebuilds exactly that split, then
checks the fingerprint, instead of re-drawing one with its own seed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from keepgym.envs.data import DatasetSplits

__all__ = ["SplitMismatchError", "split_record", "split_fingerprint", "read_split", "check_split"]

_KEYS = ("dataset", "seed", "val_size", "train_size", "val_sha256")


class SplitMismatchError(ValueError):
    """The data an env would use is not the split the model file says it was trained with."""


def split_fingerprint(data: DatasetSplits) -> str:
    """SHA-256 of the validation images and labels (their bytes, in order)."""
    digest = hashlib.sha256()
    digest.update(data.val_y.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(data.val_x.contiguous().numpy().tobytes())
    return digest.hexdigest()


def split_record(data: DatasetSplits, *, seed: int, val_size: float | int, train_size: int | None) -> dict[str, Any]:
    """The ``split`` entry a model file records: what rebuilds the split, and its fingerprint."""
    return {
        "dataset": data.name,
        "seed": int(seed),
        "val_size": val_size,
        "train_size": train_size,
        "image_size": int(data.image_size),
        "val_sha256": split_fingerprint(data),
    }


def read_split(path: str | os.PathLike) -> dict[str, Any] | None:
    """The split recorded in a keepgym model file, or None (older file, or no split recorded).

    Reads only the metadata (the file is memory-mapped; ``weights_only=True``). A file that cannot be read
    returns None: loading the model itself reports that error.
    """
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # the model loader reports unreadable files in one line
        return None
    extra = payload.get("extra") if isinstance(payload, dict) else None
    split = extra.get("split") if isinstance(extra, dict) else None
    if not isinstance(split, dict) or any(k not in split for k in _KEYS):
        return None
    return dict(split)


def check_split(data: DatasetSplits, split: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse ``data`` unless its validation split is the one recorded in the model file ``path``.

    Raises:
        SplitMismatchError: another dataset, or other validation images (one line naming the file).
    """
    if data.name != split["dataset"]:
        raise SplitMismatchError(f"{path} was trained on {split['dataset']}, not {data.name}")
    if split_fingerprint(data) != split["val_sha256"]:
        raise SplitMismatchError(
            f"{path}: the validation split differs from the one the model was trained with "
            f"(seed {split['seed']}, val_size {split['val_size']}, train_size {split['train_size']}); "
            "rewards would be measured on training images"
        )
