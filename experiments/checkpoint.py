"""Atomic checkpoint folders for every long command (train, prune, agentvit).

A checkpoint is a folder written under a temporary hidden name (``.NAME.XXXX``), its files fsynced,
then renamed into place in one ``os.replace``: a folder with a final name is always complete, so a
kill at any instant leaves either the previous checkpoint or the new one, never a mix. Resume reads
only complete folders; the temporary folders a kill leaves behind are removed on the next start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["write_dir_atomically", "complete_checkpoints", "remove_partial_checkpoints", "retain_checkpoints"]


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
