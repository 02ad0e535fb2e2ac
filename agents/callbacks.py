"""SB3 callbacks that bring keepgym's env figures into TensorBoard, for any algorithm.

:class:`EnvInfoCallback` is the one place that turns the ``info`` dicts of ``PruneEnv`` and
``PatchSelectEnv`` into TensorBoard data. It works unchanged with SB3's PPO, SAC, A2C, DQN, with our
``RLPruner`` and ``DDQN``, and with vectorised envs (``DummyVecEnv``, ``SubprocVecEnv``)::

    import gymnasium as gym
    from stable_baselines3 import PPO

    import keepgym  # registers the env ids
    from keepgym.agents.callbacks import EnvInfoCallback

    env = gym.make("RLPrune-Digits-v0", target_sparsity=0.5)
    model = PPO("MlpPolicy", env, tensorboard_log="runs/")
    model.learn(10_000, callback=EnvInfoCallback())

Tags written (``tensorboard --logdir runs``), x axis = the algorithm's ``num_timesteps``:

====================================  =================================================================
``env/<key>``                         every step, each numeric ``info[key]`` of :data:`DEFAULT_INFO_KEYS`
                                      (mean over the envs of a vectorised env that report it):
                                      ``accuracy``, ``macs_ratio``, ``params_ratio``, ``sparsity``,
                                      ``stage`` (pruning); ``kept``, ``loss``, ``step_seconds``,
                                      ``macs_per_image`` (patch selection)
``env/final_<key>``                   at the end of every episode, the last step's value of
                                      :data:`DEFAULT_FINAL_KEYS` (the pruned model's accuracy, ratios)
``env/group_sparsity``                histogram: per-group sparsity ``1 - width / initial width``
``env/widths``                        histogram: per-group widths
``env/group_sparsity_image``          image: bar chart of the per-group sparsity, at each episode end
``config``                            text: the run's config (given, or built from the model and env)
====================================  =================================================================

SB3's own tags (``rollout/ep_rew_mean``, ``train/*``, ``time/*``; ``stage/*`` for ``RLPruner``) are
untouched. The ``env/*`` scalars also go, averaged, into the logger's text outputs (stdout, csv), and
every finished episode's final figures are kept in :attr:`EnvInfoCallback.episodes` for scripts.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import TensorBoardOutputFormat

__all__ = [
    "EnvInfoCallback",
    "DEFAULT_INFO_KEYS",
    "DEFAULT_FINAL_KEYS",
    "read_tensorboard",
    "render_group_sparsity",
]

logger = logging.getLogger(__name__)

#: Scalar ``info`` keys written as ``env/<key>`` on every step that has them.
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

#: Scalar ``info`` keys whose value at an episode's last step is written as ``env/final_<key>``.
DEFAULT_FINAL_KEYS = ("accuracy", "macs_ratio", "params_ratio", "sparsity", "kept", "loss")

#: Hyper-parameter attributes of SB3 algorithms copied into the automatic config text.
_HPARAMS = (
    "learning_rate",
    "n_steps",
    "batch_size",
    "n_epochs",
    "gamma",
    "gae_lambda",
    "clip_range",
    "ent_coef",
    "vf_coef",
    "buffer_size",
    "learning_starts",
    "train_freq",
    "gradient_steps",
    "tau",
    "target_update_interval",
    "exploration_initial_eps",
    "exploration_final_eps",
    "exploration_fraction",
    "sample_num",
    "rounds_per_stage",
    "noise_std",
    "step_length",
    "clip",
    "epsilon",
    "seed",
)

# Histograms and images only make sense in TensorBoard.
_TEXT_FORMATS = ("stdout", "log", "json", "csv")


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float | np.number)
        and not isinstance(value, bool | np.bool_)
        and math.isfinite(float(value))
    )


def _jsonable(value: Any) -> Any:
    """``value`` as something ``json.dumps`` writes readably (numbers, strings, lists, dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


def render_group_sparsity(sparsity: Sequence[float], title: str = "") -> np.ndarray | None:
    """Bar chart of per-group sparsity as an ``HWC`` uint8 image (None when matplotlib is missing).

    Args:
        sparsity: Sparsity of each coupling group, in [0, 1].
        title: Chart title.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a declared dependency
        logger.warning("matplotlib is not installed: the group sparsity image is not logged")
        return None
    values = np.asarray(sparsity, dtype=np.float64)
    fig = Figure(figsize=(6, 2.5), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar(np.arange(len(values)), values, color="tab:orange")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("coupling group")
    ax.set_ylabel("sparsity")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def read_tensorboard(logdir: str | Path) -> Any:
    """Load every event of the TensorBoard run folder ``logdir`` (no sampling) for reading back.

    Returns:
        A loaded ``EventAccumulator``: ``.Tags()``, ``.Scalars(tag)`` (``step``, ``value``),
        ``.Histograms(tag)``, ``.Images(tag)``; the ``config`` text is the tensor ``config/text_summary``.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    size = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "compressedHistograms": 0}
    accumulator = EventAccumulator(str(logdir), size_guidance=size)
    accumulator.Reload()
    return accumulator


