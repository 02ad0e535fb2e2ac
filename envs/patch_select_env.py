"""PatchSelectEnv: choose the patches a Vision Transformer trains on (AgentViT as a Gymnasium env).

AgentViT (Cauteruccio, Marchetti, Traini, Ursino, Virgili, "Adaptive patch selection to improve
Vision Transformers through Reinforcement Learning", Applied Intelligence 2025) trains a ViT and a
Double-DQN agent jointly: the agent reads the first block's attention and picks which patches the ViT
sees, so training touches fewer tokens. Here the ViT and its training loop live inside the env and
one env step is one ViT training step; any discrete-action SB3 agent (DQN, PPO, A2C) or
``keepgym.agents.DDQN`` can drive it.

With ``distributed=True`` (under ``torchrun``) the ViT's training step is data-parallel: every rank
draws the same seeded global batch and scores all of it (so all ranks observe the same state), commits
rank 0's action (broadcast each step), trains on its contiguous slice through DistributedDataParallel
(gradients averaged) and takes the loss averaged over the ranks for the reward and the NaN guard, so
the ViT, the observation and the reward are the same on every rank.

``benchmark_vit`` measures what token dropping buys on the hardware at hand (``keepgym bench vit``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces

from keepgym.envs.data import BatchLoader, DatasetSplits, load_dataset
from keepgym.envs.distributed import all_reduce_sum, main_first
from keepgym.envs.metrics import synchronize
from keepgym.envs.trainer import train_loader
from keepgym.models import create_model, save_model
from keepgym.models.vit import ViT, select_random_k, select_topk, vit_cifar
from keepgym.models.vit_adapter import adapt_vit

__all__ = ["ACTION_MODES", "DEFAULT_KEEP_RATIOS", "PATCH_FEATURES", "STATES", "PatchSelectEnv", "benchmark_vit"]

logger = logging.getLogger(__name__)

ACTION_MODES = ("ratio", "mask", "patches")
#: Per-patch features of the ``"patches"`` observation, in order (see the class docstring).
PATCH_FEATURES = ("attention", "entropy", "token_norm", "pixel_std", "attention_rank", "row", "col", "radius")
STATES = ("attention", "agentvit")
DEFAULT_KEEP_RATIOS = (0.25, 0.375, 0.5, 0.75, 1.0)
# AgentViT's CIFAR-10 setting: 30 of 64 patches wanted.
TARGET_KEEP_FRACTION = 30 / 64


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _standardize(v: torch.Tensor) -> torch.Tensor:
    """Per image (row): zero mean, unit variance."""
    return (v - v.mean(dim=1, keepdim=True)) / (v.std(dim=1, keepdim=True) + 1e-6)


def _positions(grid: int) -> torch.Tensor:
    """``(N, 3)``: row and column in [-1, 1] and the distance from the centre in [0, 1], row-major."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    scale = max(grid - 1, 1) / 2
    row, col = (r.flatten().float() - scale) / scale, (c.flatten().float() - scale) / scale
    return torch.stack((row, col, torch.sqrt((row**2 + col**2) / 2)), dim=1)



