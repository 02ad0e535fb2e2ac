"""Double DQN with a branching head, on Stable-Baselines3's off-policy machinery.

Double DQN (van Hasselt, Guez and Silver, 2016, https://arxiv.org/abs/1509.06461) decouples the choice
of the next action from its evaluation: the online network picks ``a' = argmax_a Q_online(s', a)`` and
the target network scores it, ``y = r + gamma * (1 - done) * Q_target(s', a')``. This removes the
over-estimation bias of the vanilla ``max_a Q_target(s', a)`` target.

Two action spaces are supported:

* ``Discrete(n)``: one Q head with ``n`` outputs (the ``keep ratio`` mode of ``PatchSelectEnv``).
* ``MultiBinary(N)``: a *branching* head (Tavakoli, Pardo and Kormushev, 2018, "Action Branching
  Architectures for Deep Reinforcement Learning", https://arxiv.org/abs/1711.08946): a shared MLP
  trunk and ``N`` branches of 2 Q-values each (drop / keep patch ``b``). The greedy action is the
  per-branch argmax, the Double-DQN target is computed per branch and the loss is the mean of the
  per-branch Huber losses. This is the ``mask`` mode of ``PatchSelectEnv`` (AgentViT).
* ``Box(-1, 1, (B, N))`` over observations ``(B, N, F)``: ``PatchSelectEnv``'s ``patches`` mode, in which
  the agent chooses which patches each of the B images keeps. :class:`PatchQPolicy` scores every patch
  with one MLP shared across patches (F features -> q), the env keeps each image's top-k, and
  :class:`PatchReplayBuffer` stores one decision per rewarded image. ``Q(s, S)`` of a kept set is the
  mean of its patch values, regressed on the image's reward (the loss gap to all patches); see
  :meth:`DDQN._train_patches` for why the target is the reward itself.

AgentViT (the reference this project re-implements) called its agent "DDQN" but trained every output
towards ``r + gamma * Q_target(s')`` without storing actions; this module is a real Double DQN. The
reference's hyper-parameters are available as :meth:`DDQN.agentvit`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer, ReplayBuffer
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, FlattenExtractor, create_mlp
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule
from stable_baselines3.common.utils import get_parameters_by_name, polyak_update
from stable_baselines3.dqn.policies import CnnPolicy, DQNPolicy, MlpPolicy, MultiInputPolicy
from torch import nn
from torch.nn import functional as F

from keepgym.agents.callbacks import with_progress_bar
from keepgym.agents.serialization import SafeSaveMixin

__all__ = ["BranchingQNetwork", "BranchingQPolicy", "DDQN", "PatchQNetwork", "PatchQPolicy", "PatchReplayBuffer"]

logger = logging.getLogger(__name__)

SelfDDQN = TypeVar("SelfDDQN", bound="DDQN")

#: Env ``info`` key -> TensorBoard tag, averaged over recent steps. ``PatchSelectEnv`` reports the kept
#: patches per image as ``kept``; ``kept_patches`` is accepted too.
DEFAULT_INFO_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("kept", "rollout/kept_patches"),
    ("kept_patches", "rollout/kept_patches"),
    ("step_seconds", "rollout/step_seconds"),
)


def _random_masks(rng: np.random.Generator, n: int, n_bits: int) -> np.ndarray:
    """Draw ``n`` random keep-masks, each bit Bernoulli(0.5), with at least one bit set per mask."""
    masks = rng.integers(0, 2, size=(n, n_bits), dtype=np.int8)
    empty = np.flatnonzero(masks.sum(axis=1) == 0)
    if empty.size:
        # An all-zero mask keeps no patch; the env would fix it anyway, but store what is actually done.
        masks[empty, rng.integers(0, n_bits, size=empty.size)] = 1
    return masks


class BranchingQNetwork(BasePolicy):
    """Branching Q-network for ``MultiBinary(N)``: a shared MLP trunk and one 2-way Q head per bit.

    ``forward(obs)`` returns Q-values of shape ``(batch, N, 2)``; index 0 is "drop" (bit 0), index 1 is
    "keep" (bit 1). With ``dueling=True`` a shared state-value stream is added as in Branching Dueling
    Q-Networks: ``Q_b(s, a) = V(s) + A_b(s, a) - mean_a A_b(s, a)``.

    Args:
        observation_space: Observation space.
        action_space: ``MultiBinary(N)`` with an integer ``N``.
        features_extractor: Features extractor (flatten for an MLP).
        features_dim: Output size of the features extractor.
        net_arch: Hidden sizes of the shared trunk (default ``[64, 64]``).
        activation_fn: Activation of the trunk.
        dueling: Add a shared state-value stream.
        normalize_images: Divide image observations by 255.
    """

    action_space: spaces.MultiBinary

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.MultiBinary,
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        dueling: bool = False,
        normalize_images: bool = True,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            features_extractor=features_extractor,
            normalize_images=normalize_images,
        )
        if not isinstance(action_space.n, int | np.integer):
            raise ValueError(f"BranchingQNetwork needs a flat MultiBinary(N) space, got {action_space}")
        self.net_arch = [64, 64] if net_arch is None else list(net_arch)
        self.activation_fn = activation_fn
        self.features_dim = features_dim
        self.dueling = dueling
        self.n_branches = int(action_space.n)
        trunk = create_mlp(features_dim, -1, self.net_arch, activation_fn)  # output_dim < 0: no last layer
        self.trunk = nn.Sequential(*trunk)
        last_dim = self.net_arch[-1] if self.net_arch else features_dim
        self.advantage = nn.Linear(last_dim, self.n_branches * 2)
        self.value = nn.Linear(last_dim, 1) if dueling else None

    def forward(self, obs: PyTorchObs) -> th.Tensor:
        """Return the Q-values, shape ``(batch, N, 2)``."""
        hidden = self.trunk(self.extract_features(obs, self.features_extractor))
        q_values = self.advantage(hidden).view(-1, self.n_branches, 2)
        if self.value is not None:
            # Dueling: shared V(s) plus per-branch advantages centred on their mean.
            q_values = self.value(hidden).unsqueeze(-1) + q_values - q_values.mean(dim=-1, keepdim=True)
        return q_values

    def _predict(self, observation: PyTorchObs, deterministic: bool = True) -> th.Tensor:
        # Greedy action per branch: 1 (keep) where Q(keep) > Q(drop).
        return self(observation).argmax(dim=-1)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {
            **super()._get_constructor_parameters(),
            "net_arch": self.net_arch,
            "features_dim": self.features_dim,
            "activation_fn": self.activation_fn,
            "dueling": self.dueling,
            "features_extractor": self.features_extractor,
        }


class BranchingQPolicy(DQNPolicy):
    """Online + target branching Q-networks for ``MultiBinary(N)`` actions (SB3 ``DQNPolicy`` layout).

    Args:
        observation_space: Observation space.
        action_space: ``MultiBinary(N)``.
        lr_schedule: Learning-rate schedule.
        net_arch: Hidden sizes of the shared trunk.
        activation_fn: Activation function.
        dueling: Add a shared state-value stream (Branching Dueling Q-Network).
        features_extractor_class: Features extractor (flatten by default).
        features_extractor_kwargs: Its keyword arguments.
        normalize_images: Divide image observations by 255.
        optimizer_class: Optimizer (Adam by default).
        optimizer_kwargs: Optimizer keyword arguments other than the learning rate.
    """

    q_net: BranchingQNetwork  # type: ignore[assignment]
    q_net_target: BranchingQNetwork  # type: ignore[assignment]

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.MultiBinary,
        lr_schedule: Schedule,
        net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        dueling: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        # DQNPolicy.__init__ builds the networks, so the flag must exist before it runs.
        self._dueling = dueling
        super().__init__(
            observation_space,
            action_space,  # type: ignore[arg-type]
            lr_schedule,
            net_arch=net_arch,
            activation_fn=activation_fn,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=features_extractor_kwargs,
            normalize_images=normalize_images,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
        )

    def make_q_net(self) -> BranchingQNetwork:  # type: ignore[override]
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        return BranchingQNetwork(**net_args, dueling=self._dueling).to(self.device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data["dueling"] = self._dueling
        return data


class PatchQNetwork(nn.Module):
    """Per-patch Q head for the ``patches`` mode: one MLP shared by every patch of every image.

    ``forward(obs)`` maps features ``(..., N, F)`` to patch values ``(..., N)``. The value of keeping a
    set S of patches of one image is the mean of its patch values, ``Q(s, S) = mean_{p in S} q(f_p)``,
    so the greedy set at a fixed budget k is the k patches with the highest q.

    Args:
        features_dim: Features per patch (F).
        net_arch: Hidden sizes (default ``[64, 64]``).
        activation_fn: Activation.
    """

    def __init__(
        self, features_dim: int, net_arch: list[int] | None = None, activation_fn: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__()
        self.net_arch = [64, 64] if net_arch is None else list(net_arch)
        self.mlp = nn.Sequential(*create_mlp(features_dim, 1, self.net_arch, activation_fn))

    def forward(self, obs: th.Tensor) -> th.Tensor:
        """Patch values ``(..., N)``."""
        return self.mlp(obs.float()).squeeze(-1)


class PatchQPolicy(BasePolicy):
    """Online + target :class:`PatchQNetwork` for ``PatchSelectEnv``'s ``patches`` mode.

    Observation ``Box((B, N, F))`` (features of every patch of the B images of a batch), action
    ``Box(-1, 1, (B, N))``: ``tanh`` of the patch values; the env keeps each image's top-k.

    Args:
        observation_space: ``Box((B, N, F))``.
        action_space: ``Box(-1, 1, (B, N))``.
        lr_schedule: Learning-rate schedule.
        net_arch: Hidden sizes of the shared per-patch MLP.
        activation_fn: Activation.
        normalize_images: Unused (no images); kept for SB3's policy signature.
        optimizer_class: Optimizer (Adam by default).
        optimizer_kwargs: Optimizer keyword arguments other than the learning rate.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = False,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            normalize_images=False,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
        )
        obs_shape, act_shape = tuple(observation_space.shape), tuple(action_space.shape)
        if len(obs_shape) != 3 or obs_shape[:2] != act_shape:
            raise ValueError(
                f"PatchQPolicy needs observations (B, N, F) and actions (B, N), got {obs_shape} and {act_shape}"
            )
        self.net_arch = [64, 64] if net_arch is None else list(net_arch)
        self.activation_fn = activation_fn
        self.q_net = PatchQNetwork(obs_shape[-1], self.net_arch, activation_fn)
        self.q_net_target = PatchQNetwork(obs_shape[-1], self.net_arch, activation_fn)
        self.q_net_target.load_state_dict(self.q_net.state_dict())
        self.q_net_target.train(False)
        self.optimizer = self.optimizer_class(self.q_net.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def forward(self, obs: th.Tensor, deterministic: bool = True) -> th.Tensor:
        return self._predict(obs, deterministic=deterministic)

    def _predict(self, observation: PyTorchObs, deterministic: bool = True) -> th.Tensor:
        # tanh keeps the order of the patch values and lands in the action space.
        return th.tanh(self.q_net(observation))  # type: ignore[arg-type]

    def set_training_mode(self, mode: bool) -> None:
        self.q_net.train(mode)
        self.training = mode

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {
            **super()._get_constructor_parameters(),
            "net_arch": self.net_arch,
            "activation_fn": self.activation_fn,
            "lr_schedule": self._dummy_schedule,
            "optimizer_class": self.optimizer_class,
            "optimizer_kwargs": self.optimizer_kwargs,
        }


class PatchReplaySamples(NamedTuple):
    """A minibatch of per-image decisions: features ``(b, N, F)``, kept masks ``(b, N)``, rewards ``(b,)``."""

    observations: th.Tensor
    actions: th.Tensor
    rewards: th.Tensor


class PatchReplayBuffer(ReplayBuffer):
    """FIFO replay of *per-image* decisions for the ``patches`` mode (capacity counted in images).

    ``add`` reads ``info["image_rewards"]`` and ``info["image_keep"]`` (the rewarded images, the first
    ones of the batch) and stores, per image, its patch features, its kept-patch mask (``actions``,
    uint8) and its reward. A step without them (e.g. a diverged ViT step) stores nothing. The arrays
    are plain NumPy (``observations``, ``actions``, ``rewards``), so the agent's pickle-free
    ``save_replay_buffer`` writes them like any SB3 replay buffer.
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
    ) -> None:
        BaseBuffer.__init__(self, buffer_size, observation_space, action_space, device, n_envs=n_envs)
        _, n, f = observation_space.shape
        self.optimize_memory_usage = False
        self.handle_timeout_termination = handle_timeout_termination
        self.observations = np.zeros((self.buffer_size, n, f), dtype=np.float32)
        self.next_observations = None  # type: ignore[assignment]
        self.actions = np.zeros((self.buffer_size, n), dtype=np.uint8)
        self.rewards = np.zeros((self.buffer_size,), dtype=np.float32)
        self.dones = None  # type: ignore[assignment]
        self.timeouts = None  # type: ignore[assignment]

    def add(  # type: ignore[override]
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        for env_i, info in enumerate(infos):
            rewards, keep = info.get("image_rewards"), info.get("image_keep")
            if rewards is None or keep is None:
                continue
            for img, (r, kept) in enumerate(zip(np.asarray(rewards), np.asarray(keep), strict=True)):
                self.observations[self.pos] = obs[env_i, img]
                self.actions[self.pos] = 0
                self.actions[self.pos, kept] = 1
                self.rewards[self.pos] = r
                self.pos += 1
                if self.pos == self.buffer_size:
                    self.full, self.pos = True, 0

    def sample(self, batch_size: int, env: Any = None) -> PatchReplaySamples:  # type: ignore[override]
        upper = self.buffer_size if self.full else self.pos
        idx = np.random.randint(0, upper, size=batch_size)
        return PatchReplaySamples(
            self.to_torch(self.observations[idx]), self.to_torch(self.actions[idx]), self.to_torch(self.rewards[idx])
        )


class DDQN(SafeSaveMixin, OffPolicyAlgorithm):
    """Double DQN for ``Discrete`` and (branching head) ``MultiBinary`` action spaces.

    The online network chooses the next action and the target network evaluates it::

        a'_b = argmax_a Q_online(s', b, a)                         # per branch b (one branch if Discrete)
        y_b  = r + gamma * (1 - done) * Q_target(s', b, a'_b)
        loss = mean_b Huber(Q_online(s, b, a_b), y_b)

    ``DDQN("MlpPolicy", env)`` picks SB3's ``DQNPolicy`` for ``Discrete`` spaces and
    :class:`BranchingQPolicy` for ``MultiBinary(N)``. Exploration is epsilon-greedy; for ``MultiBinary``
    a random action is a random mask (each bit Bernoulli(0.5)) with at least one bit set.

    **Target-network cadence.** SB3's DQN counts ``target_update_interval`` in *environment steps*.
    Here ``target_update_unit`` decides: ``"update"`` (default) counts *gradient steps*, as the
    Double DQN paper and AgentViT do ("tau = 0.1 every 2 updates"), so the cadence does not change
    with ``train_freq``/``gradient_steps`` and nothing happens before ``learning_starts``;
    ``"step"`` reproduces SB3's DQN exactly.

    **Our defaults, and why they differ from the AgentViT reference** (use :meth:`agentvit` for the
    reference values):

    * ``learning_rate=5e-4`` with Adam: the reference's AdamW at 1e-2 is far above the usual DQN range
      (1e-4..1e-3) and makes the regression to bootstrapped targets unstable.
    * ``buffer_size=10_000`` FIFO, ``batch_size=64``: the reference kept 64 transitions, evicted at
      random and sampled 8, so every update saw almost the same highly correlated data.
    * ``gamma=0.9``: choosing patches is close to a contextual bandit (the action mostly changes this
      step's loss), so a short horizon (about 10 steps) cuts the variance of bootstrapping through a
      state that drifts as the ViT trains; it stays > 0 so the agent remains a real RL agent on other
      envs. Set ``gamma=0`` for a pure bandit.
    * ``tau=0.005`` every update (Polyak): smooth targets, the standard choice of TD3/SAC; the reference's
      ``tau=0.1`` every 2 updates tracks the online net closely and gives little target stability.
    * Linear epsilon from 1.0 to 0.02 over ``exploration_fraction=0.2`` of training, decayed per agent
      step: the reference's ``0.01 + 0.99 exp(-t/20000)`` on the ViT batch counter leaves epsilon at
      0.15 after 39k batches, i.e. about 45 % of ViT training batches used random masks.

    Args:
        policy: ``"MlpPolicy"`` (also ``"CnnPolicy"``/``"MultiInputPolicy"`` for ``Discrete``) or a class.
        env: The environment (or its registered id).
        learning_rate: Learning rate, or a schedule of the remaining progress (1 -> 0).
        buffer_size: Replay buffer capacity in transitions (FIFO).
        learning_starts: Env steps of random actions collected before learning starts.
        batch_size: Minibatch size of each gradient step.
        tau: Polyak coefficient of the target update (1 = hard copy).
        gamma: Discount factor.
        train_freq: Train every ``train_freq`` env steps, or a tuple ``(n, "step" | "episode")``.
        gradient_steps: Gradient steps after each rollout (-1: as many as env steps collected).
        replay_buffer_class: Replay buffer class (SB3's ``ReplayBuffer`` by default; it stores
            ``MultiBinary`` actions as int8 vectors).
        replay_buffer_kwargs: Keyword arguments of the replay buffer.
        optimize_memory_usage: SB3's memory-efficient replay buffer variant.
        n_steps: n-step returns (SB3's ``NStepReplayBuffer``) when > 1.
        target_update_interval: Update the target network every this many units (see ``target_update_unit``).
        target_update_unit: ``"update"`` (gradient steps, default) or ``"step"`` (env steps, as SB3's DQN).
        exploration_schedule: ``"linear"`` (SB3: from initial to final epsilon over
            ``exploration_fraction`` of ``total_timesteps``) or ``"exp"``
            (``final + (initial - final) * exp(-t / exploration_decay)``, t = env steps so far).
        exploration_fraction: Fraction of training over which the linear schedule decays.
        exploration_initial_eps: Initial epsilon.
        exploration_final_eps: Final epsilon.
        exploration_decay: Time constant (env steps) of the exponential schedule.
        max_grad_norm: Gradient-norm clipping threshold.
        info_keywords: Pairs (or a mapping) ``info key -> TensorBoard tag``; each value found in the env's
            ``info`` is averaged over the last ``stats_window_size`` steps and logged under its tag
            (default: ``kept``/``kept_patches`` -> ``rollout/kept_patches``, ``step_seconds`` ->
            ``rollout/step_seconds``). Missing keys are skipped; one value per tag and step.
        stats_window_size: Window of the rollout statistics.
        tensorboard_log: TensorBoard log directory (None: no TensorBoard).
        policy_kwargs: Policy keyword arguments (``net_arch``, ``optimizer_class``, ``dueling``, ...).
        verbose: 0 silent, 1 info, 2 debug.
        seed: Seed of Python, NumPy, Torch, the env and the action space.
        device: Torch device (``"auto"``: CUDA if available).
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    #: Policies used instead of ``policy_aliases`` when the action space is ``MultiBinary``.
    branching_policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": BranchingQPolicy}
    #: Policies used for ``PatchSelectEnv``'s ``patches`` mode (Box scores over per-patch features).
    patch_policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": PatchQPolicy}

    policy: DQNPolicy
    q_net: nn.Module
    q_net_target: nn.Module

    def __init__(
        self,
        policy: str | type[DQNPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 5e-4,
        buffer_size: int = 10_000,
        learning_starts: int = 100,
        batch_size: int = 64,
        tau: float = 0.005,
        gamma: float = 0.9,
        train_freq: int | tuple[int, str] = 1,
        gradient_steps: int = 1,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        optimize_memory_usage: bool = False,
        n_steps: int = 1,
        target_update_interval: int = 1,
        target_update_unit: Literal["update", "step"] = "update",
        exploration_schedule: Literal["linear", "exp"] = "linear",
        exploration_fraction: float = 0.2,
        exploration_initial_eps: float = 1.0,
        exploration_final_eps: float = 0.02,
        exploration_decay: float = 20_000.0,
        max_grad_norm: float = 10.0,
        info_keywords: Mapping[str, str] | tuple[tuple[str, str], ...] = DEFAULT_INFO_KEYWORDS,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        if target_update_unit not in ("update", "step"):
            raise ValueError(f"target_update_unit must be 'update' or 'step', got {target_update_unit!r}")
        if exploration_schedule not in ("linear", "exp"):
            raise ValueError(f"exploration_schedule must be 'linear' or 'exp', got {exploration_schedule!r}")
        if target_update_interval < 1:
            raise ValueError(f"target_update_interval must be >= 1, got {target_update_interval}")
        if exploration_schedule == "exp" and exploration_decay <= 0:
            raise ValueError(f"exploration_decay must be > 0, got {exploration_decay}")
        super().__init__(
            policy,
            env,
            learning_rate,
            buffer_size,
            learning_starts,
            batch_size,
            tau,
            gamma,
            train_freq,
            gradient_steps,
            action_noise=None,
            replay_buffer_class=replay_buffer_class,
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=optimize_memory_usage,
            n_steps=n_steps,
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            sde_support=False,
            supported_action_spaces=(spaces.Discrete, spaces.MultiBinary, spaces.Box),
            support_multi_env=True,
        )
        if isinstance(policy, str) and env is not None and isinstance(self.action_space, spaces.MultiBinary):
            if policy not in self.branching_policy_aliases:
                raise ValueError(
                    f"Policy {policy!r} is not available for MultiBinary actions; "
                    f"use one of {sorted(self.branching_policy_aliases)}"
                )
            self.policy_class = self.branching_policy_aliases[policy]
        if env is not None and isinstance(self.action_space, spaces.Box):
            shape = tuple(self.action_space.shape)
            obs_shape = tuple(self.observation_space.shape or ())
            if len(shape) != 2 or obs_shape[:2] != shape or len(obs_shape) != 3:
                raise ValueError(
                    "DDQN supports Box actions only as per-patch scores (B, N) over observations (B, N, F) "
                    f"(PatchSelectEnv's patches mode), got actions {shape} and observations {obs_shape}"
                )
            if isinstance(policy, str):
                if policy not in self.patch_policy_aliases:
                    raise ValueError(f"Policy {policy!r} is not available for the patches mode; use MlpPolicy")
                self.policy_class = self.patch_policy_aliases[policy]
            if self.replay_buffer_class is None:
                self.replay_buffer_class = PatchReplayBuffer

        self.target_update_interval = target_update_interval
        self.target_update_unit = target_update_unit
        self.exploration_schedule = exploration_schedule
        self.exploration_fraction = exploration_fraction
        self.exploration_initial_eps = exploration_initial_eps
        self.exploration_final_eps = exploration_final_eps
        self.exploration_decay = exploration_decay
        self.max_grad_norm = max_grad_norm
        pairs = info_keywords.items() if isinstance(info_keywords, Mapping) else info_keywords
        self.info_keywords: tuple[tuple[str, str], ...] = tuple((str(k), str(t)) for k, t in pairs)
        # Env-step counter for target updates in "step" units (as SB3's DQN).
        self._n_calls = 0
        # Epsilon of the epsilon-greedy exploration, updated after every env step.
        self.exploration_rate = 0.0
        self._info_stats: dict[str, deque[float]] = {}

        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ presets

    @classmethod
    def agentvit(cls: type[SelfDDQN], env: GymEnv | str, **overrides: Any) -> SelfDDQN:
        """Build a DDQN with the AgentViT reference hyper-parameters (notebook cells 29-36).

        MLP N -> 1024 -> 256 (branching head on ``MultiBinary``), gamma 0.95, Huber loss, AdamW lr 1e-2
        with amsgrad (weight decay 0.01), soft target update tau 0.1 every 2 *gradient* steps, epsilon
        ``0.01 + 0.99 * exp(-t / 20000)`` with t the env step (= ViT batch in ``PatchSelectEnv``),
        replay of 64 transitions sampled 8 at a time, one gradient step per env step.

        Departures that cannot be avoided or are plain fixes: the buffer is FIFO (the reference evicted
        at random), the gradient is clipped by norm at 100 (the reference clipped by value at 100), and
        actions are stored and gathered (the reference regressed all outputs on the same target).

        Args:
            env: The environment.
            **overrides: Any constructor argument; ``policy_kwargs`` is merged into the preset's.

        Returns:
            The (untrained) agent.
        """
        policy_kwargs: dict[str, Any] = dict(
            net_arch=[1024, 256],
            optimizer_class=th.optim.AdamW,
            optimizer_kwargs=dict(amsgrad=True, weight_decay=0.01),
        )
        policy_kwargs.update(overrides.pop("policy_kwargs", None) or {})
        kwargs: dict[str, Any] = dict(
            learning_rate=1e-2,
            buffer_size=64,
            learning_starts=8,
            batch_size=8,
            tau=0.1,
            gamma=0.95,
            train_freq=1,
            gradient_steps=1,
            target_update_interval=2,
            target_update_unit="update",
            exploration_schedule="exp",
            exploration_initial_eps=1.0,
            exploration_final_eps=0.01,
            exploration_decay=20_000.0,
            max_grad_norm=100.0,
        )
        kwargs.update(overrides)
        policy = kwargs.pop("policy", "MlpPolicy")
        return cls(policy, env, policy_kwargs=policy_kwargs, **kwargs)

    # ------------------------------------------------------------------ setup

    def _setup_model(self) -> None:
        super()._setup_model()
        self.q_net = self.policy.q_net
        self.q_net_target = self.policy.q_net_target
        # Copy BatchNorm running stats to the target on every target update (SB3 GH issue #996).
        self.batch_norm_stats = get_parameters_by_name(self.q_net, ["running_"])
        self.batch_norm_stats_target = get_parameters_by_name(self.q_net_target, ["running_"])
        self._info_stats = {tag: deque(maxlen=self._stats_window_size) for _, tag in self.info_keywords}
        if self.target_update_unit == "step" and self.n_envs > self.target_update_interval:
            logger.warning(
                "n_envs (%d) > target_update_interval (%d) env steps: target updated on every env.step()",
                self.n_envs,
                self.target_update_interval,
            )

    @property
    def is_branching(self) -> bool:
        """True for ``MultiBinary`` actions (branching head)."""
        return isinstance(self.action_space, spaces.MultiBinary)

    @property
    def is_patch_mode(self) -> bool:
        """True for per-patch scores (``PatchSelectEnv``'s ``patches`` mode): one decision per image."""
        return isinstance(self.action_space, spaces.Box)

    # ------------------------------------------------------------------ exploration

    def _exploration_value(self) -> float:
        """Epsilon at the current env step (linear: progress-based, exp: step-based)."""
        start, end = self.exploration_initial_eps, self.exploration_final_eps
        if self.exploration_schedule == "exp":
            return end + (start - end) * math.exp(-self.num_timesteps / self.exploration_decay)
        progress = 1.0 - self._current_progress_remaining
        if progress >= self.exploration_fraction:
            return end
        return start + progress * (end - start) / self.exploration_fraction

    def _random_actions(self, n: int) -> np.ndarray:
        """``n`` uniformly random actions; masks keep at least one patch."""
        if self.is_branching:
            return _random_masks(self.action_space.np_random, n, int(self.action_space.n))
        return np.array([self.action_space.sample() for _ in range(n)])

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Epsilon-greedy action (greedy when ``deterministic=True``).

        Args:
            observation: One observation or a batch (one per env).
            state: Unused (no recurrent policy).
            episode_start: Unused.
            deterministic: Greedy action, no exploration.

        Returns:
            The action(s) (``(N,)`` int mask per observation for ``MultiBinary``) and ``state``.
        """
        action, state = self.policy.predict(observation, state, episode_start, deterministic)
        if deterministic or self.exploration_rate <= 0.0:
            return action, state
        vectorized = self.policy.is_vectorized_observation(observation)
        batch = action if vectorized else action[None]
        if self.is_patch_mode:
            # Explore per image: a row of uniform scores, i.e. a uniformly random set of k patches.
            rng = self.action_space.np_random
            explore_rows = rng.random(batch.shape[:2]) < self.exploration_rate
            if explore_rows.any():
                batch = batch.copy()
                batch[explore_rows] = rng.uniform(-1, 1, size=(int(explore_rows.sum()), batch.shape[-1]))
            return (batch if vectorized else batch[0]), state
        explore = self.action_space.np_random.random(len(batch)) < self.exploration_rate
        if explore.any():
            batch = batch.copy()
            batch[explore] = self._random_actions(int(explore.sum())).astype(batch.dtype)
        return (batch if vectorized else batch[0]), state

    def _sample_action(
        self, learning_starts: int, action_noise: Any = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.num_timesteps < learning_starts:
            # Warm-up: uniformly random actions (masks with at least one kept patch).
            action = self._random_actions(n_envs)
        else:
            assert self._last_obs is not None, "self._last_obs was not set"
            action, _ = self.predict(self._last_obs, deterministic=False)
        return action, action

    # ------------------------------------------------------------------ rollout hooks

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        super()._update_info_buffer(infos, dones)
        for info in infos:
            seen: set[str] = set()
            for key, tag in self.info_keywords:
                if tag not in seen and info.get(key) is not None:
                    self._info_stats[tag].append(float(np.mean(info[key])))
                    seen.add(tag)

    def _on_step(self) -> None:
        """After every env step: target update in "step" units, epsilon, rollout statistics."""
        self._n_calls += 1
        if (
            self.target_update_unit == "step"
            and self._n_calls % max(self.target_update_interval // self.n_envs, 1) == 0
        ):
            self._update_target()
        self.exploration_rate = self._exploration_value()
        self.logger.record("rollout/exploration_rate", self.exploration_rate)
        for tag, values in self._info_stats.items():
            if values:
                self.logger.record(tag, float(np.mean(values)))

    def _update_target(self) -> None:
        polyak_update(self.q_net.parameters(), self.q_net_target.parameters(), self.tau)
        polyak_update(self.batch_norm_stats, self.batch_norm_stats_target, 1.0)

    # ------------------------------------------------------------------ learning

    def _gather_q(self, q_values: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """Q of the taken actions: ``(B, 1)`` for Discrete, ``(B, N)`` for MultiBinary."""
        if self.is_branching:
            # q_values (B, N, 2), actions (B, N) of 0/1 -> Q(s, b, a_b) per branch.
            return q_values.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        return q_values.gather(1, actions.long().reshape(-1, 1))

    def _double_q_target(
        self,
        next_observations: PyTorchObs,
        rewards: th.Tensor,
        dones: th.Tensor,
        discounts: th.Tensor | float | None = None,
    ) -> th.Tensor:
        """Double-DQN TD target ``r + gamma (1 - done) Q_target(s', argmax_a Q_online(s', a))``.

        Args:
            next_observations: Batch of next observations.
            rewards: ``(B, 1)`` rewards.
            dones: ``(B, 1)`` termination flags (timeouts already removed by the replay buffer).
            discounts: Per-sample discounts (n-step) or None for ``gamma``.

        Returns:
            ``(B, 1)`` targets for Discrete, ``(B, N)`` (one per branch) for MultiBinary.
        """
        discounts = self.gamma if discounts is None else discounts
        with th.no_grad():
            # The online net chooses the next action (per branch), ...
            next_actions = self.q_net(next_observations).argmax(dim=-1, keepdim=True)
            # ... the target net evaluates it: (B, 1) or (B, N).
            next_q = self.q_net_target(next_observations).gather(-1, next_actions).squeeze(-1)
            if not self.is_branching:
                next_q = next_q.reshape(-1, 1)
            # One-step TD target; (B, 1) rewards/dones broadcast over the N branches.
            return rewards + (1 - dones) * discounts * next_q

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        """Run ``gradient_steps`` Double-DQN updates on minibatches from the replay buffer."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        if self.is_patch_mode:
            self._train_patches(gradient_steps, batch_size)
            return
        losses, q_means = [], []
        for _ in range(gradient_steps):
            replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            # n-step replay gives gamma**k per sample; otherwise gamma.
            discounts = replay_data.discounts if replay_data.discounts is not None else self.gamma
            target_q = self._double_q_target(
                replay_data.next_observations, replay_data.rewards, replay_data.dones, discounts
            )
            # Q(s, a) of the stored actions (per branch for MultiBinary).
            current_q = self._gather_q(self.q_net(replay_data.observations), replay_data.actions)
            # Huber loss; the mean over (B, N) is the average of the per-branch losses.
            loss = F.smooth_l1_loss(current_q, target_q)
            losses.append(loss.item())
            q_means.append(current_q.mean().item())
            self._optimize(loss)
            if self.target_update_unit == "update" and self._n_updates % self.target_update_interval == 0:
                self._update_target()
        self._record_train(losses, q_means)

    def _optimize(self, loss: th.Tensor) -> None:
        """One optimiser step on ``loss``, gradients clipped to ``max_grad_norm``; counts the update."""
        self.policy.optimizer.zero_grad()
        loss.backward()
        th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.policy.optimizer.step()
        self._n_updates += 1

    def _record_train(self, losses: list[float], q_means: list[float]) -> None:
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", float(np.mean(losses)))
        self.logger.record("train/q_mean", float(np.mean(q_means)))

    def _train_patches(self, gradient_steps: int, batch_size: int) -> None:
        """Per-image updates of the patches mode: regress the kept set's value on the image's reward.

        Each image is a one-step decision (its patches do not change which image comes next, and its
        reward, the loss gap to all patches, is immediate), so the target is the reward itself: a
        contextual bandit, the ``gamma -> 0`` limit of the Double-DQN target, and the target network
        is not needed for it.
        """
        buffer = self.replay_buffer
        assert isinstance(buffer, PatchReplayBuffer)
        if buffer.size() == 0:
            return
        losses, q_means = [], []
        for _ in range(gradient_steps):
            data = buffer.sample(batch_size)
            q = self.q_net(data.observations)  # (b, N) patch values
            mask = data.actions.float()
            # Q(s, S) = mean of the kept patches' values.
            current_q = (q * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
            loss = F.smooth_l1_loss(current_q, data.rewards)
            losses.append(loss.item())
            q_means.append(current_q.mean().item())
            self._optimize(loss)
        self._record_train(losses, q_means)

    def learn(
        self: SelfDDQN,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "DDQN",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfDDQN:
        """Train for ``total_timesteps`` env steps (see SB3's ``OffPolicyAlgorithm.learn``).

        Args:
            total_timesteps: Env steps to collect.
            callback: SB3 callback(s) called at every step.
            log_interval: Dump the logs every this many episodes.
            tb_log_name: TensorBoard run name.
            reset_num_timesteps: Restart the step counter (and the TensorBoard run).
            progress_bar: Show a progress bar (tqdm + rich) labelled ``"<tb_log_name> (steps)"``, one
                tick per env step (for ``PatchSelectEnv``, one ViT training step).

        Returns:
            self.
        """
        if progress_bar:
            # SB3's own bar has no label; this one names the run and the unit it counts.
            callback = with_progress_bar(callback, desc=tb_log_name, unit="step")
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=False,
        )

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "q_net", "q_net_target", "_info_stats"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "policy.optimizer"], []
