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
hparams                               the same config, flattened (:func:`hparams_of`), as the run's
                                      hyper-parameters in TensorBoard's HParams tab, with
                                      :data:`DEFAULT_HPARAM_METRICS` as the metrics to compare runs by
====================================  =================================================================

:class:`PatchEpochCallback` adds per-epoch figures of a ``PatchSelectEnv`` run (``epoch/*``, ``eval/*`` and a
grid image of the kept patches); :class:`EpochCheckpointCallback` checkpoints such a run at every epoch end
(``eval/*`` too) and :func:`load_epoch_checkpoint` resumes it exactly; :class:`NamedProgressBar` is SB3's
progress bar naming what it counts.
The README's TensorBoard table lists every tag of every command.

SB3's own tags (``rollout/ep_rew_mean``, ``train/*``, ``time/*``; ``stage/*`` for ``RLPruner``) are
untouched. The ``env/*`` scalars also go, averaged, into the logger's text outputs (stdout, csv), and
every finished episode's final figures are kept in :attr:`EnvInfoCallback.episodes` for scripts.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ProgressBarCallback
from stable_baselines3.common.logger import Image, TensorBoardOutputFormat
from stable_baselines3.common.type_aliases import MaybeCallback

from keepgym.agents.serialization import load_replay_buffer, load_sb3_agent, save_replay_buffer
from keepgym.models.checkpoints import global_rng_state, retain_checkpoints, set_global_rng_state, write_dir_atomically
from keepgym.models.serialization import atomic_save

__all__ = [
    "CHECKPOINT_STATE_FILE",
    "EnvInfoCallback",
    "EpochCheckpointCallback",
    "PatchEpochCallback",
    "StageCheckpointCallback",
    "NamedProgressBar",
    "DEFAULT_INFO_KEYS",
    "DEFAULT_FINAL_KEYS",
    "DEFAULT_HPARAM_METRICS",
    "hparams_of",
    "load_epoch_checkpoint",
    "load_stage_checkpoint",
    "read_tensorboard",
    "render_group_sparsity",
    "render_kept_patches",
    "with_progress_bar",
    "write_hparams",
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

#: Scalar tags offered as metrics in TensorBoard's HParams tab (those a run lacks stay blank there).
DEFAULT_HPARAM_METRICS = (
    "env/final_accuracy",
    "env/final_macs_ratio",
    "env/final_params_ratio",
    "stage/reward",
    "eval/val_accuracy_agent",
    "eval/val_accuracy_full",
    "rollout/ep_rew_mean",
)

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


def hparams_of(config: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """``config`` flattened for TensorBoard's HParams tab: nested keys joined by ``.``, numbers, strings
    and booleans kept, None as ``"None"``, anything else (lists, paths) as its JSON text."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(hparams_of(value, prefix=f"{name}."))
        elif isinstance(value, np.generic):
            flat[name] = value.item()
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = "None" if value is None else json.dumps(_jsonable(value))
    return flat


def write_hparams(writer: Any, config: Mapping[str, Any], metrics: Iterable[str] = DEFAULT_HPARAM_METRICS) -> None:
    """Write ``config`` as the hyper-parameters of ``writer``'s run (TensorBoard's HParams tab), with
    ``metrics`` (scalar tags of the same run) as the columns to compare runs by."""
    from torch.utils.tensorboard.summary import hparams

    metric_dict = {tag: 0.0 for tag in metrics}  # names only: the tab reads the values from the scalars
    for summary in hparams(hparams_of(config), metric_dict):
        writer.file_writer.add_summary(summary)


def render_kept_patches(images: np.ndarray, keep: Sequence[Sequence[int]], patch_size: int) -> np.ndarray:
    """A grid image of which patches were kept: the images on top, below them the same images with the
    dropped patches dimmed and the kept ones framed in green. ``HWC`` uint8.

    Args:
        images: ``(B, C, H, W)`` uint8 images (1 or 3 channels).
        keep: Kept patch indices of each image (row-major patch order).
        patch_size: Patch side in pixels.
    """
    x = np.asarray(images, dtype=np.float32) / 255.0
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    x = x[:, :3].transpose(0, 2, 3, 1)  # B, H, W, 3
    b, h, w, _ = x.shape
    scale = max(1, 64 // max(h, w))  # nearest-neighbour upscaling so tiny digits stay visible
    grid_w = w // patch_size
    tiles_top, tiles_bottom = [], []
    for j in range(b):
        img = x[j]
        shade = np.full((h // patch_size, grid_w), 0.2, dtype=np.float32)
        for idx in keep[j]:
            shade[int(idx) // grid_w, int(idx) % grid_w] = 1.0
        mask = np.kron(shade, np.ones((patch_size, patch_size), dtype=np.float32))
        mask = np.pad(mask, ((0, h - mask.shape[0]), (0, w - mask.shape[1])), constant_values=0.2)
        kept = img * mask[..., None]
        big = np.kron(kept, np.ones((scale, scale, 1), dtype=np.float32))
        p = patch_size * scale
        for idx in keep[j]:
            r, c = (int(idx) // grid_w) * p, (int(idx) % grid_w) * p
            big[r, c : c + p] = big[r + p - 1, c : c + p] = (0.0, 1.0, 0.0)
            big[r : r + p, c] = big[r : r + p, c + p - 1] = (0.0, 1.0, 0.0)
        tiles_top.append(np.kron(img, np.ones((scale, scale, 1), dtype=np.float32)))
        tiles_bottom.append(big)
    gap = np.ones((h * scale, 2, 3), dtype=np.float32)

    def row(tiles: list[np.ndarray]) -> np.ndarray:
        parts: list[np.ndarray] = []
        for tile in tiles:
            parts += [tile, gap]
        return np.concatenate(parts[:-1], axis=1)

    sep = np.ones((2, row(tiles_top).shape[1], 3), dtype=np.float32)
    grid = np.concatenate([row(tiles_top), sep, row(tiles_bottom)], axis=0)
    return np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)


class NamedProgressBar(ProgressBarCallback):
    """SB3's progress bar (count, rate, elapsed and ETA) that says what it counts.

    Args:
        desc: What runs (shown left of the bar), e.g. ``"RLPruner"``.
        unit: What one step is, e.g. ``"stage"``, ``"ViT step"``.
    """

    def __init__(self, desc: str = "", unit: str = "step") -> None:
        super().__init__()
        self.desc = desc
        self.unit = unit

    def _on_training_start(self) -> None:
        from stable_baselines3.common.callbacks import tqdm

        total = self.locals["total_timesteps"] - self.model.num_timesteps
        self.pbar = tqdm(total=total, desc=f"{self.desc} ({self.unit}s)" if self.desc else None, unit=self.unit)


def with_progress_bar(callback: MaybeCallback, desc: str, unit: str) -> BaseCallback:
    """``callback`` (None, one, a list or a function, as ``learn`` takes it) plus a :class:`NamedProgressBar`."""
    from stable_baselines3.common.callbacks import ConvertCallback

    if callback is None:
        callbacks: list[BaseCallback] = []
    elif isinstance(callback, list):
        callbacks = list(callback)
    elif isinstance(callback, BaseCallback):
        callbacks = [callback]
    else:
        callbacks = [ConvertCallback(callback)]
    return CallbackList([*callbacks, NamedProgressBar(desc, unit)])


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
        hparam_metrics: Scalar tags shown as metrics beside the config in TensorBoard's HParams tab
            (the config, flattened by :func:`hparams_of`, is written as the run's hyper-parameters).
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
        hparam_metrics: Iterable[str] = DEFAULT_HPARAM_METRICS,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.hparam_metrics = tuple(hparam_metrics)
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
            write_hparams(writer, config, self.hparam_metrics)
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


class PatchEpochCallback(BaseCallback):
    """Per-epoch TensorBoard figures of a ``PatchSelectEnv`` run (one episode = one ViT epoch).

    At the end of every epoch (the step whose ``dones`` is set) it writes, at the algorithm's
    ``num_timesteps``:

    ====================================  =============================================================
    ``epoch/train_loss``                  mean ``info["loss"]`` of the epoch's ViT steps
    ``epoch/kept_patches``                mean ``info["kept"]`` (patches per image) over the epoch
    ``epoch/images_per_second``           training images per second over the epoch (ViT + agent)
    ``epoch/exploration_rate``            the agent's ``exploration_rate`` (DQN-style agents)
    ``epoch/index``                       the env's epoch counter at the end of the epoch
    ``epoch/kept_patches_image``          image: ``num_images`` fixed validation images, and below them
                                          the patches the agent keeps (others dimmed, kept framed)
    ``eval/val_accuracy_agent``           with ``evaluate=True``: validation accuracy with the agent's
    ``eval/val_accuracy_full``            patches, with all patches, and the agent's mean kept patches
    ``eval/val_kept_patches``             (``EpochCheckpointCallback`` writes them too)
    ====================================  =============================================================

    Works with a single env or a ``DummyVecEnv`` (it reads env 0's ``unwrapped`` env).

    Args:
        num_images: Validation images shown in the patch grid (the first ones of the split; 0 = none).
        evaluate: Also score the validation split with and without the agent's selection.
        verbose: SB3 verbosity.
    """

    def __init__(self, num_images: int = 8, evaluate: bool = True, verbose: int = 0) -> None:
        super().__init__(verbose)
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        self.num_images = int(num_images)
        self.evaluate = bool(evaluate)
        self.epochs_logged = 0
        self._losses: list[float] = []
        self._kept: list[float] = []
        self._steps = 0
        self._start = 0.0

    def _core(self) -> Any:
        return self.training_env.get_attr("unwrapped", indices=[0])[0]

    def _on_training_start(self) -> None:
        self._start = time.perf_counter()

    def _on_step(self) -> bool:
        infos = self.locals.get("infos") or []
        dones = np.asarray(self.locals.get("dones", [False])).reshape(-1)
        if infos and isinstance(infos[0], Mapping):
            info = infos[0]
            if _is_number(info.get("loss")):
                self._losses.append(float(info["loss"]))
            if _is_number(info.get("kept")):
                self._kept.append(float(info["kept"]))
            self._steps += 1
        if dones.size and bool(dones[0]):
            self._end_epoch()
        return True

    def _end_epoch(self) -> None:
        core = self._core()
        seconds = max(time.perf_counter() - self._start, 1e-9)
        self.epochs_logged += 1
        record = self.logger.record
        record("epoch/index", int(getattr(core, "epoch", self.epochs_logged)))
        if self._losses:
            record("epoch/train_loss", float(np.mean(self._losses)))
        if self._kept:
            record("epoch/kept_patches", float(np.mean(self._kept)))
        record("epoch/images_per_second", self._steps * int(getattr(core, "batch_size", 1)) / seconds)
        if _is_number(getattr(self.model, "exploration_rate", None)):
            record("epoch/exploration_rate", float(self.model.exploration_rate))
        with torch.random.fork_rng(devices=[]):  # figures only: the training run's randomness is untouched
            if self.evaluate:
                full = core.evaluate(None, "val")
                chosen = core.evaluate_policy(self.model, "val")
                record("eval/val_accuracy_full", full["accuracy"])
                record("eval/val_accuracy_agent", chosen["accuracy"])
                record("eval/val_kept_patches", chosen["kept_patches"])
            image = self._patch_image(core) if self._has_tensorboard() else None
        if image is not None:
            record("epoch/kept_patches_image", Image(image, "HWC"), exclude=_TEXT_FORMATS)
        self.logger.dump(step=self.num_timesteps)
        self._losses, self._kept, self._steps = [], [], 0
        self._start = time.perf_counter()

    def _has_tensorboard(self) -> bool:
        return self.num_images > 0 and any(isinstance(f, TensorBoardOutputFormat) for f in self.logger.output_formats)

    @torch.no_grad()
    def _patch_image(self, core: Any) -> np.ndarray | None:
        vit = core.vit
        x_u8, _ = core.data.split("val")
        x_u8 = x_u8[: min(self.num_images, int(getattr(core, "batch_size", self.num_images)))]
        if len(x_u8) == 0:
            return None
        device = next(vit.parameters()).device
        was_training = vit.training
        vit.eval()
        try:
            keep = core.choose_patches(self.model, core.data.normalize(x_u8.to(device)))
        finally:
            vit.train(was_training)
        if keep is None:
            keep = torch.arange(vit.num_patches)
        keep = keep.cpu()
        if keep.dim() == 1:  # one set for the batch (mask mode)
            keep = keep.unsqueeze(0).expand(len(x_u8), -1)
        return render_kept_patches(x_u8.cpu().numpy(), keep.tolist(), int(vit.patch_size))


#: The file that marks a complete :class:`EpochCheckpointCallback` folder (written last).
CHECKPOINT_STATE_FILE = "state.pt"


class _FolderCheckpointCallback(BaseCallback):
    """Numbered checkpoint folders under ``path``, the newest ``keep_last`` kept; ``save=False`` writes none."""

    def __init__(self, path: str | Path, keep_last: int, save: bool, verbose: int) -> None:
        super().__init__(verbose)
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.path = Path(path)
        self.keep_last = int(keep_last)
        self.save = bool(save)


def _completed_epochs(core: Any) -> int:
    """Epochs of the env's run completed so far (warm-up included), between two steps."""
    return core.epoch if core.epoch_step < core.steps_per_epoch else core.epoch + 1


class EpochCheckpointCallback(_FolderCheckpointCallback):
    """Checkpoint (and score) a ``PatchSelectEnv`` run at the end of every epoch, for an exact resume.

    At the first rollout start after an epoch ended (after the epoch's last transition is stored and
    its gradient step taken; SB3's ``on_step`` comes before both) and once more when ``learn`` ends,
    it writes ``path/NNNN/`` (``NNNN`` = epochs completed, warm-up included) atomically
    (:func:`keepgym.models.checkpoints.write_dir_atomically`) and keeps the newest ``keep_last``:

    * ``agent.zip``: the agent's own ``save`` (pickle-free), ``replay_buffer.npz`` (off-policy agents,
      :func:`keepgym.agents.serialization.save_replay_buffer`);
    * ``state.pt`` (written last; ``torch.load(weights_only=True)``): the env's public ``state_dict()``
      (ViT, optimiser, data order, RNG), :func:`keepgym.models.checkpoints.global_rng_state`, the agent's
      action-space RNG, ``epoch``, ``num_timesteps``, ``train_seconds`` and ``finished`` (True for the
      folder written when ``learn`` reached its total).

    :func:`load_epoch_checkpoint` puts all of it back, so ``learn`` continues bit for bit.

    With ``evaluate=True`` it first writes ``eval/val_accuracy_full``, ``eval/val_accuracy_agent``,
    ``eval/val_kept_patches`` and ``eval/epoch`` (the env's own ``evaluate``/``evaluate_policy`` on the
    validation split, RNGs untouched), the last epoch's too. :attr:`train_seconds` is the wall time since
    this callback was made (make it right before ``learn``: the first reset, warm-up included, happens
    before ``learn`` starts its callbacks) without this callback's own work, plus ``train_seconds`` of the
    run resumed.

    Args:
        path: Folder of the numbered checkpoint folders.
        keep_last: Checkpoints kept (the newest).
        evaluate: Score the validation split at every epoch end.
        save: Write files (False on data-parallel ranks other than 0, which only keep step).
        train_seconds: Training time already spent by the run being resumed.
        write_extra: ``fn(tmp_folder, epoch)`` called before ``state.pt`` is written, to add files.
        verbose: SB3 verbosity.
    """

    def __init__(
        self,
        path: str | Path,
        keep_last: int = 2,
        evaluate: bool = True,
        save: bool = True,
        train_seconds: float = 0.0,
        write_extra: Callable[[Path, int], None] | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(path, keep_last, save, verbose)
        self.evaluate = bool(evaluate)
        self.write_extra = write_extra
        self.last_epoch: int | None = None  # epoch of the newest checkpoint written
        self.last_checkpoint: Path | None = None
        self._before = float(train_seconds)
        self._start = time.perf_counter()
        self._excluded = 0.0
        self._epoch_ended = False
        self._total: int | None = None

    @property
    def train_seconds(self) -> float:
        """Seconds spent in ``learn`` so far (this callback's own work excluded), resumed runs included."""
        return self._before + (time.perf_counter() - self._start) - self._excluded

    def _core(self) -> Any:
        return self.training_env.get_attr("unwrapped", indices=[0])[0]

    def _on_training_start(self) -> None:
        self._total = self.locals.get("total_timesteps")
        # A run resumed in the middle of an epoch (A2C's short rollouts) is not at an episode start.
        starts = getattr(self.model, "_last_episode_starts", None)
        if starts is not None and self._core().epoch_step > 0:
            self.model._last_episode_starts = np.zeros_like(starts)

    def _on_step(self) -> bool:
        if np.any(self.locals.get("dones", False)):
            self._epoch_ended = True
        return True

    def _on_rollout_start(self) -> None:
        if self._epoch_ended:
            self._end_epoch(finished=False)

    def _on_training_end(self) -> None:
        finished = self._total is not None and self.num_timesteps >= self._total
        if self._epoch_ended or finished:
            self._end_epoch(finished=finished)

    def _end_epoch(self, finished: bool) -> None:
        self._epoch_ended = False
        start = time.perf_counter()
        core = self._core()
        epoch = _completed_epochs(core)
        if self.save:
            if self.evaluate and epoch != self.last_epoch:
                self._log_validation(core, epoch)
            self.last_checkpoint = self._write(core, epoch, finished)
        self.last_epoch = epoch
        self._excluded += time.perf_counter() - start

    def _log_validation(self, core: Any, epoch: int) -> None:
        with torch.random.fork_rng(devices=[]):
            full = core.evaluate(None, "val")
            chosen = core.evaluate_policy(self.model, "val")
        self.logger.record("eval/val_accuracy_full", full["accuracy"])
        self.logger.record("eval/val_accuracy_agent", chosen["accuracy"])
        self.logger.record("eval/val_kept_patches", chosen["kept_patches"])
        self.logger.record("eval/epoch", epoch)
        self.logger.dump(step=self.num_timesteps)

    def _write(self, core: Any, epoch: int, finished: bool) -> Path:
        agent = self.model
        state = {
            "env": core.state_dict(),
            "rng": global_rng_state(),
            "action_space_rng": copy.deepcopy(agent.action_space.np_random.bit_generator.state),
            "epoch": epoch,
            "num_timesteps": int(agent.num_timesteps),
            "train_seconds": self.train_seconds,
            "finished": finished,
        }

        def write(tmp: Path) -> None:
            agent.save(tmp / "agent.zip")
            if getattr(agent, "replay_buffer", None) is not None:  # arrays in an .npz: SB3's would pickle
                save_replay_buffer(agent, tmp / "replay_buffer.npz")
            if self.write_extra is not None:
                self.write_extra(tmp, epoch)
            atomic_save(state, tmp / CHECKPOINT_STATE_FILE)

        final = write_dir_atomically(self.path / f"{epoch:04d}", write)
        retain_checkpoints(self.path, self.keep_last, CHECKPOINT_STATE_FILE)
        return final


def load_epoch_checkpoint(
    folder: str | Path, agent_class: type, env: Any, device: str = "cpu", map_location: Any = None
) -> tuple[Any, dict[str, Any]]:
    """Rebuild the agent of an :class:`EpochCheckpointCallback` folder and queue the env's state.

    Loads ``agent.zip`` (pickle-free, :func:`keepgym.agents.serialization.load_sb3_agent`) around ``env``
    and its replay buffer, puts back the global and action-space RNGs, and hands the env's
    ``state_dict`` to the agent's next reset (``VecEnv.set_options({"state_dict": ...})``, which
    ``PatchSelectEnv.reset`` loads with ``load_state_dict``). Then ``agent.learn(rest,
    reset_num_timesteps=False)`` continues the run bit for bit.

    Args:
        folder: One ``NNNN`` checkpoint folder.
        agent_class: The agent's class (``DDQN``, SB3's ``DQN``/``PPO``/``A2C``, ...).
        env: The env the agent acts in (a ``PatchSelectEnv`` built with the run's settings).
        device: The agent's device.
        map_location: ``torch.load``'s, for the env state's tensors.

    Returns:
        The agent and the folder's state (``epoch``, ``num_timesteps``, ``train_seconds``, ``finished``,
        ``env``: the env's ``state_dict``).
    """
    folder = Path(folder)
    state = torch.load(folder / CHECKPOINT_STATE_FILE, map_location=map_location, weights_only=True)
    agent = load_sb3_agent(agent_class, folder / "agent.zip", env=env, device=device)
    if getattr(agent, "replay_buffer", None) is not None and (folder / "replay_buffer.npz").exists():
        load_replay_buffer(agent, folder / "replay_buffer.npz")
    set_global_rng_state(state["rng"])
    agent.action_space.np_random.bit_generator.state = state["action_space_rng"]
    agent.get_env().set_options({"state_dict": state["env"]})
    agent._last_obs = None  # SB3's learn() resets (i.e. restores) the env when it holds no observation
    return agent, state


class StageCheckpointCallback(_FolderCheckpointCallback):
    """Writes ``<path>/NNN/`` after every committed stage of a ``PruneEnv`` run (one timestep = one stage).

    Each folder holds ``state.pt`` (``env.unwrapped.state_dict()``: pruned model, counters, ranking, RNG and
    the recovery with its teacher; the global RNG states; ``extra_state()``), ``model.pt`` (the pruned model,
    :func:`keepgym.models.save_model`) and ``agent.zip`` (``agent.save``), all readable with
    ``torch.load(weights_only=True)``. It is written to a temporary folder and renamed
    (:func:`keepgym.models.checkpoints.write_dir_atomically`), so a kill never leaves half a checkpoint; the
    newest ``keep_last`` are kept. :func:`load_stage_checkpoint` resumes from the newest one, bit for bit.

    It also writes ``kd/val_accuracy``, ``kd/macs_ratio``, ``kd/sparsity`` (the recovery's last stage record)
    and ``kd/teacher_val_accuracy`` and dumps the logger at every stage.

    Args:
        path: Folder of the numbered stage folders.
        keep_last: Checkpoints kept (the newest).
        extra_state: ``fn() -> dict`` of plain values saved under ``"extra"`` (e.g. the run's wall time).
        on_checkpoint: ``fn(stage)`` called after each complete checkpoint (progress bars, tests).
        save: Write files (False on data-parallel ranks other than 0).
        verbose: SB3 verbosity.
    """

    def __init__(
        self,
        path: str | Path,
        keep_last: int = 2,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
        save: bool = True,
        verbose: int = 0,
    ) -> None:
        super().__init__(path, keep_last, save, verbose)
        self.extra_state = extra_state
        self.on_checkpoint = on_checkpoint

    def _raw_env(self) -> Any:
        venv = self.training_env.unwrapped if hasattr(self.training_env, "unwrapped") else self.training_env
        return venv.envs[0].unwrapped

    def _on_step(self) -> bool:
        raw = self._raw_env()
        stage = int(raw.stage)
        recovery = getattr(raw, "recovery", None)
        records = getattr(recovery, "stage_records", None) or [{}]
        for key in ("val_accuracy", "macs_ratio", "sparsity"):
            if records[-1].get(key) is not None:
                self.logger.record(f"kd/{key}", float(records[-1][key]))
        if getattr(recovery, "teacher_val", None) is not None:
            self.logger.record("kd/teacher_val_accuracy", float(recovery.teacher_val))
        self.logger.dump(step=self.num_timesteps)
        if self.save:

            def write(tmp: Path) -> None:
                if getattr(raw.model, "keepgym_spec", None) is not None:  # a model file needs a rebuild recipe
                    raw.save(tmp / "model.pt")
                self.model.save(tmp / "agent.zip")
                extra = self.extra_state() if self.extra_state is not None else {}
                state = {"stage": stage, "env": raw.state_dict(), "rng": global_rng_state(), "extra": extra}
                atomic_save(state, tmp / CHECKPOINT_STATE_FILE)

            write_dir_atomically(self.path / f"{stage:03d}", write)
            retain_checkpoints(self.path, self.keep_last, CHECKPOINT_STATE_FILE)
        if self.on_checkpoint is not None:
            self.on_checkpoint(stage)
        return True


def load_stage_checkpoint(
    path: str | Path, env: Any, agent_class: type, seed: int | None = None, **load_kwargs: Any
) -> tuple[Any, dict[str, Any]] | None:
    """Resume from the newest complete :class:`StageCheckpointCallback` folder under ``path``.

    Resets ``env`` (``seed``; through its wrappers, which refuse a step before their own reset), loads the
    env's state (``env.unwrapped.load_state_dict``), the agent (``agent_class.load(..., env=env,
    force_reset=False, **load_kwargs)``) and then the global RNGs (after the load, which reseeds them).

    Returns:
        ``(agent, state)`` (``state["stage"]``, ``state["extra"]``), or None if there is no complete checkpoint.
    """
    from keepgym.models import load_model
    from keepgym.models.checkpoints import complete_checkpoints
    from keepgym.models.serialization import ModelLoadError

    complete = complete_checkpoints(Path(path), CHECKPOINT_STATE_FILE)
    if not complete:
        return None
    last = complete[-1]
    try:
        state = torch.load(last / CHECKPOINT_STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything but tensors and plain values, zip errors, ...
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ModelLoadError(f"{last / CHECKPOINT_STATE_FILE}: not a readable stage checkpoint: {reason}") from None
    if (last / "model.pt").exists():  # the model file beside it must be the same model (not edited or mixed up)
        saved = load_model(last / "model.pt").state_dict()
        weights = state["env"]["model"]
        if saved.keys() != weights.keys() or any(not torch.equal(saved[k], weights[k]) for k in saved):
            raise ModelLoadError(f"{last / 'model.pt'}: does not match {CHECKPOINT_STATE_FILE} beside it")
    env.reset(seed=seed)
    env.unwrapped.load_state_dict(state["env"])
    agent = agent_class.load(last / "agent.zip", env=env, force_reset=False, **load_kwargs)
    set_global_rng_state(state["rng"])
    return agent, state
