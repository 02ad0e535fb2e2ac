"""SB3 callbacks that bring keepgym's env figures into TensorBoard, for any algorithm.

:class:`EnvInfoCallback` is the one place that turns the ``info`` dicts of ``PruneEnv`` and
``PatchSelectEnv`` into TensorBoard scalars (``env/accuracy``, ``env/macs_ratio``,
``env/kept``, ``env/step_seconds`` ...), per-group sparsity histograms and, optionally, the run's
config as text. It works with PPO, SAC, A2C, DQN, our ``DDQN`` and vectorised envs::

    from stable_baselines3 import PPO
    from agents.callbacks import EnvInfoCallback

    model = PPO("MlpPolicy", env, tensorboard_log="runs/")
    model.learn(10_000, callback=EnvInfoCallback(config={"sparsity": 0.5}))
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

__all__ = ["EnvInfoCallback", "DEFAULT_INFO_KEYS"]

DEFAULT_INFO_KEYS = (
    "accuracy",
    "macs_ratio",
    "params_ratio",
    "sparsity",
    "stage",
    "kept",
    "loss",
    "step_seconds",
    "macs_per_image",
)


class EnvInfoCallback(BaseCallback):
    """Record env ``info`` figures as ``env/<key>`` scalars on every step that has them.

    Args:
        keys: scalar info keys to record (missing keys are skipped).
        histogram_keys: info keys holding per-group arrays; ``widths`` is also turned into a
            per-group sparsity histogram (``env/group_sparsity``) against the first widths seen.
        config: the run's settings, written once as TensorBoard text (``config``).
        verbose: SB3 verbosity.
    """

    def __init__(
        self,
        keys: Iterable[str] = DEFAULT_INFO_KEYS,
        histogram_keys: Iterable[str] = ("widths",),
        config: Mapping[str, Any] | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.keys = tuple(keys)
        self.histogram_keys = tuple(histogram_keys)
        self.config = dict(config) if config else None
        self._initial_widths: np.ndarray | None = None

    def _on_training_start(self) -> None:
        if self.config is None:
            return
        from stable_baselines3.common.logger import TensorBoardOutputFormat

        text = "```\n" + json.dumps(self.config, indent=2, default=str) + "\n```"
        for fmt in self.logger.output_formats:
            if isinstance(fmt, TensorBoardOutputFormat):
                fmt.writer.add_text("config", text, 0)
                fmt.writer.flush()

    def _on_step(self) -> bool:
        infos = self.locals.get("infos") or []
        sums: dict[str, list[float]] = {}
        for info in infos:
            for key in self.keys:
                value = info.get(key)
                if isinstance(value, int | float | np.number) and np.isfinite(value):
                    sums.setdefault(key, []).append(float(value))
            for key in self.histogram_keys:
                if key in info:
                    arr = np.asarray(info[key], dtype=np.float64)
                    self.logger.record(f"env/{key}", arr, exclude=("stdout", "log", "json", "csv"))
                    if key == "widths":
                        self._record_sparsity(arr)
        for key, values in sums.items():
            self.logger.record(f"env/{key}", float(np.mean(values)))
        return True

    def _record_sparsity(self, widths: np.ndarray) -> None:
        if self._initial_widths is None or self._initial_widths.shape != widths.shape:
            try:  # the env's own unpruned widths; else the first widths seen
                initial = self.training_env.get_attr("initial_group_widths", indices=[0])[0]
            except (AttributeError, TypeError):
                initial = widths
            self._initial_widths = np.maximum(np.asarray(initial, dtype=np.float64), 1.0)
        sparsity = 1.0 - widths / self._initial_widths
        self.logger.record("env/group_sparsity", sparsity, exclude=("stdout", "log", "json", "csv"))