class EnvInfoCallback(BaseCallback):
    """Write env ``info`` figures to TensorBoard as ``env/*`` tags, for any SB3-style algorithm.

    It reads the step's ``infos`` (one per env; the single ``info`` of ``RLPruner``'s stage loop) after
    every env step. Scalars are written straight to the run's TensorBoard writer at the current
    ``num_timesteps``, so the curves have one point per step whatever the algorithm's logging interval,
    and are also averaged into the logger's text outputs at its next dump. Without a TensorBoard folder
    the text outputs still get them.

    Args:
        keys: Scalar info keys to write as ``env/<key>`` (missing or non-finite values are skipped).
        final_keys: Scalar info keys whose value at the last step of an episode is written as
            ``env/final_<key>`` and stored in :attr:`episodes`.
        histogram_keys: Info keys holding per-group arrays, written as histograms ``env/<key>``;
            ``widths`` is also turned into the per-group sparsity histogram ``env/group_sparsity``
            against the env's ``initial_group_widths`` (or the first widths seen).
        config: The run's settings, written once as the TensorBoard text ``config``. None builds one
            from the algorithm (class, hyper-parameters) and the env (id, keyword arguments).
        log_interval: Write per-step scalars and histograms every this many calls (1 = every step).
        image_interval: Write the ``env/group_sparsity_image`` bar chart every this many finished
            episodes (0 = never). It is also written at the end of training.
        verbose: SB3 verbosity.

    Attributes:
        episodes: One dict per finished episode: ``env`` (index in the vectorised env), ``timestep``
            and the ``final_keys`` present in the episode's last ``info`` (plus ``widths`` when given).
    """

    def __init__(
        self,
        keys: Iterable[str] = DEFAULT_INFO_KEYS,
        final_keys: Iterable[str] = DEFAULT_FINAL_KEYS,
        histogram_keys: Iterable[str] = ("widths",),
        config: Mapping[str, Any] | None = None,
        log_interval: int = 1,
        image_interval: int = 1,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        if image_interval < 0:
            raise ValueError(f"image_interval must be >= 0, got {image_interval}")
        self.keys = tuple(keys)
        self.final_keys = tuple(final_keys)
        self.histogram_keys = tuple(histogram_keys)
        self.config = dict(config) if config is not None else None
        self.log_interval = int(log_interval)
        self.image_interval = int(image_interval)
        self.episodes: list[dict[str, Any]] = []
        self._initial_widths: np.ndarray | None = None
        self._last_sparsity: np.ndarray | None = None
        self._image_written_for: int | None = None

    # -- plumbing -------------------------------------------------------------------------------------

    def _writers(self) -> list[Any]:
        """The ``SummaryWriter``s of the algorithm's logger (none without ``tensorboard_log``)."""
        return [f.writer for f in self.logger.output_formats if isinstance(f, TensorBoardOutputFormat)]

    def _step_infos(self) -> tuple[list[dict[str, Any]], list[bool]]:
        """``(infos, dones)`` of the step just taken, for vectorised and single-env loops alike."""
        infos = self.locals.get("infos")
        dones = self.locals.get("dones")
        if infos is None and isinstance(self.locals.get("info"), Mapping):
            # RLPruner's stage loop commits on the single (Monitor-wrapped) env: `info`, `done`.
            infos, dones = [self.locals["info"]], [self.locals.get("done", False)]
        infos = [i for i in (infos or []) if isinstance(i, Mapping)]
        if dones is None:
            dones = [False] * len(infos)
        return infos, [bool(d) for d in np.asarray(dones).reshape(-1)]

    def _scalar(self, tag: str, value: float, writers: list[Any]) -> None:
        for writer in writers:
            writer.add_scalar(tag, value, self.num_timesteps)
        # Text outputs get the average since their last dump; TensorBoard already has every point.
        self.logger.record_mean(tag, value, exclude=("tensorboard",) if writers else None)

    def _default_config(self) -> dict[str, Any]:
        model = self.model
        config: dict[str, Any] = {"algorithm": type(model).__name__}
        policy = getattr(model, "policy", None)
        if policy is not None:
            config["policy"] = type(policy).__name__
        for name in _HPARAMS:
            if hasattr(model, name):
                value = getattr(model, name)
                if callable(value):  # schedules: their value at the start
                    try:
                        value = value(1.0)
                    except TypeError:
                        value = repr(value)
                config[name] = value
        venv = self.training_env
        config["num_envs"] = int(venv.num_envs)
        config["vec_env"] = type(venv).__name__
        try:
            spec = venv.get_attr("spec", indices=[0])[0]
        except Exception:  # noqa: BLE001 - an env without a spec is fine
            spec = None
        if spec is not None:
            config["env_id"] = spec.id
            config["env_kwargs"] = dict(spec.kwargs)
        return config

    # -- SB3 hooks ------------------------------------------------------------------------------------

    def _on_training_start(self) -> None:
        config = self.config if self.config is not None else self._default_config()
        text = "```\n" + json.dumps(_jsonable(config), indent=2, sort_keys=False) + "\n```"
        for writer in self._writers():
            writer.add_text("config", text, 0)
            writer.flush()

    def _on_step(self) -> bool:
        infos, dones = self._step_infos()
        if not infos:
            return True
        writers = self._writers()
        if self.n_calls % self.log_interval == 0:
            self._write_step(infos, writers)
        for index, (info, done) in enumerate(zip(infos, dones, strict=False)):
            if done:
                self._end_episode(index, info, writers)
        return True

    def _on_rollout_end(self) -> None:
        for writer in self._writers():
            writer.flush()

    def _on_training_end(self) -> None:
        # Flush what the algorithm recorded after its last dump (e.g. PPO's last `train/*`, the env
        # averages of the text outputs), so a short run loses nothing.
        if self.logger.name_to_value:
            self.logger.dump(self.num_timesteps)
        writers = self._writers()
        if (
            self.image_interval > 0
            and self._last_sparsity is not None
            and self._image_written_for != self.num_timesteps
        ):
            self._write_image(self._last_sparsity, writers, "end of training")
        for writer in writers:
            writer.flush()

    # -- what is written ------------------------------------------------------------------------------

    def _write_step(self, infos: list[Mapping[str, Any]], writers: list[Any]) -> None:
        for key in self.keys:
            values = [float(i[key]) for i in infos if _is_number(i.get(key))]
            if values:
                self._scalar(f"env/{key}", float(np.mean(values)), writers)
        for key in self.histogram_keys:
            arrays = [np.asarray(i[key], dtype=np.float64) for i in infos if key in i]
            if not arrays:
                continue
            for writer in writers:
                writer.add_histogram(f"env/{key}", np.concatenate(arrays), self.num_timesteps)
            if key == "widths":
                sparsity = np.concatenate([self._sparsity(a) for a in arrays])
                self._last_sparsity = self._sparsity(arrays[0])
                for writer in writers:
                    writer.add_histogram("env/group_sparsity", sparsity, self.num_timesteps)
        if not writers:  # text outputs only: keep the last histogram for a custom logger
            for key in self.histogram_keys:
                arrays = [np.asarray(i[key], dtype=np.float64) for i in infos if key in i]
                if arrays:
                    self.logger.record(f"env/{key}", np.concatenate(arrays), exclude=_TEXT_FORMATS)

    def _end_episode(self, index: int, info: Mapping[str, Any], writers: list[Any]) -> None:
        record: dict[str, Any] = {"env": index, "timestep": int(self.num_timesteps)}
        for key in self.final_keys:
            if _is_number(info.get(key)):
                record[key] = float(info[key])
                self._scalar(f"env/final_{key}", record[key], writers)
        if "widths" in info:
            widths = np.asarray(info["widths"], dtype=np.float64)
            record["widths"] = [int(w) for w in widths]
            sparsity = self._sparsity(widths)
            self._last_sparsity = sparsity
            if self.image_interval > 0 and (len(self.episodes) + 1) % self.image_interval == 0:
                self._write_image(sparsity, writers, f"episode {len(self.episodes) + 1} (env {index})")
        self.episodes.append(record)

    def _write_image(self, sparsity: np.ndarray, writers: list[Any], title: str) -> None:
        if not writers:
            return
        image = render_group_sparsity(sparsity, title)
        if image is None:
            return
        for writer in writers:
            writer.add_image("env/group_sparsity_image", image, self.num_timesteps, dataformats="HWC")
        self._image_written_for = self.num_timesteps

    def _sparsity(self, widths: np.ndarray) -> np.ndarray:
        """``1 - widths / initial widths`` per group (initial: the env's, else the first widths seen)."""
        if self._initial_widths is None or self._initial_widths.shape != widths.shape:
            initial = widths
            try:
                initial = self.training_env.get_attr("initial_group_widths", indices=[0])[0]
            except Exception:  # noqa: BLE001 - any env without the attribute: fall back to the first seen
                pass
            initial = np.asarray(initial, dtype=np.float64)
            if initial.shape != widths.shape:
                initial = widths
            self._initial_widths = np.maximum(initial, 1.0)
        return np.clip(1.0 - widths / self._initial_widths, 0.0, 1.0)
