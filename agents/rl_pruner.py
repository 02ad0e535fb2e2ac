"""RL-Pruner: a noisy search over the layer (coupling-group) sparsity distribution, on SB3's base classes.

RL-Pruner (Wang et al., 2024, "RL-Pruner: Structured Pruning Using Reinforcement Learning for CNN
Compression and Acceleration", https://arxiv.org/abs/2411.06463; reference code ``Beryex/RLPruner-CNN``)
prunes a CNN in *stages*. Its policy is a distribution ``pi`` over the prunable groups: the share of the
stage's channel budget that each group gives. Per stage it

1. samples ``K = sample_num`` candidate distributions around ``pi`` for ``E = rounds_per_stage`` rounds,
   ``a = normalise(max(pi + sigma * u * z, min_prob))`` with ``z ~ N(0, I)`` and one ``u ~ U(0, 1)`` per
   candidate, and scores each with the env *without committing* (``env.unwrapped.evaluate_many``);
2. keeps the top ``archive_size`` candidates of the stage (the reference's "replay buffer", really an
   elite archive) and, after every round that improved on the stage's best, moves ``pi`` a step
   ``step_length`` toward the best archived candidate with the per-coordinate ratio ``pi_new / pi``
   clipped to ``[1 - clip, 1 + clip]`` (the reference calls this the "PPO" step);
3. commits one archived candidate with ``env.step``: the best, or with probability ``epsilon_t`` a
   uniformly random one, ``epsilon_t`` decaying to 0 over the first ``exploration_fraction`` of stages.

There is no gradient and no learned value: it is an elitist evolution strategy with a trust region,
named here after the paper. Departures from the reference code, all deliberate:

* the update never mutates ``pi`` in place before the ratio is taken (reference bug: the ratio was
  computed against an already modified baseline);
* the collapse guard (re-search a stage whose chosen candidate lost more than ``collapse_threshold`` of
  the accuracy, relative) runs *before* committing, so nothing has to be undone, and the accuracy
  carried to the next stage is the one actually committed (reference bug: the rejected model's);
* ``noise="relative"`` scales the noise by ``pi`` (times the number of active groups, so that the
  average scale equals the absolute one at a uniform ``pi``). The reference's absolute noise perturbs
  deep networks (many small entries) far more than shallow ones; it remains the default for fidelity.

How the agent reaches the env
-----------------------------
SB3 wraps the env given to the constructor in ``Monitor`` and ``DummyVecEnv``. The search needs the
raw env's non-committing API, so the agent requires exactly one env in a plain ``DummyVecEnv`` (no
``VecEnvWrapper`` such as ``VecNormalize``, no ``SubprocVecEnv``) and uses ``self.env.envs[0].unwrapped``.
Stages are committed through ``self.env.envs[0]`` (so ``Monitor`` records the episodes), **not**
through the ``DummyVecEnv``, which would reset the env as soon as an episode ends: after ``learn``
finishes on a terminal stage, ``model.env.envs[0].unwrapped`` still holds the final pruned model. The
next episode is started by ``learn`` only if timesteps remain.

The env must provide (``PruneEnv`` does): ``evaluate(action) -> (reward, info)``, ``evaluate_many(actions)``
(optional; ``evaluate`` is looped otherwise), ``group_widths``, ``initial_group_widths``,
``prunable_mask()``, ``num_stages``, ``stage``; ``info["accuracy"]`` from ``evaluate``/``step`` (collapse
guard) and the last observation entry = the last validation accuracy. ``lookahead_depth > 1`` also needs
``snapshot()`` and ``restore(snapshot)``.

One timestep of ``learn`` is one committed stage.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import Image, TensorBoardOutputFormat
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnvWrapper

from keepgym.agents.callbacks import with_progress_bar
from keepgym.agents.serialization import SafeSaveMixin

__all__ = ["PruneDistributionPolicy", "RLPruner", "StagedPrunerBase", "normalise_distribution", "width_proportional"]

logger = logging.getLogger(__name__)

SelfStagedPruner = TypeVar("SelfStagedPruner", bound="StagedPrunerBase")

#: Keys excluded from text outputs: histograms and images only make sense in TensorBoard.
_TB_ONLY = ("stdout", "log", "json", "csv")
_NOISE_LAWS = ("absolute", "relative")
_SCHEDULES = ("cosine", "linear", "constant")


# ----------------------------------------------------------------------------------------------------------
# Pure helpers (numpy): the maths of the algorithm, testable on their own.
# ----------------------------------------------------------------------------------------------------------


def normalise_distribution(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Zero the entries outside ``mask`` and rescale to sum 1 (uniform over ``mask`` if nothing is left)."""
    x = np.asarray(x, dtype=np.float64).copy()
    if mask is not None:
        x[~mask] = 0.0
    total = x.sum()
    if total <= 0.0 or not np.isfinite(total):
        x = np.ones_like(x) if mask is None else mask.astype(np.float64)
        total = x.sum()
        if total == 0.0:
            return x
    return x / total


