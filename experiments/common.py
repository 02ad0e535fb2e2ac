"""Shared plumbing of the ``keepgym`` commands: dataclass configs -> argparse, run folders,
atomic writes, seeding, devices and clear one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import platform
import random
import shutil
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CliError",
    "add_config_arguments",
    "config_from_args",
    "prepare_run_dir",
    "lock_run_dir",
    "release_run_dir",
    "write_json",
    "atomic_torch_save",
    "load_state",
    "seed_everything",
    "resolve_device",
    "machine_info",
    "run_name",
    "arg",
]


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2, no traceback."""


def arg(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, **kw: Any) -> Any:
    """A dataclass field carrying its ``--help`` text and choices."""
    meta = {"help": help, "choices": choices}
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return dataclasses.field(metadata=meta, **kw)
    if "default_factory" in kw:
        return dataclasses.field(metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of an annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _with_default(help_text: str, default: Any) -> str:
    """``help_text`` plus ``(default: X)``, unless the text already says what the default is."""
    if "default:" in help_text:
        return help_text
    if default is None:
        return help_text
    return f"{help_text} (default: {default})"


class _ListModels(argparse.Action):
    """``--list-models``: print the model names ``--model`` accepts and exit (like ``--version``)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from keepgym.models import list_models

        lines = [
            *list_models(),
            "torchvision:NAME     any torchvision classifier, e.g. torchvision:resnet18 (weights=None)",
            "timm:NAME            any timm model (pip install 'keepgym[timm]')",
            "pkg.module:factory   your own function or nn.Module class (num_classes, in_chans if it takes them)",
        ]
        try:
            print("\n".join(lines))
            sys.stdout.flush()
        except BrokenPipeError:  # `keepgym train --list-models | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        parser.exit()


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of the dataclass ``cls`` (bools become on/off switches)."""
    hints = typing.get_type_hints(cls)
    if "model" in hints:
        parser.add_argument("--list-models", action=_ListModels, help="print the model names --model accepts and exit")
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _base_type(hints[f.name])
        meta = f.metadata
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = meta.get("help", "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            parser.add_argument(flag, type=inner, nargs="+", default=default, help=_with_default(help_text, default))
            continue
        kwargs: dict[str, Any] = {"type": tp if tp in (int, float) else str, "help": help_text}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            kwargs["help"] = _with_default(help_text, default)
        parser.add_argument(flag, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build the dataclass ``cls`` from parsed arguments (tuples restored from lists)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def run_name(*parts: Any) -> str:
    """CleanRL-style run name: parts joined with ``__`` plus a timestamp."""
    return "__".join([str(p) for p in parts if p is not None] + [time.strftime("%Y%m%d-%H%M%S")])


#: The lock file of a run folder (an ``fcntl.flock`` held for the run's lifetime).
LOCK_NAME = ".lock"
_LOCKS: dict[Path, int] = {}


def _visible_entries(path: Path) -> list[Path]:
    """What a run wrote: hidden names (the lock, temporary files a kill left behind) do not count."""
    return [p for p in path.iterdir() if not p.name.startswith(".")]


def lock_run_dir(path: str | os.PathLike) -> None:
    """Take the run folder's lock (``OUT/.lock``, an exclusive ``fcntl.flock``) for this process.

    The OS drops the lock when the process ends, even by SIGKILL, so a stale lock never blocks a
    ``--resume``. Taking it again in the same process is a no-op (a run resumed in-process).

    Raises:
        CliError: another live process holds the folder.
    """
    path = Path(path)
    key = path.resolve()
    if key in _LOCKS:
        return
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CliError(
            f"{path} is in use by another running keepgym command; wait for it to end or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[key] = fd


def release_run_dir(path: str | os.PathLike | None = None) -> None:
    """Release the lock taken by :func:`lock_run_dir` on ``path`` (every lock of this process if None)."""
    keys = list(_LOCKS) if path is None else [Path(path).resolve()]
    for key in keys:
        fd = _LOCKS.pop(key, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


def prepare_run_dir(out: str | os.PathLike, *, force: bool = False, resume: bool = False) -> Path:
    """Create and lock the run folder; refuse to overwrite an existing run unless told to.

    The folder is locked (:func:`lock_run_dir`) before anything in it is touched, so a second command
    on a live run is refused, ``--force`` included. Temporary files and folders a kill left behind
    (``.NAME.*``) are removed; a folder holding nothing else counts as empty.

    Raises:
        CliError: the folder holds a run and neither ``force`` nor ``resume`` was given, ``resume`` was
            given and there is nothing to resume, or another live command holds the folder.
    """
    from keepgym.models.checkpoints import remove_partial_checkpoints

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {path} exists and is not a folder")
    if resume and not (path.is_dir() and _visible_entries(path)):
        raise CliError(f"--resume: {path} holds no run to resume")
    path.mkdir(parents=True, exist_ok=True)
    lock_run_dir(path)
    try:
        has_run = bool(_visible_entries(path))
        if not resume and has_run:
            if not force:
                raise CliError(
                    f"{path} already holds a run; pass --force to overwrite it or --resume to continue it"
                )
            for entry in _visible_entries(path):  # the lock file stays: it is held
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        remove_partial_checkpoints([path])
    except BaseException:
        release_run_dir(path)
        raise
    return path


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (:func:`keepgym.models.serialization.atomic_write`)."""
    from keepgym.models.serialization import atomic_write

    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (temp file + fsync + rename): a kill never leaves half a checkpoint."""
    from keepgym.models.serialization import atomic_save

    atomic_save(obj, path)


def load_state(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` of a checkpoint state; an unreadable or hostile file is one line.

    Raises:
        CliError: the file is truncated, corrupt or holds anything but tensors and plain values.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError from the zip reader, ...
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CliError(f"{path}: not a readable checkpoint state (nothing in it was run): {reason}") from None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; validates the rest."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CliError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def machine_info() -> dict:
    """A description of the machine for benchmark JSON files."""
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info
