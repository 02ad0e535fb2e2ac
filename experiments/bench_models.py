"""The model a model-based benchmark (``keepgym bench score-fidelity`` / ``search``) runs on.

Such a benchmark runs on a trained model (``--checkpoint``) or, with ``--quick``, on a random tiny VGG-11 on
synthetic data (plumbing only). :func:`prune_bench_env` builds its ``PruneEnv`` either way and
:func:`run_on_model` is the CLI side: it picks the model from the flags and turns the env's refusals into
one-line :class:`keepgym.experiments.common.CliError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keepgym.envs.data import DatasetSplits
from keepgym.envs.prune_env import PruneEnv
from keepgym.experiments.common import CliError

__all__ = ["prune_bench_env", "run_on_model"]


def prune_bench_env(
    model_name: str,
    dataset: str,
    *,
    data_root: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    image_size: int | None = None,
    data: DatasetSplits | None = None,
    pretrained: bool = True,
    width_mult: float = 1.0,
    **env_kwargs: Any,
) -> PruneEnv:
    """A ``PruneEnv`` on ``checkpoint`` (its width is the checkpoint's), else on ``model_name`` at ``width_mult``."""
    model = {} if checkpoint is not None else {"width_mult": width_mult, "pretrained": pretrained}
    return PruneEnv(
        model_name=model_name,
        dataset=dataset,
        data_root=data_root,
        checkpoint=checkpoint,
        image_size=image_size,
        data=data,
        **model,
        **env_kwargs,
    )


def run_on_model(
    name: str,
    benchmark: Callable[..., dict],
    cfg: Any,
    *,
    quick_sizes: dict[str, int],
    quick_settings: dict[str, Any],
    settings: dict[str, Any],
) -> dict:
    """``benchmark(model, dataset, ...)`` on the model ``cfg`` (a ``BenchConfig``) names.

    With ``cfg.quick``: a random VGG-11 at width 0.125 on synthetic 16x16 data of 4 classes
    (``quick_sizes``: train/val/test sizes) with ``quick_settings``; else ``cfg.model`` from ``cfg.checkpoint``
    on ``cfg.dataset`` with ``settings``. Refusals (no checkpoint, the env's checks) are :class:`CliError`.
    """
    if cfg.quick:
        from keepgym.envs.data import load_dataset

        data = load_dataset("synthetic", num_classes=4, image_size=16, **quick_sizes)
        return benchmark("vgg11", "synthetic", data=data, pretrained=False, width_mult=0.125, **quick_settings)
    if cfg.checkpoint is None:
        raise CliError(f"{name} needs a trained model: --checkpoint PATH (or --quick for a smoke run)")
    if not Path(cfg.checkpoint).expanduser().is_file():
        raise CliError(f"--checkpoint {cfg.checkpoint} does not exist")
    try:
        return benchmark(
            cfg.model,
            cfg.dataset,
            data_root=cfg.data_root,
            checkpoint=cfg.checkpoint,
            image_size=cfg.image_size,
            eval_size=cfg.eval_size,
            **settings,
        )
    except (ValueError, FileNotFoundError) as err:  # the env's checks of the model, data and sizes
        raise CliError(f"{name}: {err}".splitlines()[0]) from None