def width_proportional(widths: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference's initial distribution: ``pi_g`` proportional to the width of group ``g``."""
    return normalise_distribution(np.asarray(widths, dtype=np.float64), mask)


def _perturb(
    pi: np.ndarray,
    mask: np.ndarray,
    u: np.ndarray,
    z: np.ndarray,
    noise_std: float,
    noise: str,
    min_prob: float,
) -> np.ndarray:
    """Candidates ``normalise(mask * max(pi + sigma * u * z * scale, min_prob))``, one per row of ``z``.

    Args:
        pi: The distribution, shape ``(G,)``.
        mask: Groups that may receive budget, shape ``(G,)``.
        u: One ``U(0, 1)`` draw per candidate, shape ``(K,)``.
        z: Standard normal draws, shape ``(K, G)``.
        noise_std: ``sigma`` (a standard deviation scale, the reference's misnamed ``noise_var``).
        noise: ``"absolute"`` (``scale = 1``) or ``"relative"`` (``scale = pi * n_active``).
        min_prob: Floor applied before normalising.

    Returns:
        Array ``(K, G)`` of distributions, 0 outside ``mask``.
    """
    scale = 1.0 if noise == "absolute" else pi * max(int(mask.sum()), 1)
    # a = pi + sigma * u * z: u shrinks the whole candidate's noise, z perturbs each group independently.
    raw = pi[None, :] + noise_std * u[:, None] * z * scale
    # Floor at min_prob so every active group stays reachable, then project back onto the simplex.
    raw = np.maximum(raw, min_prob)
    raw[:, ~mask] = 0.0
    return raw / raw.sum(axis=1, keepdims=True)


def _epsilon(stage: int, num_stages: int, epsilon0: float, fraction: float, schedule: str) -> float:
    """Commit-time exploration rate after ``stage`` committed stages of ``num_stages``.

    ``cosine``: ``eps0 * (1 + cos(pi * t / (f * T))) / 2``; ``linear``: ``eps0 * (1 - t / (f * T))``;
    ``constant``: ``eps0``; all three for ``t <= f * T`` and 0 afterwards (reference ``step()``).
    """
    horizon = fraction * num_stages
    if stage > horizon or epsilon0 <= 0.0:
        return 0.0
    if horizon <= 0.0:
        # t = 0 <= horizon = 0: only the very first stage explores (as the reference for tiny T).
        return float(epsilon0)
    if schedule == "cosine":
        return float(epsilon0 * 0.5 * (1.0 + math.cos(math.pi * stage / horizon)))
    if schedule == "linear":
        return float(epsilon0 * max(0.0, 1.0 - stage / horizon))
    return float(epsilon0)


@dataclass
class _Candidate:
    """One scored candidate of a stage: value (reward plus lookahead), reward, action and env info."""

    value: float
    reward: float
    action: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class _EliteArchive:
    """Top-``capacity`` candidates of a stage by value (the reference's "replay buffer").

    A new candidate enters when the archive is not full or its value is >= the current minimum (then
    it replaces the minimum), as in the reference. Ties for the best go to the earliest candidate.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._items: list[tuple[int, _Candidate]] = []
        self._counter = 0

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def add(self, candidate: _Candidate) -> bool:
        """Offer a candidate; return whether it was kept."""
        self._counter += 1
        if len(self._items) < self.capacity:
            self._items.append((self._counter, candidate))
            return True
        worst = min(range(len(self._items)), key=lambda i: (self._items[i][1].value, -self._items[i][0]))
        if candidate.value >= self._items[worst][1].value:
            self._items[worst] = (self._counter, candidate)
            return True
        return False

    def best(self) -> _Candidate:
        """Highest value, earliest on ties."""
        if not self._items:
            raise IndexError("the archive is empty")
        return max(self._items, key=lambda item: (item[1].value, -item[0]))[1]

    def sample(self, rng: np.random.Generator) -> _Candidate:
        """A uniformly random archived candidate (in insertion order, so seeded runs are reproducible)."""
        if not self._items:
            raise IndexError("the archive is empty")
        ordered = sorted(self._items, key=lambda item: item[0])
        return ordered[int(rng.integers(len(ordered)))][1]

    def candidates(self) -> list[_Candidate]:
        """Archived candidates, best first."""
        return [c for _, c in sorted(self._items, key=lambda item: (-item[1].value, item[0]))]


def _render_distribution(
    distribution: np.ndarray, group_sparsity: np.ndarray, title: str
) -> np.ndarray | None:
    """Bar charts of ``pi`` and of each group's sparsity as an ``HWC`` uint8 image (None: no matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a declared dependency
        logger.warning("matplotlib is not installed: the distribution image is not logged")
        return None
    groups = np.arange(len(distribution))
    fig = Figure(figsize=(8, 4), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax_pi, ax_sp = fig.subplots(2, 1, sharex=True)
    ax_pi.bar(groups, distribution, color="tab:blue")
    ax_pi.set_ylabel("share of budget")
    ax_pi.set_title(title)
    ax_sp.bar(groups, group_sparsity, color="tab:orange")
    ax_sp.set_ylabel("group sparsity")
    ax_sp.set_xlabel("coupling group")
    ax_sp.set_ylim(0.0, 1.0)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ----------------------------------------------------------------------------------------------------------
# Policy
# ----------------------------------------------------------------------------------------------------------


class PruneDistributionPolicy(BasePolicy):
    """The policy of a staged pruner: a distribution over the G coupling groups, stored as a buffer.

    ``predict(obs, deterministic=True)`` returns the distribution for every observation (the policy does
    not condition on the observation: RL-Pruner's ``pi`` is a single vector adapted stage after stage).
    ``deterministic=False`` returns one noised candidate per observation drawn with the same law as the
    search (torch's global RNG). Entries at 0 (groups that cannot be pruned) stay at 0.

    Args:
        observation_space: The env's observation space.
        action_space: ``Box(0, 1, (G,))``.
        lr_schedule: Unused (there is no optimiser); accepted for SB3 compatibility.
        noise_std: ``sigma`` of the candidate noise.
        noise: ``"absolute"`` or ``"relative"`` noise (see :class:`RLPruner`).
        min_prob: Floor of a noised entry before normalising.
    """

    distribution: th.Tensor

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Any = None,
        noise_std: float = 0.04,
        noise: str = "absolute",
        min_prob: float = 1e-5,
    ) -> None:
        super().__init__(observation_space, action_space, normalize_images=False)
        del lr_schedule
        self.noise_std = float(noise_std)
        self.noise = noise
        self.min_prob = float(min_prob)
        n_groups = int(np.prod(action_space.shape))
        self.register_buffer("distribution", th.full((n_groups,), 1.0 / n_groups, dtype=th.float64))

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(noise_std=self.noise_std, noise=self.noise, min_prob=self.min_prob)
        return data

    def set_distribution(self, distribution: np.ndarray) -> None:
        """Overwrite ``pi`` (a copy of ``distribution``)."""
        self.distribution.copy_(th.as_tensor(np.asarray(distribution, dtype=np.float64)))

    def get_distribution(self) -> np.ndarray:
        """A numpy copy of ``pi``."""
        return self.distribution.detach().cpu().numpy().copy()

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self._predict(obs, deterministic=deterministic)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        n = observation.shape[0] if isinstance(observation, th.Tensor) and observation.ndim > 1 else 1
        pi = self.get_distribution()
        if deterministic:
            actions = np.repeat(pi[None, :], n, axis=0)
        else:
            active = pi > 0.0
            u = th.rand(n, dtype=th.float64).numpy()
            z = th.randn(n, pi.shape[0], dtype=th.float64).numpy()
            actions = _perturb(pi, active, u, z, self.noise_std, self.noise, self.min_prob)
        return th.as_tensor(actions, dtype=th.float32)


# ----------------------------------------------------------------------------------------------------------
# Shared machinery of the staged pruners (RLPruner and the baselines in agents/baselines.py)
# ----------------------------------------------------------------------------------------------------------


class StagedPrunerBase(SafeSaveMixin, BaseAlgorithm):
    """An SB3 algorithm whose timestep is one committed pruning stage of a ``PruneEnv``-like env.

    Subclasses implement :meth:`_plan_stage` (which action to commit, and what to log about the
    search); this class owns env access, the ``learn`` loop, callbacks, logging and save/load.

    Args:
        policy: ``"PruneDistributionPolicy"`` (holds the distribution ``predict`` returns; ``"MlpPolicy"`` is
            an alias of it).
        env: A ``PruneEnv``-like env (single env, see :class:`RLPruner`).
        image_log_interval: Log a bar-chart image of the distribution every this many stages (0: never; ~0.1 s each).
        tensorboard_log: TensorBoard log folder (None: no TensorBoard).
        seed: Seed of SB3's global RNGs and of the env's first reset.
        device: Accepted for SB3 compatibility.
        verbose: 0 silent, 1 prints the logger's table every dump.
        _init_setup_model: Build the policy now (False is used by ``load``).
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "PruneDistributionPolicy": PruneDistributionPolicy,
        # Generic code passes "MlpPolicy" to every SB3 algorithm; there is no network here, only pi.
        "MlpPolicy": PruneDistributionPolicy,
    }
    policy: PruneDistributionPolicy

    def __init__(
        self,
        policy: str | type[PruneDistributionPolicy] = "PruneDistributionPolicy",
        env: GymEnv | str | None = None,
        *,
        image_log_interval: int = 1,
        tensorboard_log: str | None = None,
        seed: int | None = None,
        device: th.device | str = "auto",
        verbose: int = 0,
        _init_setup_model: bool = True,
    ) -> None:
        super().__init__(
            policy=policy,
            env=env,
            learning_rate=0.0,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            support_multi_env=False,
            seed=seed,
            supported_action_spaces=(spaces.Box,),
        )
        if image_log_interval < 0:
            raise ValueError(f"image_log_interval must be >= 0, got {image_log_interval}")
        self.image_log_interval = int(image_log_interval)
        #: One dict per committed stage (action, reward, accuracy, ratios, epsilon, ...), across episodes.
        self.history: list[dict[str, Any]] = []
        #: ``(episode, stage)`` of every stage whose search was redone by the collapse guard.
        self.collapse_stages: list[tuple[int, int]] = []
        self._last_accuracy: float | None = None
        if self.env is not None:
            self._check_vec_env()
            if float(np.min(self.action_space.low)) < 0.0:
                raise ValueError(
                    f"{type(self).__name__} commits non-negative split weights; this env's actions are signed "
                    "(action_param='log_prior', the RLPrune-*-LogPrior ids): use action_param='weights' (the plain ids)"
                )
        if _init_setup_model:
            self._setup_model()

    # -- SB3 hooks ------------------------------------------------------------------------------------

    def _policy_kwargs(self) -> dict[str, Any]:
        return dict(self.policy_kwargs)

    def _setup_model(self) -> None:
        self.set_random_seed(self.seed)
        # After `load`, the generator comes back from the zip with its state: do not reseed it.
        if getattr(self, "_rng", None) is None:
            self._rng = np.random.default_rng(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, **self._policy_kwargs()
        )
        if self.env is not None:
            try:
                raw = self._raw_env()
                widths = np.asarray(raw.group_widths)
                mask = np.asarray(raw.prunable_mask(), dtype=bool)
            except (AttributeError, RuntimeError, TypeError, ValueError):
                # Some envs only know their groups after reset(); learn() initialises pi then.
                logger.debug("env does not expose its groups before reset(); pi starts uniform")
            else:
                self.policy.set_distribution(width_proportional(widths, mask))

    # -- env access -----------------------------------------------------------------------------------

    def _check_vec_env(self) -> None:
        venv = self.env
        if isinstance(venv, VecEnvWrapper):
            raise TypeError(
                f"{type(self).__name__} needs the raw env's evaluate()/prunable_mask(); it cannot see "
                f"through {type(venv).__name__}. Pass the env itself (or a single-env DummyVecEnv)."
            )
        if not isinstance(venv, DummyVecEnv):
            raise TypeError(
                f"{type(self).__name__} needs a single in-process env (DummyVecEnv), "
                f"got {type(venv).__name__}: "
                "candidates are scored through env.unwrapped.evaluate_many, which a SubprocVecEnv hides."
            )
        if venv.num_envs != 1:
            raise ValueError(f"{type(self).__name__} supports exactly one env, got {venv.num_envs}")

    def _gym_env(self) -> Any:
        """The (Monitor-wrapped) gymnasium env inside the DummyVecEnv: stages are committed on it."""
        if self.env is None:
            raise ValueError("this agent has no env: pass one to the constructor, load() or set_env()")
        self._check_vec_env()
        return self.env.envs[0]  # type: ignore[attr-defined]

    def _raw_env(self) -> Any:
        """``env.unwrapped``: the env's own API (evaluate, prunable_mask, group_widths, ...)."""
        return self._gym_env().unwrapped

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        super().set_env(env, force_reset=force_reset)
        self._check_vec_env()

    # -- public helpers -------------------------------------------------------------------------------

    @property
    def distribution(self) -> np.ndarray:
        """A copy of the current distribution ``pi`` over the coupling groups."""
        return self.policy.get_distribution()

    # -- the stage loop -------------------------------------------------------------------------------

    def _begin_episode(self, raw: Any, obs: np.ndarray) -> None:
        """Called at the first stage of every episode (after the env was reset)."""
        # The last observation entry is the last validation accuracy (PruneEnv's contract).
        self._last_accuracy = float(np.asarray(obs).reshape(-1)[-1])

    def _plan_stage(self, raw: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """Return the action to commit for the current stage and extra figures to log (``stage/<key>``)."""
        raise NotImplementedError

    def _commit(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        gym_env = self._gym_env()
        if isinstance(gym_env, Monitor) and gym_env.needs_reset and not self._last_episode_starts[0]:
            # A fresh Monitor around an env that is resumed mid-episode (load(..., force_reset=False)):
            # the env is in a valid state, only the wrapper does not know it yet.
            gym_env.needs_reset = False
        return gym_env.step(np.asarray(action, dtype=np.float32))

    def learn(
        self: SelfStagedPruner,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfStagedPruner:
        """Prune for ``total_timesteps`` committed stages (episodes restart while timesteps remain).

        Args:
            total_timesteps: Number of stages to commit (one PruneEnv episode has ``num_stages`` of them).
            callback: SB3 callback(s); ``on_step`` runs once per committed stage, after the agent's state
                (``pi``, RNG, history) was updated, so a checkpoint callback can save a resumable agent.
                Returning False stops learning.
            log_interval: Dump the logger every ``log_interval`` stages.
            tb_log_name: Name of the TensorBoard run (``<tensorboard_log>/<tb_log_name>_<n>``; default: the
                class name, e.g. ``RLPruner``).
            reset_num_timesteps: Start the timestep count (and the env) afresh. False continues the current
                episode, e.g. after ``load(path, env, force_reset=False)`` to resume a run.
            progress_bar: Show a progress bar over stages (count, rate, ETA), as SB3's ``progress_bar``.

        Returns:
            self
        """
        if progress_bar:  # SB3's bar, but naming what it counts (stages) and the algorithm
            callback = with_progress_bar(callback, desc=type(self).__name__, unit="stage")
        tb_log_name = type(self).__name__ if tb_log_name is None else tb_log_name
        total_timesteps, callback = self._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name)
        raw = self._raw_env()
        callback.on_training_start(locals(), globals())
        assert self._last_obs is not None and self._last_episode_starts is not None

        while self.num_timesteps < total_timesteps:
            if self._last_episode_starts[0]:
                if int(raw.stage) > 0:
                    # The previous episode ended (the env was left in its final state): start the next.
                    obs, _ = self._gym_env().reset()
                    self._last_obs = np.asarray(obs)[None]
                self._begin_episode(raw, self._last_obs[0])
                self._last_episode_starts = np.zeros((1,), dtype=bool)

            stage_before = int(raw.stage)
            t0 = time.time()
            action, stage_log = self._plan_stage(raw)
            search_time = time.time() - t0
            obs, reward, terminated, truncated, info = self._commit(action)
            done = bool(terminated or truncated)

            self.num_timesteps += 1
            self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
            self._update_info_buffer([info], np.array([done]))
            # The guard compares like with like: candidates are scored before any recovery, so the reference
            # is the committed stage's accuracy before its recovery too (after it, every stage would "collapse").
            last = info.get("accuracy_before_recovery", info.get("accuracy_before_finetune", info.get("accuracy")))
            if last is not None:
                self._last_accuracy = float(last)
            self._last_obs = np.asarray(obs)[None]
            self._last_episode_starts = np.array([done])

            record = self._record_stage(
                raw, stage_before, action, float(reward), info, stage_log, search_time
            )
            if done:
                self._episode_num += 1
            if log_interval > 0 and self.num_timesteps % log_interval == 0:
                self._log_stage(raw, record)

            callback.update_locals(locals())
            if not callback.on_step():
                break

        callback.on_training_end()
        return self

    # -- logging --------------------------------------------------------------------------------------

    def _record_stage(
        self,
        raw: Any,
        stage_before: int,
        action: np.ndarray,
        reward: float,
        info: dict[str, Any],
        stage_log: dict[str, Any],
        search_time: float,
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "episode": self._episode_num,
            "stage": stage_before,
            "action": np.asarray(action, dtype=np.float32).copy(),
            "reward": reward,
            "accuracy": info.get("accuracy"),
            "macs_ratio": info.get("macs_ratio"),
            "params_ratio": info.get("params_ratio"),
            "sparsity": info.get("sparsity"),
            "search_seconds": search_time,
            "distribution": self.distribution,
            "done": bool(self._last_episode_starts[0]),
        }
        record.update(stage_log)
        self.history.append(record)
        return record

    def _log_stage(self, raw: Any, record: dict[str, Any]) -> None:
        # Every number of the record (reward, accuracy, ratios, epsilon, candidates, ...) as stage/<key>.
        for key, value in record.items():
            if key in ("episode", "stage", "done"):
                continue
            if isinstance(value, bool | int | float | np.floating | np.integer):
                self.logger.record(f"stage/{key}", float(value))
        self.logger.record("stage/index", record["stage"])
        self.logger.record("time/episodes", self._episode_num, exclude="tensorboard")
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        if self.ep_info_buffer:
            self.logger.record("rollout/ep_rew_mean", float(np.mean([ep["r"] for ep in self.ep_info_buffer])))
        pi = self.distribution
        self.logger.record("stage/distribution", pi.astype(np.float32), exclude=_TB_ONLY)
        self.logger.record("stage/action", record["action"], exclude=_TB_ONLY)
        if self._wants_image():
            initial = np.asarray(raw.initial_group_widths, dtype=np.float64)
            widths = np.asarray(raw.group_widths, dtype=np.float64)
            sparsity = 1.0 - widths / np.maximum(initial, 1.0)
            title = f"episode {record['episode']} stage {record['stage'] + 1}"
            image = _render_distribution(pi, sparsity, title)
            if image is not None:
                self.logger.record("stage/distribution_image", Image(image, "HWC"), exclude=_TB_ONLY)
        self.logger.dump(step=self.num_timesteps)

    def _wants_image(self) -> bool:
        if self.image_log_interval <= 0 or self.num_timesteps % self.image_log_interval != 0:
            return False
        # Rendering costs ~0.1 s: only do it when a TensorBoard writer will receive it.
        return any(isinstance(fmt, TensorBoardOutputFormat) for fmt in self.logger.output_formats)


# ----------------------------------------------------------------------------------------------------------
# RLPruner
# ----------------------------------------------------------------------------------------------------------


class RLPruner(StagedPrunerBase):
    """RL-Pruner: Gaussian search around a group distribution, elite archive, clipped step, epsilon commit.

    Args:
        policy: ``"PruneDistributionPolicy"`` (alias ``"MlpPolicy"``) or the class itself.
        env: A ``PruneEnv``-like env (see the module docstring for the API it needs), an env id, or None
            when loading. Must be a single env; a ``DummyVecEnv`` of one env is accepted.
        sample_num: ``K``, candidates sampled per round.
        rounds_per_stage: ``E``, rounds of ``K`` candidates per stage (0 commits ``pi`` itself).
        noise_std: ``sigma`` of the candidate noise ``sigma * u * z`` (a standard-deviation scale; the
            reference called it ``noise_var``).
        step_length: ``lambda``, step of ``pi`` toward the best archived candidate.
        clip: ``delta``, the ratio ``pi_new / pi`` is clipped to ``[1 - delta, 1 + delta]`` (0.25 in the
            reference code, 0.2 in the paper); None disables the clip.
        epsilon: ``epsilon_0``, initial probability of committing a random archived candidate.
        archive_size: Number of elite candidates kept per stage.
        lookahead_depth: ``D``; for ``D > 1`` a candidate's value is ``r + gamma * max`` over ``K`` children
            sampled after committing it (needs ``env.unwrapped.snapshot()`` / ``restore()``; costs
            ``K**D`` evaluations and ``K**(D-1)`` env steps per round).
        gamma: Discount of the lookahead.
        collapse_threshold: If the chosen candidate's accuracy is below ``(1 - threshold)`` times the last
            committed stage's accuracy before its recovery (``info["accuracy_before_recovery"]``, else
            ``info["accuracy"]``; candidates are scored before recovery too), reset ``pi`` to
            width-proportional, clear the archive and redo the stage's search once before committing. None
            disables the guard.
        min_prob: Floor of a distribution entry before normalising (``p_min``).
        exploration_fraction: Fraction of the episode's stages during which ``epsilon > 0``.
        exploration_schedule: ``"cosine"`` (reference default), ``"linear"`` or ``"constant"``.
        noise: ``"absolute"`` (reference) or ``"relative"`` (noise scaled by ``pi * n_active_groups``).
        carry_distribution: Keep ``pi`` across episodes. By default every episode (a full compression run
            from the original model) restarts from the width-proportional ``pi``, as the reference.
        racing: Successive halving of each round's candidates instead of scoring all of them on every
            scoring image: all ``K`` are scored on the first ``1/eta**L`` of the env's ``scoring_order()``
            (the images nearest the parent model's decision boundary, where candidates differ), the best
            ``1/eta`` by estimated full-set reward (unseen images counted as the parent classifies them)
            go on to the next slice, and so on until ``racing_keep`` survivors have been scored on every
            image (earlier slices reused, so their full-set rewards are exact). Only the survivors enter
            the archive and move ``pi``. About ``K / (racing_keep + K/eta**L + ...)`` times fewer images
            scored per round (3.5x for ``K=10, eta=3.5, keep=2``; 3x for ``eta=3``). Needs
            ``lookahead_depth=1`` and an env with ``evaluate_many(actions, images=slice)`` and
            ``num_scoring_images`` (``PruneEnv``, serial evaluator).
        racing_eta: Halving factor ``eta`` (a number >= 2; 3.5 keeps ``ceil(alive / 3.5)`` per level). The default
            3.5 is the largest of 3 / 3.5 / 4 that kept the pick within 0.2 points of the exhaustive search's
            in >= 90 % of stages on CIFAR-10 (README, ``keepgym bench search --compare-exhaustive``).
        racing_keep: Candidates of a round scored on every image (>= 1).
        image_log_interval: Log a bar-chart image of ``pi`` every this many stages (0: never; ~0.1 s each).
        tensorboard_log: TensorBoard log folder (None: no TensorBoard).
        seed: Seed of the agent's numpy Generator (sampling, epsilon draws) and of SB3's global RNGs.
        device: Accepted for SB3 compatibility; the agent does its (tiny) maths on the CPU.
        verbose: 0 silent, 1 prints the logger's table every dump.
        _init_setup_model: Build the policy now (False is used by ``load``).
    """

    def __init__(
        self,
        policy: str | type[PruneDistributionPolicy],
        env: GymEnv | str | None,
        sample_num: int = 10,
        rounds_per_stage: int = 10,
        noise_std: float = 0.04,
        step_length: float = 0.1,
        clip: float | None = 0.25,
        epsilon: float = 0.4,
        archive_size: int = 10,
        lookahead_depth: int = 1,
        gamma: float = 0.9,
        collapse_threshold: float | None = 0.1,
        min_prob: float = 1e-5,
        exploration_fraction: float = 0.1,
        exploration_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        noise: Literal["absolute", "relative"] = "absolute",
        carry_distribution: bool = False,
        racing: bool = False,
        racing_eta: float = 3.5,
        racing_keep: int = 2,
        image_log_interval: int = 1,
        tensorboard_log: str | None = None,
        seed: int | None = None,
        device: th.device | str = "auto",
        verbose: int = 0,
        _init_setup_model: bool = True,
    ) -> None:
        if sample_num < 1:
            raise ValueError(f"sample_num must be >= 1, got {sample_num}")
        if rounds_per_stage < 0:
            raise ValueError(f"rounds_per_stage must be >= 0, got {rounds_per_stage}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if not 0.0 < step_length <= 1.0:
            raise ValueError(f"step_length must be in (0, 1], got {step_length}")
        if clip is not None and not 0.0 < clip < 1.0:
            raise ValueError(f"clip must be in (0, 1) or None, got {clip}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        if archive_size < 1:
            raise ValueError(f"archive_size must be >= 1, got {archive_size}")
        if lookahead_depth < 1:
            raise ValueError(f"lookahead_depth must be >= 1, got {lookahead_depth}")
        if collapse_threshold is not None and not 0.0 < collapse_threshold < 1.0:
            raise ValueError(f"collapse_threshold must be in (0, 1) or None, got {collapse_threshold}")
        if not 0.0 < min_prob < 1.0:
            raise ValueError(f"min_prob must be in (0, 1), got {min_prob}")
        if not 0.0 <= exploration_fraction <= 1.0:
            raise ValueError(f"exploration_fraction must be in [0, 1], got {exploration_fraction}")
        if exploration_schedule not in _SCHEDULES:
            raise ValueError(
                f"exploration_schedule must be one of {_SCHEDULES}, got {exploration_schedule!r}"
            )
        if noise not in _NOISE_LAWS:
            raise ValueError(f"noise must be one of {_NOISE_LAWS}, got {noise!r}")
        if not (isinstance(racing_eta, numbers.Real) and math.isfinite(racing_eta) and racing_eta >= 2):
            raise ValueError(f"racing_eta must be a number >= 2, got {racing_eta!r}")
        if int(racing_keep) != racing_keep or racing_keep < 1:
            raise ValueError(f"racing_keep must be an int >= 1, got {racing_keep}")
        if racing and lookahead_depth > 1:
            raise ValueError("racing scores candidates on image slices; it needs lookahead_depth=1")

        self.sample_num = int(sample_num)
        self.rounds_per_stage = int(rounds_per_stage)
        self.noise_std = float(noise_std)
        self.step_length = float(step_length)
        self.clip = None if clip is None else float(clip)
        self.epsilon = float(epsilon)
        self.archive_size = int(archive_size)
        self.lookahead_depth = int(lookahead_depth)
        self.gamma = float(gamma)
        self.collapse_threshold = None if collapse_threshold is None else float(collapse_threshold)
        self.min_prob = float(min_prob)
        self.exploration_fraction = float(exploration_fraction)
        self.exploration_schedule = exploration_schedule
        self.noise = noise
        self.carry_distribution = bool(carry_distribution)
        self.racing = bool(racing)
        self.racing_eta = float(racing_eta)
        self.racing_keep = int(racing_keep)
        super().__init__(
            policy,
            env,
            image_log_interval=image_log_interval,
            tensorboard_log=tensorboard_log,
            seed=seed,
            device=device,
            verbose=verbose,
            _init_setup_model=_init_setup_model,
        )

    def _policy_kwargs(self) -> dict[str, Any]:
        return {
            "noise_std": self.noise_std,
            "noise": self.noise,
            "min_prob": self.min_prob,
            **self.policy_kwargs,
        }

    # -- the maths ------------------------------------------------------------------------------------

    def exploration_rate(self, stage: int, num_stages: int) -> float:
        """``epsilon`` used to commit the stage that follows ``stage`` committed stages out of ``num_stages``.

        With the defaults and ``num_stages = 80``: 0.4 at stage 0, then 0.385, 0.341, 0.277, 0.200, 0.123,
        0.059, 0.015 and 0 from stage 8 on.
        """
        return _epsilon(stage, num_stages, self.epsilon, self.exploration_fraction, self.exploration_schedule)

    def sample_candidates(
        self, distribution: np.ndarray, mask: np.ndarray, n: int | None = None
    ) -> np.ndarray:
        """Draw ``n`` (default ``sample_num``) candidates around ``distribution`` with the agent's RNG.

        Returns:
            Array ``(n, G)``; each row is on the simplex and 0 outside ``mask``.
        """
        n = self.sample_num if n is None else int(n)
        g = distribution.shape[0]
        u = self._rng.random(n)  # one shrink factor per candidate (reference)
        z = self._rng.standard_normal((n, g))
        return _perturb(distribution, mask, u, z, self.noise_std, self.noise, self.min_prob)

    @staticmethod
    def clipped_update(
        distribution: np.ndarray,
        target: np.ndarray,
        mask: np.ndarray,
        step_length: float = 0.1,
        clip: float | None = 0.25,
        min_prob: float = 1e-5,
        normalize: bool = True,
    ) -> np.ndarray:
        """One policy step of RL-Pruner toward an elite action, with a per-group trust region.

        ``pi_tilde = max(pi + lambda * (a* - pi), p_min)``;
        ``rho = clip(pi_tilde / pi, 1 - delta, 1 + delta)``; ``pi_new = normalise(mask * rho * pi)``.
        ``distribution`` is never modified.

        Args:
            distribution: Current ``pi`` (``(G,)``, on the simplex, 0 outside ``mask``).
            target: The best archived action ``a*``.
            mask: Groups that may receive budget; the others come out at exactly 0.
            step_length: ``lambda``.
            clip: ``delta`` (None: no clip, ``pi_new = normalise(pi_tilde)``).
            min_prob: ``p_min``.
            normalize: Return the renormalised distribution (False: the clipped step before it, for tests).
        """
        pi = np.asarray(distribution, dtype=np.float64)
        target = np.asarray(target, dtype=np.float64)
        mask = np.asarray(mask, dtype=bool)
        # Step toward the elite, floored so that no active group dies.
        stepped = np.maximum(pi + step_length * (target - pi), min_prob)
        if clip is None:
            new = stepped
        else:
            # Ratio against the untouched pi; masked or zero entries get ratio 1 (they are zeroed below).
            safe = np.where(pi > 0.0, pi, 1.0)
            ratio = np.where(pi > 0.0, stepped / safe, 1.0)
            # A zero entry of a group that became prunable again starts from the floor, not from 0.
            new = np.where(pi > 0.0, np.clip(ratio, 1.0 - clip, 1.0 + clip) * pi, min_prob)
        new = np.where(mask, new, 0.0)
        return normalise_distribution(new, mask) if normalize else new

    # -- one stage ------------------------------------------------------------------------------------

    def _stage_distribution(self, raw: Any, mask: np.ndarray) -> np.ndarray:
        """``pi`` restricted to the groups that can still give channels (floored for revived groups)."""
        pi = self.distribution
        pi = np.where(mask & (pi <= 0.0), self.min_prob, pi)
        return normalise_distribution(pi, mask)

    def _begin_episode(self, raw: Any, obs: np.ndarray) -> None:
        super()._begin_episode(raw, obs)
        if not self.carry_distribution or self._episode_num == 0:
            mask = np.asarray(raw.prunable_mask(), dtype=bool)
            self.policy.set_distribution(width_proportional(np.asarray(raw.group_widths), mask))

    def _evaluate(self, raw: Any, actions: np.ndarray) -> list[tuple[float, dict[str, Any]]]:
        batch = [np.asarray(a, dtype=np.float32) for a in actions]
        if hasattr(raw, "evaluate_many"):
            results = list(raw.evaluate_many(batch))
        else:
            results = [raw.evaluate(a) for a in batch]
        return [(float(r), dict(info)) for r, info in results]

    def _score(
        self, raw: Any, actions: np.ndarray, depth: int, mask: np.ndarray
    ) -> tuple[list[_Candidate], int]:
        """Score candidates; with ``depth > 1`` add ``gamma * max`` of the best child values (lookahead)."""
        results = self._evaluate(raw, actions)
        n_scored = len(results)
        candidates = []
        for action, (reward, info) in zip(actions, results, strict=True):
            value = reward
            if depth > 1:
                snapshot = raw.snapshot()
                try:
                    _, _, terminated, truncated, _ = raw.step(np.asarray(action, dtype=np.float32))
                    if not (terminated or truncated):
                        child_mask = np.asarray(raw.prunable_mask(), dtype=bool) & mask
                        child_pi = normalise_distribution(self.distribution, child_mask)
                        children, n_child = self._score(
                            raw, self.sample_candidates(child_pi, child_mask), depth - 1, child_mask
                        )
                        n_scored += n_child
                        value = reward + self.gamma * max(c.value for c in children)
                finally:
                    raw.restore(snapshot)
            candidates.append(_Candidate(value=value, reward=reward, action=np.asarray(action), info=info))
        return candidates, n_scored

    def racing_slices(self, num_candidates: int, num_images: int) -> list[tuple[slice, int]]:
        """The successive-halving plan of one round: ``(image slice, candidates scored on it)`` per level.

        Level ``i`` of ``L`` scores its survivors on the images ``[n / eta**(L-i+1), n / eta**(L-i))`` of
        the stage's scoring order (level 0 from image 0), so a survivor of the last level has been
        scored on all ``n``; ``L`` is the fewest levels that bring ``num_candidates`` down to
        ``racing_keep`` by keeping ``ceil(alive / eta)`` per level.
        """
        alive, counts = int(num_candidates), [int(num_candidates)]
        while alive > self.racing_keep:
            alive = max(self.racing_keep, math.ceil(alive / self.racing_eta))
            counts.append(alive)
        levels = len(counts) - 1
        ends = [max(1, int(num_images // self.racing_eta ** (levels - i))) for i in range(levels + 1)]
        ends[-1] = num_images
        plan, start = [], 0
        for end, alive in zip(ends, counts, strict=True):
            if end > start:
                plan.append((slice(start, end), alive))
                start = end
        return plan

    def _race(self, raw: Any, actions: np.ndarray) -> tuple[list[_Candidate], int]:
        """Successive halving over image slices (:meth:`racing_slices`); returns the survivors, exactly scored.

        The second value is the work in candidate evaluations on the full scoring set (images scored / n).
        """
        n = int(raw.num_scoring_images)
        batch = [np.asarray(a, dtype=np.float32) for a in actions]
        alive = list(range(len(batch)))
        correct = np.zeros(len(batch), dtype=np.int64)
        seen = np.zeros(len(batch), dtype=np.int64)
        loss = np.zeros(len(batch), dtype=np.float64)  # summed cross-entropy: breaks accuracy ties
        last: dict[int, tuple[float, dict[str, Any]]] = {}
        images_scored = 0
        for images, keep in self.racing_slices(len(batch), n):
            if len(alive) > keep:
                # Rank by the estimated full-set reward: the images not seen yet counted as the parent
                # model classifies them (the same for every alive candidate, so left out), i.e. accuracy
                # differences on the seen images weigh 1/n each against the exact MACs/params terms, not
                # 1/seen; the env's order puts the images where candidates differ first. Ties (common on
                # few images) go to the lower summed cross-entropy on the same images.
                def rank(i: int) -> tuple[float, float]:
                    reward, info = last[i]
                    return (-(float(reward) - float(info["accuracy"]) + correct[i] / n), loss[i])

                alive = sorted(sorted(alive, key=rank)[:keep])
            results = raw.evaluate_many([batch[i] for i in alive], images=images)
            for i, (reward, info) in zip(alive, results, strict=True):
                correct[i] += int(info["correct"])
                seen[i] += int(info["scored_images"])
                loss[i] += float(info.get("loss", 0.0)) * int(info["scored_images"])
                images_scored += int(info["scored_images"])
                last[i] = (float(reward), dict(info))
        candidates = []
        for i in alive:
            reward, info = last[i]
            acc = float(correct[i] / seen[i])
            full_reward = self._partial_reward((reward, info), correct[i], seen[i])
            # a candidate is not recovered: its accuracies before and "after" recovery are the same
            info.update(accuracy=acc, accuracy_before_recovery=acc, accuracy_before_finetune=acc)
            info.update(correct=int(correct[i]), scored_images=int(seen[i]))
            action = np.asarray(actions[i])
            candidates.append(_Candidate(value=full_reward, reward=full_reward, action=action, info=info))
        return candidates, images_scored / max(n, 1)

    @staticmethod
    def _partial_reward(result: tuple[float, dict[str, Any]], correct: int, seen: int) -> float:
        """The reward with the accuracy on every image seen so far in place of the last slice's."""
        reward, info = result
        return float(reward) - float(info["accuracy"]) + float(correct) / max(int(seen), 1)

    def search_stage(self) -> dict[str, Any]:
        """Run the current stage's search (E rounds of K candidates) without committing anything.

        For benchmarks that compare search settings on the same stage (``keepgym bench search``): the
        agent's sampling RNG and ``pi`` move as in :meth:`learn`; use :meth:`get_search_state` /
        :meth:`set_search_state` to run another setting from the same point.

        Returns:
            ``{"action", "reward", "accuracy", "evaluations", "updates"}`` of the best archived candidate
            (``reward``/``accuracy`` on the whole scoring set; ``evaluations`` in whole-scoring-set
            candidate evaluations).
        """
        raw = self.env.envs[0].unwrapped
        mask = np.asarray(raw.prunable_mask(), dtype=bool)
        archive, n_scored, n_updates = self._search(raw, mask)
        best = archive.best()
        return {
            "action": np.asarray(best.action, dtype=np.float32),
            "reward": float(best.reward),
            "accuracy": float(best.info.get("accuracy", float("nan"))),
            "evaluations": float(n_scored),
            "updates": int(n_updates),
        }

    def get_search_state(self) -> dict[str, Any]:
        """``pi`` and the sampling RNG's state (copies), for :meth:`set_search_state`."""
        return {"distribution": self.distribution.copy(), "rng": copy.deepcopy(self._rng.bit_generator.state)}

    def set_search_state(self, state: dict[str, Any]) -> None:
        """Return ``pi`` and the sampling RNG to a :meth:`get_search_state` point."""
        self.policy.set_distribution(np.asarray(state["distribution"], dtype=np.float64))
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])

    def _search(self, raw: Any, mask: np.ndarray) -> tuple[_EliteArchive, int, int]:
        """E rounds of K candidates; returns the archive, candidates scored and the number of pi updates."""
        archive = _EliteArchive(self.archive_size)
        pi = self._stage_distribution(raw, mask)
        self.policy.set_distribution(pi)
        best_value = -math.inf
        n_scored = 0
        n_updates = 0
        for _ in range(self.rounds_per_stage):
            actions = self.sample_candidates(pi, mask)
            if self.racing:
                candidates, n = self._race(raw, actions)
            else:
                candidates, n = self._score(raw, actions, self.lookahead_depth, mask)
            n_scored += n
            for candidate in candidates:
                archive.add(candidate)
            round_best = max(c.value for c in candidates)
            # Move pi only when this round beat the stage's best so far (reference: compress.py:352-356).
            if round_best > best_value:
                best_value = round_best
                pi = self.clipped_update(
                    pi, archive.best().action, mask, self.step_length, self.clip, self.min_prob
                )
                self.policy.set_distribution(pi)
                n_updates += 1
        return archive, n_scored, n_updates

    def _choose(self, archive: _EliteArchive, eps: float) -> tuple[_Candidate | None, bool]:
        if len(archive) == 0:
            return None, False
        # Draw the coin even when eps == 0 so that the RNG stream does not depend on the schedule.
        explore = bool(self._rng.random() < eps)
        return (archive.sample(self._rng) if explore else archive.best()), explore

    def _plan_stage(self, raw: Any) -> tuple[np.ndarray, dict[str, Any]]:
        if self.lookahead_depth > 1 and not (
            callable(getattr(raw, "snapshot", None)) and callable(getattr(raw, "restore", None))
        ):
            raise NotImplementedError(
                f"lookahead_depth={self.lookahead_depth} needs env.unwrapped.snapshot() and "
                "restore(snapshot) "
                f"to commit a candidate and undo it; {type(raw).__name__} has no such methods. Use "
                "lookahead_depth=1 (the reference default)."
            )
        mask = np.asarray(raw.prunable_mask(), dtype=bool)
        if not mask.any():
            raise RuntimeError("no group can give channels any more, but the episode has not terminated")
        stage, num_stages = int(raw.stage), int(raw.num_stages)
        eps = self.exploration_rate(stage, num_stages)

        archive, n_scored, n_updates = self._search(raw, mask)
        chosen, explored = self._choose(archive, eps)
        collapse = False
        if chosen is not None and self._collapsed(chosen):
            collapse = True
            self.collapse_stages.append((self._episode_num, stage))
            logger.info(
                "stage %d: the chosen candidate's accuracy %.4f collapsed from %.4f; "
                "pi reset, stage searched again",
                stage,
                chosen.info.get("accuracy"),
                self._last_accuracy,
            )
            self.policy.set_distribution(width_proportional(np.asarray(raw.group_widths), mask))
            archive.clear()
            archive, n_again, n_up_again = self._search(raw, mask)
            n_scored += n_again
            n_updates += n_up_again
            chosen, explored = self._choose(archive, eps)

        if chosen is None:
            action = self._stage_distribution(raw, mask)
            best_value = math.nan
        else:
            action = chosen.action
            best_value = archive.best().value
        stage_log = {
            "epsilon": eps,
            "explored": explored,
            "best_candidate_reward": best_value,
            "candidates": n_scored,
            "policy_updates": n_updates,
            "collapse_reset": collapse,
        }
        return np.asarray(action, dtype=np.float32), stage_log

    def _collapsed(self, candidate: _Candidate) -> bool:
        if self.collapse_threshold is None or self._last_accuracy is None:
            return False
        accuracy = candidate.info.get("accuracy")
        if accuracy is None:
            return False
        return float(accuracy) < (1.0 - self.collapse_threshold) * self._last_accuracy