def _adam(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Adam:
    # The fused kernel is several times faster than the per-tensor loop, on CPU too; the optimiser step
    # is a cost every keep ratio pays, so a slow one would hide what dropping tokens saves.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=lr, fused=fused)


class PatchSelectEnv(gym.Env):
    """Pick the patches a ViT trains on, one mini-batch at a time (AgentViT).

    ## Description

    The env owns a ViT (a SimpleViT ``keepgym.models.vit.ViT`` by default, or the torchvision/timm
    ``VisionTransformer`` given as ``model=``), its Adam optimiser and a shuffled, augmented
    training loader. One step trains the ViT for one step on one mini-batch, keeping only the
    patches the action chooses: dropped tokens are removed by a gather right after the position
    embedding, so every block is cheaper (``info["macs_per_image"]``). The agent's task is to keep
    few patches (near ``target_keep``) while the ViT's loss keeps falling.

    ## Action Space

    * ``action_mode="ratio"`` (default): ``Discrete(len(keep_ratios))``. Action ``i`` keeps
      ``k = max(1, round(keep_ratios[i] * N))`` patches of every image: each image its own top-k by
      the scores the observation is made of (its attention scores with ``state="attention"``).
    * ``action_mode="mask"``: ``MultiBinary(N)``, one keep-mask for the whole batch as in AgentViT;
      a mask that keeps nothing keeps the patch with the highest score instead (at least one patch per
      image is always kept).
    * ``action_mode="patches"``: the agent chooses **which** patches, per image.
      ``Box(-1, 1, (batch_size, N), float32)``: a score per patch of every image; each image keeps its
      ``target_keep`` highest-scoring patches (any finite scores are accepted; only their order counts).
      ``keepgym.agents.DDQN`` learns it with a per-patch Q head; the ratio and mask modes are the
      ones for SB3's discrete-action algorithms.

    An action of the wrong shape or type, or with NaN/inf scores, raises ``ValueError`` before
    anything is trained.

    ## Observation Space

    ``Box(shape=(N,), float32)``, N = ``(image_size / patch_size)**2`` patches, row-major. For the batch
    the next action applies to, block ``state_layer`` (default 0) is run on all patches under
    ``no_grad``, and the observation is the batch mean of

    * ``state="attention"`` (default): the softmax attention each patch receives, averaged over heads
      and query tokens (the CLS query's row when the ViT has a CLS token); bounds ``[0, 1]``, sums to
      about 1;
    * ``state="agentvit"``: AgentViT's own state, the channel mean of that block's attention
      sub-layer output; unbounded.

    With ``action_mode="patches"`` the observation is per image and per patch instead:
    ``Box(-N, N, (batch_size, N, 8), float32)``, features (``PATCH_FEATURES``) read off block
    ``state_layer`` run on all tokens: the attention the patch receives (mean over heads and queries,
    times N), the entropy of its own attention row (over log T), its token norm and its pixel standard
    deviation (both standardised per image), the rank of its score (the top-k signal, in [0, 1]), its
    row and column in [-1, 1] and its distance from the centre in [0, 1]. (Entropy of the head-averaged
    row: a quarter of the cost of per-head entropies, which the scoring pass would feel.)

    ## Rewards

    AgentViT's reward ``loss_weight * L_ref / L_t - patch_weight * |z - z*| / z*``, with ``L_t`` the
    training loss of this step, ``L_ref`` the loss of the run's first rewarded step, ``z = N - kept``
    the dropped patches and ``z* = N - target_keep``.

    ``action_mode="patches"`` rewards the selection instead of the count (every image keeps
    ``target_keep``): for the first ``reward_images`` images of the batch the loss with all patches
    ``L_all,i`` is measured (no gradient, before the update) beside the training loss on the kept
    patches ``L_kept,i``; ``info["image_rewards"]`` holds ``L_all,i - L_kept,i`` (0 is as good as all
    patches; lower is a worse choice) and ``info["image_keep"]`` those images' kept indices, and the
    reward is ``loss_weight`` times their mean.

    ## Starting State

    ``reset(seed=s)`` starts a new training run: a fresh ViT initialised from ``s``, a new optimiser,
    epoch 0, the data order reseeded. ``reset()`` without a seed moves on to the next epoch of the
    current run and keeps the ViT (what SB3 does between episodes after its first, seeded reset).
    The first reset always starts a run. ``reset(options={"state_dict": state})`` instead continues the
    run saved by :meth:`state_dict` (taken between two steps of an epoch) where it stopped: the
    resume path of :class:`keepgym.agents.callbacks.EpochCheckpointCallback`, through SB3's
    ``VecEnv.set_options``.

    Warm-up happens outside the agent's MDP: a reset that starts a run first trains the ViT for
    ``warmup_epochs`` epochs on all patches, then returns the first state of epoch ``warmup_epochs``.
    The agent never sees a warm-up transition. With ``model=`` a new run restores the given model's
    weights (the seed then reseeds the data order only).

    ## Episode End

    An episode is one epoch over the training split (last incomplete batch dropped):
    ``truncated=True`` after its last batch; the env never terminates. The observation returned
    then scores the last batch again, with the updated ViT. Call ``reset()`` to go on.

    ## Info

    ``loss``, ``kept`` (patches per image), ``macs_per_image`` (the training forward, counted like
    ``ViT.analytic_macs``), ``state_macs_per_image`` (the scoring pass), ``epoch``, ``step``,
    ``reward_loss`` and ``reward_patch`` (the two reward terms), ``learning_rate``,
    ``diverged`` (see below), ``image_rewards``/``image_keep`` (patches mode) and, when
    ``info_timings`` is True, ``step_seconds`` (wall time of the training step: forward, backward,
    optimiser). Timings differ between otherwise identical runs, so they are off by default:
    Gymnasium's determinism checker compares ``info`` exactly.

    Divergence guard: a NaN/inf training loss skips that update, restores the ViT and optimiser state
    kept every ``guard_interval`` steps and at the start of every epoch, lowers the learning rate 10x
    (once) and sets ``info["diverged"]``; the step's loss reward term is 0, the episode goes on, and
    :attr:`divergence_events` lists what happened.

    Evaluation: ``evaluate(select_fn, split="val")`` measures accuracy, MACs and throughput of the
    current ViT with patches chosen by ``select_fn(scores) -> indices`` (or all), and
    ``evaluate_policy(agent, split="val")`` with an agent's choices, on data the ViT never trained on.

    State: ``state_dict()``/``load_state_dict()`` hold the whole training run (ViT, optimiser, NaN-guard
    copy, epoch, step, data order, RNG); loading one and stepping on gives bit-identical results. Envs
    pickle (the data stream is rebuilt on unpickling the same way).

    ## Arguments

    Args:
        dataset: Dataset name for ``keepgym.envs.data.load_dataset`` (``digits``, ``synthetic``, ``cifar10``,
            ``fashion_mnist``, ``imagenette``, ...).
        data_root: Folder of real datasets.
        image_size: Resize images to this size (default: the dataset's own).
        patch_size: Patch side; must divide the image size.
        dim: ViT token width.
        depth: ViT blocks.
        heads: Attention heads.
        mlp_dim: Block MLP width.
        batch_size: Training mini-batch (one step).
        learning_rate: Adam learning rate of the ViT.
        action_mode: ``"ratio"``, ``"mask"`` or ``"patches"``.
        keep_ratios: Keep fractions in ``(0, 1]`` of the ``"ratio"`` actions.
        target_keep: Patches the reward aims for, in ``[1, N - 1]`` (default ``round(30 / 64 * N)``).
        loss_weight: Weight of the loss term.
        patch_weight: Weight of the patch-count term.
        state: ``"attention"`` or ``"agentvit"``.
        state_layer: Block whose attention makes the observation.
        warmup_epochs: Epochs trained on all patches inside the reset that starts a run.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        dim_head: Width of one attention head (AgentViT: 64).
        cls_token: Give the ViT a CLS token (always kept).
        augment: Random crop + flip on training batches.
        train_size: Use at most this many training images (before the validation hold-out).
        val_size: Fraction or count of training images held out for validation.
        download: Let torchvision download a missing real dataset.
        info_timings: Put ``step_seconds`` in ``info`` (off by default: ``check_env`` compares infos).
        data: A ready ``DatasetSplits`` (tests, custom data); overrides ``dataset``.
        render_mode: None or ``"rgb_array"``: :meth:`render` returns the observation as a heat map
            (one cell per patch, brighter = more attention; SB3's ``make_vec_env`` asks for it).
        guard_interval: Steps between the copies of the ViT/optimiser state the NaN guard restores.
        distributed: Data-parallel ViT training over the open process group (module docstring);
            ``batch_size`` is then the global batch and every rank must step the env together
            (ratio and mask modes).
        model: A ViT to train instead of building one: a keepgym ``ViT``, or a torchvision or timm
            ``VisionTransformer`` (wrapped by ``keepgym.models.vit_adapter.adapt_vit``; timm is an
            optional extra). Its image size, channels and classes must match the data; ``patch_size``,
            ``dim``, ``depth``, ``heads``, ``mlp_dim``, ``dim_head`` and ``cls_token`` are then ignored.
        reward_images: Patches mode: images per batch whose all-patch loss is measured for the reward
            (default ``max(1, batch_size // 8)``; each costs a forward pass without gradient, so this
            default keeps that cost near 4% of a full-patch training step).

    Raises:
        ValueError: A patch size that does not divide the image, ``keep_ratios`` outside ``(0, 1]``,
            an unknown mode, or a ``target_keep`` outside ``[1, N - 1]``.

    ## Version History

    * v1: warm-up moved into ``reset`` (out of the agent's MDP), at least one patch per image always
      kept, timings out of ``info`` by default; the ``patches`` mode, ``model=``, ``state_dict`` and
      pickling added (they leave the ratio/mask MDP after warm-up unchanged).
    * v0: initial version (warm-up epochs were steps of the agent's episode, rewarded 0). The ``-v0``
      ids now give the v1 behaviour, kept for existing scripts (``keepgym.envs`` says why).
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        dataset: str = "digits",
        data_root: str | None = None,
        image_size: int | None = None,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 16,
        mlp_dim: int = 512,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        action_mode: str = "ratio",
        keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS,
        target_keep: int | None = None,
        loss_weight: float = 1.0,
        patch_weight: float = 20.0,
        state: str = "attention",
        state_layer: int = 0,
        warmup_epochs: int = 1,
        device: str | torch.device = "auto",
        *,
        dim_head: int = 64,
        cls_token: bool = False,
        augment: bool = True,
        train_size: int | None = None,
        val_size: float | int = 0.1,
        download: bool = False,
        info_timings: bool = False,
        data: DatasetSplits | None = None,
        render_mode: str | None = None,
        guard_interval: int = 50,
        distributed: bool = False,
        model: torch.nn.Module | None = None,
        reward_images: int | None = None,
    ) -> None:
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {action_mode!r}")
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        ratios = tuple(float(r) for r in keep_ratios)
        if not ratios or any(not (0.0 < r <= 1.0) for r in ratios):
            raise ValueError(
                f"keep_ratios must be a non-empty sequence of values in (0, 1], got {keep_ratios!r}"
            )
        if batch_size < 1 or warmup_epochs < 0 or learning_rate <= 0:
            raise ValueError("batch_size must be >= 1, warmup_epochs >= 0 and learning_rate > 0")
        if guard_interval < 1:
            raise ValueError(f"guard_interval must be >= 1, got {guard_interval}")
        vit_in = adapt_vit(model) if model is not None else None
        if vit_in is not None:
            depth, patch_size = vit_in.depth, vit_in.patch_size
        if not 0 <= state_layer < depth:
            raise ValueError(f"state_layer must be in [0, depth={depth}), got {state_layer}")
        if action_mode == "patches" and distributed:
            raise ValueError("action_mode='patches' does not support distributed=True yet")

        if data is None:
            data = load_dataset(
                dataset,
                data_root,
                val_size=val_size,
                download=download,
                image_size=image_size,
                train_size=train_size,
            )
        size = data.image_size
        if image_size is not None and image_size != size:
            raise ValueError(f"image_size={image_size} but the data has {size}x{size} images")
        if patch_size < 1 or size % patch_size != 0:
            raise ValueError(f"patch_size {patch_size} does not divide the image size {size}")
        if len(data.train_y) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(data.train_y)} training images")
        if vit_in is not None and (
            vit_in.image_size != size or vit_in.in_chans != data.in_chans or vit_in.num_classes != data.num_classes
        ):
            raise ValueError(
                f"model takes {vit_in.in_chans}x{vit_in.image_size}x{vit_in.image_size} images into "
                f"{vit_in.num_classes} classes; the data has {data.in_chans}x{size}x{size} and "
                f"{data.num_classes} classes"
            )
        if reward_images is None:
            reward_images = max(1, batch_size // 8)
        if not 1 <= reward_images <= batch_size:
            raise ValueError(f"reward_images must be in [1, batch_size={batch_size}], got {reward_images}")
        n = (size // patch_size) ** 2
        if target_keep is None:
            target_keep = min(max(int(round(TARGET_KEEP_FRACTION * n)), 1), n - 1)
        if not 1 <= target_keep <= n - 1:
            raise ValueError(f"target_keep must be in [1, N - 1] = [1, {n - 1}], got {target_keep}")

        self.data = data
        self.num_patches = n
        self.batch_size = batch_size
        self.learning_rate = float(learning_rate)
        self.action_mode = action_mode
        self.keep_ratios = ratios
        self.keep_counts = tuple(min(max(int(round(r * n)), 1), n) for r in ratios)
        self.target_keep = int(target_keep)
        self.loss_weight = float(loss_weight)
        self.patch_weight = float(patch_weight)
        self.state = state
        self.state_layer = state_layer
        self.warmup_epochs = warmup_epochs
        self.augment = augment
        self.info_timings = info_timings
        self.guard_interval = int(guard_interval)
        self.device = _resolve_device(device)
        self.render_mode = render_mode
        self.reward_images = int(reward_images)
        self._model_init: dict[str, torch.Tensor] | None = None
        if vit_in is not None:
            vit_in.to(self.device)
            self._model_init = {k: v.detach().clone() for k, v in vit_in.state_dict().items()}
        self._model_in = vit_in
        self._vit_kwargs = dict(
            num_classes=data.num_classes,
            in_chans=data.in_chans,
            image_size=size,
            patch_size=patch_size,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            dim_head=dim_head,
            cls_token=cls_token,
        )

        if action_mode == "ratio":
            self.action_space: spaces.Space = spaces.Discrete(len(ratios))
        elif action_mode == "mask":
            self.action_space = spaces.MultiBinary(n)
        else:
            self.action_space = spaces.Box(-1.0, 1.0, shape=(batch_size, n), dtype=np.float32)
        if action_mode == "patches":
            shape: tuple[int, ...] = (batch_size, n, len(PATCH_FEATURES))
            # Every feature lies in [-N, N]: attention * N <= N, |standardised value| <= sqrt(N - 1).
            self.observation_space = spaces.Box(-float(n), float(n), shape=shape, dtype=np.float32)
        else:
            low, high = (0.0, 1.0) if state == "attention" else (-np.inf, np.inf)
            self.observation_space = spaces.Box(low=low, high=high, shape=(n,), dtype=np.float32)
        self._positions = _positions(math.isqrt(n)).to(self.device)

        self._loader = train_loader(data, batch_size, augment=augment, drop_last=True, device=self.device)
        # A ViT exists from the start (seed 0) so `vit`, `evaluate` and `save` work before any reset;
        # the first reset always starts a fresh run.
        self.distributed = bool(distributed)
        self._rank, self._world = 0, 1
        if self.distributed:
            import torch.distributed as dist

            self._rank, self._world = dist.get_rank(), dist.get_world_size()
            if batch_size < self._world:
                raise ValueError(f"batch_size {batch_size} is smaller than the world size {self._world}")
        self._vit = self._build_vit(0)
        self.patch_size = int(self._vit.patch_size)
        self._net: torch.nn.Module = self._vit  # what the training forward pass calls (DDP when distributed)
        self._optimizer: torch.optim.Optimizer | None = None
        self._run_started = False
        self._epoch = 0
        self._step = 0
        self._loss_ref: float | None = None
        self._iter: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scores: torch.Tensor | None = None
        self._feats: torch.Tensor | None = None
        self._epoch_gen_state: torch.Tensor | None = None  # data generator at the start of this epoch
        # NaN guard: a copy of the last good ViT + optimiser state, and the events handled.
        self._good_state: tuple[dict, dict] | None = None
        self._divergence_events: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- properties
    @property
    def vit(self) -> ViT:
        """The ViT being trained."""
        return self._vit

    @property
    def epoch(self) -> int:
        """Current epoch of the training run (0-based)."""
        return self._epoch

    @property
    def steps_per_epoch(self) -> int:
        """Steps in one episode (full training batches per epoch)."""
        return len(self._loader)

    @property
    def epoch_step(self) -> int:
        """Steps taken in the current epoch (0 right after a reset)."""
        return self._step

    @property
    def divergence_events(self) -> list[dict[str, Any]]:
        """NaN/inf training losses the guard handled in this run (``epoch``, ``step``, ``action``)."""
        return list(self._divergence_events)

    @property
    def state_macs_per_image(self) -> int:
        """MACs per image of the scoring pass that makes the observation."""
        return self._vit.analytic_score_macs(self.state_layer)

    # ------------------------------------------------------------------- gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if options and options.get("state_dict") is not None:
            # Resume a saved run (``learn``'s first reset on a resumed agent): no new run, no new epoch.
            self.load_state_dict(options["state_dict"])
            return self.observe(), {"epoch": self._epoch}
        if seed is not None or not self._run_started:
            self._new_run()
            self._warmup()
        else:
            self._epoch += 1
            self._save_good_state()  # also picks up weights loaded from outside between epochs
        self._start_epoch()
        return self._observation(), {"epoch": self._epoch}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._batch is None or self._scores is None:
            raise RuntimeError("call reset() before step() (and after an episode ends)")
        if self.distributed:
            action = main_first(lambda: action)  # rank 0 decides; every rank trains with its choice
        # Parse first: a bad action must leave the ViT and the data stream untouched.
        keep = self._action_to_keep(action, self._scores)
        kept = self.num_patches if keep is None else int(keep.shape[-1])
        x, y = self._batch
        opt = self._optimizer
        assert opt is not None

        ref_losses = None
        if self.action_mode == "patches":
            # The all-patch loss of the first `reward_images` images, with the weights the step starts from.
            m = self.reward_images
            self._vit.train()
            with torch.no_grad():
                ref_losses = F.cross_entropy(self._vit(x[:m]), y[:m], reduction="none").float()
        loss_value, image_losses, diverged, step_seconds = self._train_step(x, y, keep)

        reward_loss = reward_patch = 0.0
        extra: dict[str, Any] = {}
        if self.action_mode == "patches":
            # Selection quality: loss with all patches minus loss with the kept ones, per rewarded image.
            if not diverged:
                assert ref_losses is not None and image_losses is not None and keep is not None
                m = self.reward_images
                gains = (ref_losses - image_losses[:m]).cpu().numpy().astype(np.float32)
                extra = {"image_rewards": gains, "image_keep": keep[:m].cpu().numpy()}
                reward_loss = self.loss_weight * float(gains.mean())
        else:
            # A diverged step says nothing about the loss: its loss term is 0 (and L_ref stays unset).
            if not diverged:
                if self._loss_ref is None:
                    self._loss_ref = loss_value
                reward_loss = self.loss_weight * self._loss_ref / max(loss_value, 1e-8)
            z, z_star = self.num_patches - kept, self.num_patches - self.target_keep
            reward_patch = -self.patch_weight * abs(z - z_star) / z_star
        reward = reward_loss + reward_patch

        self._step += 1
        if not diverged and self._step % self.guard_interval == 0:
            self._save_good_state()
        truncated = False
        try:
            self._batch = next(self._iter)  # type: ignore[arg-type]
            self._score_batch(self._batch[0])
        except StopIteration:
            # End of the epoch: show the last batch again, as the updated ViT sees it.
            truncated = True
            self._score_batch(x)
            self._batch = None
        obs = self._observation()
        if truncated:
            self._scores = self._feats = None

        info: dict[str, Any] = {
            "loss": loss_value,
            "kept": kept,
            "macs_per_image": self._vit.analytic_macs(kept),
            "state_macs_per_image": self.state_macs_per_image,
            "epoch": self._epoch,
            "step": self._step,
            "reward_loss": reward_loss,
            "reward_patch": reward_patch,
            "diverged": diverged,
            "learning_rate": float(opt.param_groups[0]["lr"]),
            **extra,
        }
        if self.info_timings:
            info["step_seconds"] = step_seconds
        return obs, float(reward), False, truncated, info

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The whole training run: ViT, optimiser, NaN-guard copy, epoch, step, data order and RNG.

        Plain tensors and Python values only (``torch.save`` + ``torch.load(weights_only=True)``). Taken
        between two steps; :meth:`load_state_dict` continues bit for bit from here.

        Raises:
            RuntimeError: Before the first reset (no run yet).
        """
        if not self._run_started or self._optimizer is None or self._epoch_gen_state is None:
            raise RuntimeError("no training run yet: call reset() first")
        good = self._good_state
        return {
            "vit": {k: v.detach().clone() for k, v in self._vit.state_dict().items()},
            "optimizer": copy.deepcopy(self._optimizer.state_dict()),
            "good_state": (
                None if good is None else {"vit": copy.deepcopy(good[0]), "optimizer": copy.deepcopy(good[1])}
            ),
            "epoch": self._epoch,
            "step": self._step,
            "in_episode": self._batch is not None,
            "loss_ref": self._loss_ref,
            "epoch_data_generator": self._epoch_gen_state.clone(),
            "np_random": copy.deepcopy(self.np_random.bit_generator.state),
            "divergence_events": copy.deepcopy(self._divergence_events),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run saved by :meth:`state_dict` (same env settings): the next ``step`` (or, after
        an episode's last step, ``reset()``) gives what the saved env would have given."""
        if self._optimizer is None:
            self._optimizer = _adam(self._vit, self.learning_rate, self.device)
        self._vit.load_state_dict(state["vit"])
        self._optimizer.load_state_dict(state["optimizer"])
        good = state.get("good_state")
        self._good_state = None if good is None else (good["vit"], good["optimizer"])
        self._epoch = int(state["epoch"])
        self._loss_ref = state["loss_ref"]
        self._divergence_events = list(state["divergence_events"])
        self.np_random.bit_generator.state = state["np_random"]
        self._run_started = True
        self._seek(state["epoch_data_generator"], int(state["step"]), bool(state["in_episode"]))

    def __getstate__(self) -> dict[str, Any]:
        # The batch iterator is a generator (not picklable): keep where it is, rebuild it on unpickling.
        d = self.__dict__.copy()
        loader = copy.copy(self._loader)
        loader.generator = None  # type: ignore[assignment]
        d.update(_loader=loader, _iter=None, _batch=None, _scores=None, _feats=None, _net=None)
        d["_pickled_generator"] = self._loader.generator.get_state()
        d["_pickled_position"] = (
            (self._epoch_gen_state, self._step, self._batch is not None) if self._iter is not None else None
        )
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        gen_state, position = d.pop("_pickled_generator"), d.pop("_pickled_position")
        self.__dict__.update(d)
        self._net = self._vit
        self._loader.generator = torch.Generator()
        self._loader.generator.set_state(gen_state)
        if position is not None:
            self._seek(*position)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(
        self,
        select_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        split: str = "val",
        batch_size: int = 256,
        needs_scores: bool = True,
    ) -> dict[str, float]:
        """Accuracy, cost and speed of the current ViT with patches chosen by ``select_fn``.

        Args:
            select_fn: ``scores (B, N) -> kept indices (B, k) or (k,)``, scores as in the observation
                (per image); e.g. ``functools.partial(models.vit.select_topk, k=30)``. None keeps all
                patches and skips the scoring pass.
            split: ``"val"`` (default, never trained on) or ``"test"``/``"train"``.
            batch_size: Evaluation batch size.
            needs_scores: False skips the scoring pass (time and MACs) and hands ``select_fn`` zeros of
                the right shape, for selectors that ignore the scores (random-k).

        Returns:
            ``accuracy`` in [0, 1], ``macs_per_image`` (forward, mean over images),
            ``score_macs_per_image`` (scoring pass, 0 without ``select_fn``), ``images_per_second``
            (scoring + forward) and ``kept_patches`` (mean per image).
        """

        def choose(scores: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
            assert select_fn is not None
            return select_fn(scores)

        return self._evaluate(choose if select_fn is not None else None, split, batch_size, needs_scores)

    @torch.no_grad()
    def evaluate_policy(
        self, policy: Any, split: str = "val", deterministic: bool = True, batch_size: int | None = None
    ) -> dict[str, float]:
        """Like ``evaluate`` with the patches an agent chooses, batch by batch, as ``step`` applies them.

        Args:
            policy: An object with SB3's ``predict(obs, deterministic=...)`` or a callable ``obs -> action``.
            split: Data split (default ``"val"``).
            deterministic: Passed to ``predict``.
            batch_size: Images per agent decision (default: the training batch size; the patches mode
                always decides for ``batch_size`` images, padding a short last batch).
        """

        def choose(scores: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
            return self._policy_keep(policy, scores, feats, deterministic)

        if self.action_mode == "patches":
            batch_size = self.batch_size
        return self._evaluate(choose, split, batch_size or self.batch_size)

    @torch.no_grad()
    def choose_patches(self, policy: Any, images: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """The patches ``policy`` keeps of normalised ``images`` ``(B, C, H, W)``, as ``step`` applies its
        action: kept indices ``(B, k)`` or ``(k,)`` (one set for the batch in the mask mode).

        Args:
            policy: SB3's ``predict(obs, deterministic=...)`` or a callable ``obs -> action``.
            images: A batch on the env's device (at most ``batch_size`` images in the patches mode).
            deterministic: Passed to ``predict``.
        """
        return self._policy_keep(policy, *self._score_and_features(images), deterministic)

    def observe(self) -> np.ndarray:
        """The observation of the current state (what the last ``reset``/``step`` returned)."""
        if self._scores is None:
            raise RuntimeError("no current batch: call reset()")
        return self._observation()

    def render(self) -> np.ndarray | None:
        """``"rgb_array"``: the current observation as an ``(8 s, 8 s, 3)`` uint8 heat map, ``s * s = N``
        (min-max scaled; black before the first reset)."""
        if self.render_mode != "rgb_array":
            return None
        side = math.isqrt(self.num_patches)
        if self._scores is None:
            return np.zeros((8 * side, 8 * side, 3), dtype=np.uint8)
        obs = self._scores.float().mean(dim=0).cpu().numpy().astype(np.float64)
        span = float(obs.max() - obs.min())
        grid = ((obs - obs.min()) / span if span > 0 else np.zeros_like(obs)).reshape(side, side)
        grey = np.kron(np.round(255 * grid).astype(np.uint8), np.ones((8, 8), dtype=np.uint8))
        return np.repeat(grey[..., None], 3, axis=2)

    def save(self, path: str, **extra: Any) -> None:
        """Save the ViT with ``keepgym.models.save_model`` (state_dict + the spec to rebuild it).

        With ``model=`` a torchvision/timm ``VisionTransformer``, the wrapped model itself is saved (the
        adapter holds no weights of its own); it must have been built by ``keepgym.models.create_model``
        so the file says how to rebuild it.

        Raises:
            ValueError: A given model that ``save_model`` cannot describe (one line: what to do instead).
        """
        inner = getattr(self._vit, "model", None) if self._model_in is not None else None
        target = inner if isinstance(inner, torch.nn.Module) else self._vit
        if getattr(target, "keepgym_spec", None) is None:
            raise ValueError(
                f"cannot save the given {type(target).__name__}: build it with keepgym.models.create_model("
                "'torchvision:vit_b_16' | 'timm:NAME', ...) to save it here, or save its weights with "
                "torch.save(env.vit.model.state_dict(), path)"
            )
        save_model(target, path, **extra)

    # ------------------------------------------------------------------ helpers
    def _build_vit(self, seed: int) -> Any:
        if self._model_in is not None:  # a given model: every run starts from its given weights
            assert self._model_init is not None
            self._model_in.load_state_dict(self._model_init)
            return self._model_in
        # Initialise from `seed` without touching the global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # create_model sets `keepgym_spec`, so `save` writes a file `keepgym.models.load_model` can rebuild.
            vit = create_model("vit_cifar", **self._vit_kwargs)
        return vit.to(self.device)

    def _new_run(self) -> None:
        vit_seed, data_seed = (int(s) for s in self.np_random.integers(0, 2**62, size=2))
        self._vit = self._build_vit(vit_seed)
        self._net = self._vit
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            self._net = DistributedDataParallel(self._vit, device_ids=ids)  # averages gradients in backward()
        self._optimizer = _adam(self._vit, self.learning_rate, self.device)
        self._loader.generator = torch.Generator().manual_seed(data_seed)
        self._run_started = True
        self._epoch = 0
        self._loss_ref = None
        self._divergence_events = []
        self._save_good_state()

    def _start_epoch(self) -> None:
        """Start the data stream of the current epoch; remember where it starts (state_dict, pickle)."""
        self._epoch_gen_state = self._loader.generator.get_state()
        self._step = 0
        self._iter = iter(self._loader)
        self._batch = next(self._iter)
        self._score_batch(self._batch[0])

    def _seek(self, epoch_gen_state: torch.Tensor, step: int, in_episode: bool) -> None:
        """Rebuild the data stream of the current epoch at ``step`` (augmentation draws replayed)."""
        self._loader.generator.set_state(epoch_gen_state)
        self._epoch_gen_state = epoch_gen_state.clone()
        self._iter = iter(self._loader)
        for _ in range(step):
            next(self._iter)
        self._step = step
        if in_episode:
            self._batch = next(self._iter)
            self._score_batch(self._batch[0])
        else:  # the epoch's last step was taken: the next call is reset()
            for _ in self._iter:
                pass
            self._batch, self._scores, self._feats = None, None, None

    def _warmup(self) -> None:
        """Train ``warmup_epochs`` epochs on all patches, outside the agent's MDP (inside ``reset``)."""
        for _ in range(self.warmup_epochs):
            self._save_good_state()
            self._step = 0
            for xb, yb in self._loader:
                self._train_step(xb, yb, None)
                self._step += 1
                if self._step % self.guard_interval == 0:
                    self._save_good_state()
            logger.info("warm-up epoch %d done (all patches)", self._epoch)
            self._epoch += 1
        self._save_good_state()

    def _train_step(
        self, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[float, torch.Tensor | None, bool, float]:
        """One ViT training step on the kept patches, NaN guard included.

        Returns the loss (global batch when distributed), the per-image losses (single process), whether
        the loss diverged, and the wall time.
        """
        opt = self._optimizer
        assert opt is not None
        xs, ys, keep_s = x, y, keep
        if self.distributed:  # this rank's contiguous slice of the global batch (and of per-image keeps)
            xs, ys = x.tensor_split(self._world)[self._rank], y.tensor_split(self._world)[self._rank]
            if keep is not None and keep.dim() == 2:
                keep_s = keep.tensor_split(self._world)[self._rank]
        self._vit.train()
        synchronize(self.device)
        start = time.perf_counter()
        per_image = F.cross_entropy(self._net(xs, keep=keep_s), ys, reduction="none")
        loss = per_image.mean()
        if self.distributed:  # the global-batch loss: same reward and NaN decision on every rank
            loss_value = float(all_reduce_sum(loss.detach().clone()).item()) / self._world
        else:
            loss_value = float(loss.item())
        diverged = not math.isfinite(loss_value)
        if diverged:
            self._on_divergence(loss_value)
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        synchronize(self.device)
        image_losses = None if self.distributed else per_image.detach().float()
        return loss_value, image_losses, diverged, time.perf_counter() - start

    def _save_good_state(self) -> None:
        """Keep a copy of the ViT + optimiser state for the NaN guard (only if the weights are finite)."""
        assert self._optimizer is not None
        if not bool(torch.stack([torch.isfinite(p).all() for p in self._vit.parameters()]).all()):
            return  # the next step's loss will be non-finite and the guard goes back to the older copy
        self._good_state = (
            {k: v.detach().clone() for k, v in self._vit.state_dict().items()},
            copy.deepcopy(self._optimizer.state_dict()),
        )

    def _on_divergence(self, loss_value: float) -> None:
        """Non-finite loss: no update; restore the last good ViT + optimiser, lower the lr 10x once."""
        assert self._optimizer is not None
        opt = self._optimizer
        opt.zero_grad(set_to_none=True)
        if self._good_state is None:  # e.g. after an external load_state_dict; rebuild from now
            self._save_good_state()
        if self._good_state is not None:
            self._vit.load_state_dict(self._good_state[0])
            opt.load_state_dict(self._good_state[1])
        # "Lowered" is read off the optimiser itself, so a checkpointed optimiser carries it too.
        action = "restored the last good ViT and optimiser state"
        if opt.param_groups[0]["lr"] >= self.learning_rate:
            for group in opt.param_groups:
                group["lr"] = self.learning_rate * 0.1
            action += ", learning rate lowered 10x"
        self._divergence_events.append({"epoch": self._epoch, "step": self._step, "action": action})
        logger.warning(
            "non-finite ViT training loss %s at epoch %d step %d: %s",
            loss_value,
            self._epoch,
            self._step,
            action,
        )

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        return self._score_and_features(x)[0]

    @torch.no_grad()
    def _score_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-image scores ``(B, N)`` (the observation's signal, top-k's ranking) and, in the patches
        mode, the per-patch features ``(B, N, F)`` (class docstring), from one pass over block
        ``state_layer``."""
        vit = self._vit
        was_training = vit.training
        vit.eval()
        try:
            tokens, out, attn = vit.attention_map(x, self.state_layer)
        finally:
            vit.train(was_training)
        p, n = vit.num_prefix_tokens, self.num_patches
        if self.state == "agentvit":
            scores = out.mean(dim=-1)[:, p:]
        elif p:
            scores = attn[:, :, 0, p:].mean(dim=1)
        else:
            scores = attn.mean(dim=(1, 2))
        scores = scores.float()
        if self.action_mode != "patches":
            return scores, None
        attn = attn.float()
        received = attn[:, :, :, p:].mean(dim=(1, 2)) * n
        rows = attn[:, :, p:, :].mean(dim=1)  # each patch's attention row, averaged over heads
        entropy = torch.special.entr(rows).sum(-1) / math.log(attn.shape[-1])
        norm = _standardize(tokens[:, p:].float().norm(dim=-1))
        b, c, h, w = x.shape
        ps = self.patch_size
        # Patches row-major, (B, N, C p p): a reshape (F.unfold is ~100x slower on CPU).
        pixels = x.float().reshape(b, c, h // ps, ps, w // ps, ps).permute(0, 2, 4, 1, 3, 5).reshape(b, n, -1)
        pixel_std = _standardize(pixels.std(dim=-1))
        rank = scores.argsort(dim=1).argsort(dim=1).float() / max(n - 1, 1)
        pos = self._positions.unsqueeze(0).expand(len(x), -1, -1)
        feats = torch.cat((torch.stack((received, entropy, norm, pixel_std, rank), dim=-1), pos), dim=-1)
        return scores, feats

    def _score_batch(self, x: torch.Tensor) -> None:
        self._scores, self._feats = self._score_and_features(x)

    def _observation(self, scores: torch.Tensor | None = None, feats: torch.Tensor | None = None) -> np.ndarray:
        if self.action_mode == "patches":
            feats = self._feats if feats is None else feats
            assert feats is not None
            return feats.cpu().numpy().astype(np.float32)
        scores = self._scores if scores is None else scores
        assert scores is not None
        obs = scores.float().mean(dim=0).cpu().numpy().astype(np.float32)
        if self.state == "attention":
            obs = np.clip(obs, 0.0, 1.0)  # guard against rounding just outside the bounds
        return obs

    def _policy_keep(
        self, policy: Any, scores: torch.Tensor, feats: torch.Tensor | None, deterministic: bool
    ) -> torch.Tensor:
        b = len(scores)
        if feats is not None and b < self.batch_size:  # the observation has batch_size rows: pad
            feats = torch.cat((feats, feats.new_zeros(self.batch_size - b, *feats.shape[1:])))
        if feats is not None and b > self.batch_size:
            raise ValueError(f"the patches mode decides for at most batch_size={self.batch_size} images, got {b}")
        obs = self._observation(scores, feats)
        if hasattr(policy, "predict"):
            action = policy.predict(obs, deterministic=deterministic)[0]
        else:
            action = policy(obs)
        if feats is not None:
            action = np.asarray(action)[:b]
        keep = self._action_to_keep(action, scores)
        return keep if keep is not None else torch.arange(self.num_patches, device=scores.device)

    def _action_to_keep(self, action: Any, scores: torch.Tensor) -> torch.Tensor | None:
        """Validate ``action``; kept indices ``(B, k)``/``(k,)``, or None for all patches."""
        n = self.num_patches
        try:
            a = np.asarray(action)
        except Exception as err:  # noqa: BLE001 - anything unconvertible is a bad action
            raise ValueError(f"invalid action {action!r}") from err
        if self.action_mode == "patches":
            b = scores.shape[0]
            if a.ndim != 2 or a.shape[1] != n or a.shape[0] != b or a.dtype.kind not in "biuf":
                raise ValueError(f"action must be per-patch scores of shape ({b}, {n}), got {a.shape} {a.dtype}")
            if not np.isfinite(a).all():
                raise ValueError("action scores must be finite")
            return select_topk(torch.as_tensor(a, dtype=torch.float32, device=scores.device), self.target_keep)
        if self.action_mode == "ratio":
            if (
                a.size != 1
                or a.ndim > 1
                or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating))
            ):
                raise ValueError(
                    f"action must be one integer in [0, {len(self.keep_ratios)}), got {action!r}"
                )
            value = a.reshape(()).item()
            if not float(value).is_integer() or not 0 <= int(value) < len(self.keep_ratios):
                raise ValueError(f"action must be an integer in [0, {len(self.keep_ratios)}), got {action!r}")
            k = self.keep_counts[int(value)]
            return None if k == n else select_topk(scores, k)
        if a.shape != (n,) or a.dtype.kind not in "biuf":  # bool / int / float; not complex, str, object
            raise ValueError(
                f"action must be a 0/1 mask of shape ({n},), got shape {a.shape} dtype {a.dtype}"
            )
        if not np.all((a == 0) | (a == 1)):
            raise ValueError("mask action must contain only 0 and 1")
        kept = np.flatnonzero(a)
        if kept.size == 0:  # at least one patch is always kept: the highest-scoring one of the batch
            kept = np.array([int(scores.float().mean(dim=0).argmax())])
        return None if kept.size == n else torch.as_tensor(kept, dtype=torch.long, device=scores.device)

    def _evaluate(
        self,
        choose: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None,
        split: str,
        batch_size: int,
        needs_scores: bool = True,
    ) -> dict[str, float]:
        x_all, y_all = self.data.split(split)
        loader = BatchLoader(x_all, y_all, self.data, batch_size, shuffle=False, device=self.device)
        vit = self._vit
        was_training = vit.training
        vit.eval()
        correct = images = 0
        kept_sum = macs_sum = 0.0
        seconds = 0.0
        try:
            for xb, yb in loader:
                synchronize(self.device)
                start = time.perf_counter()
                keep = None
                if choose is not None and needs_scores:
                    keep = choose(*self._score_and_features(xb))
                elif choose is not None:
                    keep = choose(torch.zeros(len(xb), self.num_patches, device=xb.device), None)
                logits = vit(xb, keep=keep)
                synchronize(self.device)
                seconds += time.perf_counter() - start
                k = self.num_patches if keep is None else int(keep.shape[-1])
                correct += int((logits.argmax(dim=1) == yb).sum())
                images += len(yb)
                kept_sum += k * len(yb)
                macs_sum += vit.analytic_macs(k) * len(yb)
        finally:
            vit.train(was_training)
        images = max(images, 1)
        return {
            "accuracy": correct / images,
            "macs_per_image": macs_sum / images,
            "score_macs_per_image": float(self.state_macs_per_image if choose is not None and needs_scores else 0),
            "images_per_second": images / max(seconds, 1e-12),
            "kept_patches": kept_sum / images,
        }


def benchmark_vit(
    keep_fracs: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    batch_size: int = 128,
    steps: int = 3,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    image_size: int = 32,
    patch_size: int = 4,
    seed: int = 0,
    num_threads: int | None = None,
    **vit_kwargs: Any,
) -> list[dict[str, float]]:
    """Time ViT training steps and inference at several keep fractions, side by side.

    Builds the CIFAR ViT (``keepgym.models.vit.vit_cifar``; ``vit_kwargs`` override it), random images and
    labels, and for each of ``steps`` rounds times one Adam training step and one ``no_grad``
    forward per keep fraction in turn, so drifts in machine load hit every fraction alike. Kept
    patches are a random ``k = round(frac * N)`` per image. Medians are reported.

    Args:
        keep_fracs: Fractions of the N patches kept; the first is the reference for the speed-ups
            (put 1.0 first).
        batch_size: Images per step.
        steps: Timed rounds.
        warmup: Untimed rounds first.
        device: Where to run.
        image_size: Input size.
        patch_size: Patch size.
        seed: Seeds weights, data and patch choice.
        num_threads: CPU threads for torch during the benchmark (default: leave as set). On a shared
            machine, 1 thread gives steadier ratios: a multi-threaded op waits for its slowest thread.
        **vit_kwargs: Overrides for ``vit_cifar`` (``dim``, ``depth``, ...).

    Returns:
        One dict per fraction: ``keep_frac``, ``kept``, ``macs_per_image``, ``train_step_seconds``,
        ``train_speedup``, ``images_per_second``, ``inference_speedup``.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _benchmark_vit(
            keep_fracs,
            batch_size,
            steps,
            warmup,
            _resolve_device(device),
            image_size,
            patch_size,
            seed,
            vit_kwargs,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _benchmark_vit(
    keep_fracs: Sequence[float],
    batch_size: int,
    steps: int,
    warmup: int,
    dev: torch.device,
    image_size: int,
    patch_size: int,
    seed: int,
    vit_kwargs: dict[str, Any],
) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = vit_cifar(image_size=image_size, patch_size=patch_size, **vit_kwargs).to(dev)
    opt = _adam(vit, 1e-3, dev)
    x = torch.randn(batch_size, vit.in_chans, image_size, image_size, generator=gen).to(dev)
    y = torch.randint(0, vit.num_classes, (batch_size,), generator=gen).to(dev)
    n = vit.num_patches
    ks = [min(max(int(round(f * n)), 1), n) for f in keep_fracs]
    keeps = [None if k == n else select_random_k(torch.zeros(batch_size, n), k, gen).to(dev) for k in ks]
    train_t: list[list[float]] = [[] for _ in ks]
    infer_t: list[list[float]] = [[] for _ in ks]
    for rnd in range(warmup + steps):
        for i, keep in enumerate(keeps):
            vit.train()
            synchronize(dev)
            start = time.perf_counter()
            loss = F.cross_entropy(vit(x, keep=keep), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            synchronize(dev)
            t_train = time.perf_counter() - start
            vit.eval()
            with torch.no_grad():
                start = time.perf_counter()
                vit(x, keep=keep)
                synchronize(dev)
                t_infer = time.perf_counter() - start
            if rnd >= warmup:
                train_t[i].append(t_train)
                infer_t[i].append(t_infer)
    rows = []
    for f, k, tt, ti in zip(keep_fracs, ks, train_t, infer_t, strict=True):
        rows.append(
            {
                "keep_frac": float(f),
                "kept": k,
                "macs_per_image": vit.analytic_macs(k),
                "train_step_seconds": float(np.median(tt)),
                "images_per_second": batch_size / float(np.median(ti)),
            }
        )
    for row in rows:
        row["train_speedup"] = rows[0]["train_step_seconds"] / row["train_step_seconds"]
        row["inference_speedup"] = row["images_per_second"] / rows[0]["images_per_second"]
        logger.info("benchmark_vit %s", row)
    return rows
