"""The ``keepgym`` command line: one sub-command per experiment module.

Each module in :data:`COMMANDS` defines ``COMMAND``, ``DESCRIPTION``, a dataclass ``Config`` (the
flags are built from its fields) and ``run(config) -> dict``. User mistakes (bad flags, missing
files, unknown names) end with one clear line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from keepgym.experiments.common import CliError, add_config_arguments, config_from_args

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS = (
    "keepgym.experiments.train",
    "keepgym.experiments.prune",
    "keepgym.experiments.agentvit",
    "keepgym.experiments.evaluate",
    "keepgym.experiments.export",
    "keepgym.experiments.bench",
    "keepgym.experiments.demo",
    "keepgym.experiments.frontier",
)


def _modules() -> list:
    mods = []
    for name in COMMANDS:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
    return mods


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The top-level parser and a map command -> module."""
    parser = argparse.ArgumentParser(
        prog="keepgym",
        description="Reinforcement learning that decides what a vision model keeps: "
        "RL-Pruner (CNN channel pruning) and AgentViT (ViT patch selection).",
    )
    from keepgym import __version__

    parser.add_argument("--version", action="version", version=f"keepgym {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    table = {}
    for mod in _modules():
        p = sub.add_parser(mod.COMMAND, help=mod.DESCRIPTION, description=mod.DESCRIPTION)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
        else:
            add_config_arguments(p, mod.Config)
        table[mod.COMMAND] = mod
    return parser, table


#: Fragments of the messages torch's allocators raise as RuntimeError when memory runs out.
_ALLOCATOR_MESSAGES = ("can't allocate memory", "out of memory", "DefaultCPUAllocator", "not enough memory")
#: ... and torch.save's zip writer when a write fails (it raises RuntimeError, not OSError, on a full disk).
_WRITE_MESSAGES = ("PytorchStreamWriter failed", "file write failed")


def _system_error_line(err: BaseException, resumable: bool) -> str | None:
    """One line for a failure of the machine (disk full, read-only or forbidden folder, memory), else None.

    Checkpoints are written atomically, so after any of these the last complete one is intact.
    """
    resume = "fix the cause and rerun"
    if resumable:
        resume = "the last complete checkpoint is kept; fix the cause and rerun with --resume"
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
        return f"{reason}{where} ({resume})"
    if isinstance(err, MemoryError):
        return f"out of memory ({resume})"
    text = " ".join(str(err).split())
    if any(m.lower() in text.lower() for m in _ALLOCATOR_MESSAGES):
        return f"out of memory: {text[:200]} ({resume})"
    if any(m.lower() in text.lower() for m in _WRITE_MESSAGES):
        return f"a file could not be written (disk full?): {text[:200]} ({resume})"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``keepgym`` console script."""
    parser, table = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    mod = table[args.command]
    from keepgym.envs.data import DatasetNotFoundError

    user_errors: tuple[type[BaseException], ...] = (CliError, DatasetNotFoundError)
    try:
        from keepgym.models.serialization import ModelLoadError

        user_errors += (ModelLoadError,)
    except ImportError:  # pragma: no cover
        pass
    from keepgym.envs.splits import SplitMismatchError

    user_errors += (SplitMismatchError,)
    try:
        from keepgym.agents.serialization import AgentLoadError

        user_errors += (AgentLoadError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        cfg = mod.config_from_args(args) if hasattr(mod, "config_from_args") else config_from_args(mod.Config, args)
        mod.run(cfg)
    except user_errors as err:
        print(f"keepgym {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, MemoryError, RuntimeError) as err:
        line = _system_error_line(err, resumable=hasattr(args, "resume"))
        if line is None:
            raise
        print(f"keepgym {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nkeepgym {args.command}: interrupted; the last checkpoint is kept, "
            "continue with the same command plus --resume",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
