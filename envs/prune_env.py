"""PruneEnv: RL-Pruner's staged structured channel pruning as a Gymnasium environment.

RL-Pruner (Wang et al., "RL-Pruner: Structured Pruning Using Reinforcement Learning for CNN
Compression and Acceleration", arXiv 2411.06463) prunes a trained CNN in stages: each stage removes
a fixed budget of channels, split over the layers by a learned distribution, keeps the channels
with the highest Taylor importance and optionally recovers accuracy by knowledge distillation.
Here one episode is one compression run and one step is one stage; the action is the split of the
stage's budget over the model's coupling groups (found by Torch-Pruning's dependency graph, see
:mod:`keepgym.envs.pruning`). :meth:`PruneEnv.evaluate` scores a candidate split without committing it, which
is what RL-Pruner's search (``keepgym.agents.RLPruner``) does many times per stage.

:func:`profile_evaluate` splits the wall time of one candidate evaluation into importance /
masking / evaluation / pure forward (``keepgym bench prune-step``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gymnasium import spaces

from keepgym.envs.data import DATASETS, DatasetNotFoundError, DatasetSplits, load_dataset
from keepgym.envs.evaluators import Evaluator, ScoringInputs, SerialEvaluator
from keepgym.envs.metrics import synchronize
from keepgym.envs.pruning import CRITERIA, GroupPruner, count_macs_params
from keepgym.envs.recovery import KDRecovery, Recovery, RecoveryResult
from keepgym.envs.splits import SplitMismatchError, check_split, read_split, split_record

__all__ = [
    "ACTION_PARAMS",
    "CANDIDATE_SCORINGS",
    "PruneEnv",
    "WallTimes",
    "accuracy",
    "adaptive_bn",
    "default_checkpoint_path",
    "profile_evaluate",
]

logger = logging.getLogger(__name__)

# Datasets a baseline can be trained for on the fly (no download, a few CPU minutes at most).
_OFFLINE_DATASETS = ("digits", "synthetic")

#: How :meth:`PruneEnv.evaluate` scores a masked candidate: ``vanilla`` (accuracy right after masking) or
#: ``adaptive_bn`` (BatchNorm statistics re-estimated on training images first; EagleEye, ECCV 2020).
CANDIDATE_SCORINGS = ("vanilla", "adaptive_bn")
#: How a candidate's forward runs: on the masked full-width model, on a physically pruned copy, or the cheaper.
CANDIDATE_PATHS = ("auto", "masked", "physical")
#: How an action maps to the stage's split over the groups (the ``action_param`` argument).
ACTION_PARAMS = ("weights", "log_prior")
#: ``log_prior``: an action entry of +-1 multiplies its group's share of the stage by ``4**(+-1)``.
LOG_PRIOR_SCALE = math.log(4.0)


# --------------------------------------------------------------------------- helpers
def _cache_root() -> Path:
    return Path(os.environ.get("KEEPGYM_CACHE", Path.home() / ".cache" / "keepgym"))


def default_checkpoint_path(model_name: str, dataset: str, width_mult: float = 1.0) -> Path:
    """Where a baseline is looked for when no ``checkpoint`` is given.

    ``$KEEPGYM_CACHE`` (default ``~/.cache/keepgym``) ``/checkpoints/<model>_<dataset>[_w<width>]/model.pt``
    -- the ``model.pt`` that ``keepgym train --out <that folder>`` writes.
    """
    tag = f"{model_name}_{dataset}" + ("" if width_mult == 1.0 else f"_w{width_mult:g}")
    return _cache_root() / "checkpoints" / tag / "model.pt"


def _train_command(model_name: str, dataset: str, width_mult: float, path: Path) -> str:
    width = "" if width_mult == 1.0 else f" --width-mult {width_mult:g}"
    download = "" if dataset in ("digits", "synthetic") else " --download"  # a no-op when it is already there
    return f"keepgym train --model {model_name} --dataset {dataset}{width}{download} --out {path.parent}"


@functools.lru_cache(maxsize=4)
def _load_data(
    name: str,
    data_root: str | None,
    val_size: float | int,
    download: bool,
    train_size: int | None,
    seed: int = 0,
    image_size: int | None = None,
) -> DatasetSplits:
    # Datasets are read-only here, so a few recent ones are shared between envs of one process.
    return load_dataset(
        name, data_root, val_size=val_size, seed=seed, download=download, train_size=train_size, image_size=image_size
    )


def _recorded_split(
    source: Path | None, val_size: float | int | None, train_size: int | None
) -> tuple[dict | None, float | int, int | None, int]:
    """The split recorded in the baseline's model file and the (val_size, train_size, seed) that rebuild it.

    Without a record (an older file, no file): the given sizes (val_size 0.1 by default) and split seed 0.
    Given sizes that contradict the record are refused: the reward would see the baseline's training images.
    """
    split = read_split(source) if source is not None and source.is_file() else None
    if split is None:
        return None, 0.1 if val_size is None else val_size, train_size, 0
    for name, given in (("val_size", val_size), ("train_size", train_size)):
        if given is not None and given != split[name]:
            raise SplitMismatchError(
                f"{source} was trained with {name}={split[name]!r}, not {given!r}; "
                f"leave {name} unset to use the model's own split"
            )
    return split, split["val_size"], split["train_size"], int(split["seed"])


def _train_baseline(
    model: nn.Module, data: DatasetSplits, epochs: int, device: torch.device, seed: int = 0
) -> float:
    """A few epochs of SGD (nesterov, cosine) on the train split; returns validation accuracy."""
    from keepgym.envs.trainer import Trainer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trainer = Trainer(model, data, epochs=epochs, batch_size=64, augment=False, device=device, seed=seed)
        for epoch in range(epochs):
            stats = trainer.train_epoch()
            # One line per epoch (a few seconds each on a CPU), so a first gym.make is not silent.
            logger.info(
                "baseline epoch %d/%d: train loss %.3f, val accuracy %.3f (%.1f s)",
                epoch + 1,
                epochs,
                stats.train_loss,
                stats.val_accuracy,
                stats.seconds,
            )
    model.eval()
    return stats.val_accuracy


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on normalised ``x``."""
    return accuracy_and_loss(model, x, y, batch_size)[0]


def accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (eval mode) on normalised ``x``."""
    correct, _, loss = score_images(model, x, y, batch_size)
    return int(correct.sum()) / max(1, len(y)), loss


@torch.no_grad()
def score_images(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``model`` (eval mode) on normalised ``x``: per image, top-1 correct (bool) and the true-class margin
    ``logit[y] - max_{j != y} logit[j]`` (float), both on the CPU; and the mean cross-entropy."""
    model.eval()
    correct, margin, loss = [], [], 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size]).float()
        yb = y[start : start + batch_size]
        true = logits.gather(1, yb[:, None]).squeeze(1)
        other = logits.scatter(1, yb[:, None], float("-inf")).amax(dim=1)
        correct.append((logits.argmax(1) == yb).cpu())
        margin.append((true - other).cpu())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    if not correct:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0), 0.0
    return torch.cat(correct), torch.cat(margin), loss / len(y)


@contextlib.contextmanager
def adaptive_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> Iterator[None]:
    """Re-estimate every BatchNorm's running statistics on ``x`` for the duration of the block.

    Adaptive batch normalisation (Li et al., "EagleEye", ECCV 2020): a pruned candidate's BatchNorm
    statistics no longer match its activations, and accuracy measured with stale statistics ranks
    candidates poorly. Inside the block every BatchNorm (with ``track_running_stats``) holds the
    cumulative average of the batch statistics of ``x`` (normalised training images, forwarded in
    batches of ``batch_size`` with only the BatchNorms in train mode, no gradient); on exit the
    statistics, ``momentum``, ``num_batches_tracked`` and the train/eval flags are restored bit for bit.
    The model is left in eval mode inside the block. Channels whose affine parameters are zeroed (a
    masked candidate) still output 0, so masked and physically pruned models agree.
    """
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    flags = [(m, m.training) for m in model.modules()]
    saved = [
        (m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms
    ]
    try:
        with torch.no_grad():
            model.eval()
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches
                m.train()
            # near-equal batches: the cumulative average weights batches equally, and a trailing batch
            # of one image would fail in a BatchNorm over 1x1 maps
            for xb in torch.tensor_split(x, max(1, math.ceil(len(x) / batch_size))):
                model(xb)
            model.eval()
        yield
    finally:
        with torch.no_grad():
            for m, momentum, mean, var, count in saved:
                m.momentum = momentum
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        for m, training in flags:
            m.training = training



def _validate_args(
    *,
    dataset: str,
    target_sparsity: float,
    stage_sparsity: float,
    criterion: str,
    alpha: float,
    beta: float,
    eval_size: int | None,
    calibration_size: int,
    min_channels: int,
    round_to: int,
    batch_size: int,
    render_mode: str | None,
    width_mult: float,
    data: DatasetSplits | None,
    baseline_epochs: int,
) -> None:
    """Refuse bad :class:`PruneEnv` arguments with one-line ``ValueError``s (the recovery checks its own)."""
    checks = [
        (data is not None or dataset in DATASETS, f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}"),
        (0.0 < target_sparsity < 1.0, f"target_sparsity must be in (0, 1), got {target_sparsity}"),
        (
            0.0 < stage_sparsity <= target_sparsity,
            f"stage_sparsity must be in (0, target_sparsity={target_sparsity}], got {stage_sparsity}",
        ),
        (criterion in CRITERIA, f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}"),
        (math.isfinite(alpha) and math.isfinite(beta), "alpha and beta must be finite"),
        (eval_size is None or eval_size >= 1, f"eval_size must be >= 1 or None, got {eval_size}"),
        (calibration_size >= 1, f"calibration_size must be >= 1, got {calibration_size}"),
        (min_channels >= 1, f"min_channels must be >= 1, got {min_channels}"),
        (round_to >= 1, f"round_to must be >= 1, got {round_to}"),
        (batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
        (
            render_mode is None or render_mode in ("ansi", "rgb_array"),
            f"render_mode must be None, 'ansi' or 'rgb_array', got {render_mode!r}",
        ),
        (width_mult > 0, f"width_mult must be > 0, got {width_mult}"),
        (baseline_epochs >= 1, f"baseline_epochs must be >= 1, got {baseline_epochs}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass(eq=False)
class WallTimes:
    """Wall-clock seconds spent in the parts of a step / evaluation.

    Two ``WallTimes`` always compare equal: timings are not part of the env's outcome, so two
    same-seed rollouts (and Gymnasium's determinism checks on ``info``) still match.
    """

    importance_s: float = 0.0
    surgery_s: float = 0.0
    finetune_s: float = 0.0
    eval_s: float = 0.0
    total_s: float = 0.0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WallTimes)

    __hash__ = None  # type: ignore[assignment]

    def as_dict(self) -> dict[str, float]:
        """Plain ``{name: seconds}`` for logging."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


# --------------------------------------------------------------------------- the env
class PruneEnv(gym.Env):
    """Prune a trained CNN in stages; the agent splits each stage's channel budget over the layers.

    ## Description

    One episode is one compression run of RL-Pruner (arXiv 2411.06463): start from a trained model and
    remove channels in stages until ``target_sparsity`` of them are gone; one step is one stage.
    Channels that must be pruned together (residual adds, concatenations in GoogLeNet/DenseNet,
    squeeze-excite gates and depthwise convs in MobileNetV3) form one of ``G`` *coupling groups*,
    built by Torch-Pruning's dependency graph. The classifier's outputs are never pruned.

    *Channel count.* ``N0`` is the total number of channels of the G groups of the original model,
    and each stage removes ``M = round(stage_sparsity * N0)`` of them (fewer in the last stage). A
    channel of a coupled group shared by ``k`` conv/linear layers counts **once**: it is one decision
    and one action dimension. (RL-Pruner's code counts it ``k`` times, one per layer; that figure is
    reported as ``info["layer_sparsity"]``. The two agree for VGG, GoogLeNet and DenseNet, where every
    group has one producing layer.)

    Inside a group the channels with the lowest importance go: Taylor ``|w * dL/dw|`` summed over
    every parameter slice the channel owns (producers' filters, biases, batch-norm affine parameters
    and consumers' input slices), from ``calibration_size`` training images with the model in eval
    mode (batch-norm statistics untouched), computed once per stage. ``l1``, ``l2`` and ``random``
    are the alternatives. After the surgery the ``recovery`` object recovers accuracy (RL-Pruner: knowledge
    distillation, :class:`keepgym.envs.recovery.KDRecovery`: steps or epochs, best validation epoch, teacher
    swap, DDP); ``finetune_steps=N`` is the shortcut for ``N`` KD steps from the original model. The next
    stage's importance is computed once, from the recovered weights.

    ``evaluate(action)`` scores a candidate stage without committing it: it zeroes in place the
    parameters the allocation would remove, evaluates, and restores them bit for bit, so candidates
    cost one forward pass over the validation images and no surgery; their MACs/params come from a
    closed form (:class:`keepgym.envs.pruning.CostModel`). ``evaluate_many`` scores a list.

    ## Action Space

    ``Box(0, 1, (G,), float32)``: non-negative weights over the groups, normalised inside to a
    distribution ``p``; group ``g`` is asked for ``p_g * M`` channels (largest-remainder rounding; a
    group never drops below ``min_channels``, and what it cannot give is redistributed to the other
    groups in proportion to their weights). All zeros means uniform. Negative entries are clipped to
    0; NaN/inf, a wrong shape, a dtype that is not bool/int/float (strings, complex, objects, None)
    or an all-negative action raise ``ValueError`` and leave the env as it was. With ``round_to > 1``
    group widths stay multiples of ``round_to`` and the stage total is ``M`` rounded to whole multiples.

    With ``action_param="log_prior"`` (the ``RLPrune-*-LogPrior-v0`` ids) the action space is
    ``Box(-1, 1, (G,))`` and the weights are ``width_g * 4**a_g`` (:meth:`split_weights`): the zero
    action is the width-proportional split (every group loses the same fraction of its channels) and
    each entry scales its group's share by 1/4 to 4, so a Gaussian policy starting at zero (PPO, SAC,
    A2C) explores around a sensible allocation.

    ## Observation Space

    ``Box(0, 1, (G + 4,), float32)``: the sparsity ``1 - width/initial width`` of each group, then
    the overall channel sparsity, the MACs ratio ``F/F0``, the parameter ratio ``P/P0`` and the last
    validation accuracy.

    ## Rewards

    ``accuracy + alpha * (1 - F/F0) + beta * (1 - P/P0)``, accuracy in [0, 1] on the validation
    split held out from the training data (never the test split), measured **after recovery** (for every
    caller: Python, ``keepgym prune``, RL-Pruner's look-ahead). ``alpha = beta = 0`` by default
    (RL-Pruner's accuracy-only reward).

    ``info`` (reset, step, evaluate): ``accuracy``, ``macs``, ``params``, ``macs_ratio``,
    ``params_ratio`` (against the original model), ``sparsity``, ``layer_sparsity``, ``stage``,
    ``widths`` (per group) and ``wall_times`` (:class:`WallTimes`); step and evaluate add ``removed``
    (channels per group this stage) and ``accuracy_before_recovery`` (alias ``accuracy_before_finetune``;
    for a candidate, the same as ``accuracy``); step adds the closed-form
    ``closed_form_macs`` / ``closed_form_params`` it predicted (equal to the counter's figures), and
    ``finetune_steps_done``, ``finetune_learning_rate`` and ``finetune_diverged``: a NaN/inf KD loss
    stops that stage's fine-tuning, restores the last good weights (:func:`keepgym.envs.distill.distill`) and
    lowers the fine-tuning learning rate 10x for the rest of the episode (once).

    ## Starting State

    The original trained model (restored from a kept state dict on every reset). ``reset(seed=s)``
    reseeds the calibration-batch and validation-subset sampling, so the same seed and actions give
    the same rewards.

    ## Episode End

    ``terminated`` once ``round(target_sparsity * N0)`` channels are removed (after
    :attr:`num_stages` steps) or no group can give a channel any more. Never truncated.

    *Compute targets.* With ``target_macs`` (or ``target_params``), a fraction of the original model's
    MACs (params), the episode ends instead once the model is at or below it, and each stage removes
    ``stage_sparsity`` of the *original* MACs (params) rather than a channel count: stage ``k`` brings the
    model to ``max(target, 1 - (k + 1) * stage_sparsity)`` of the original (:attr:`stage_goal`), so
    :attr:`num_stages` is ``ceil((1 - target) / stage_sparsity)`` and the target is met to within one
    channel's cost. The action keeps its meaning (how the stage is split over the groups); the number of
    channels is the smallest split in those proportions that meets the stage's goal (bisection over the
    closed-form cost, :meth:`predict_cost`). Channel sparsity is still reported (``info["sparsity"]``).
    This is how agents are compared at equal cost (``keepgym frontier``).

    ## Arguments

    * ``model_name``: a ``keepgym.models.create_model`` name (``vgg19``, ``resnet56``, ``googlenet``,
      ``mobilenetv3_large``, ``densenet121``, ``vgg11``, ...) or reference (``torchvision:resnet18``,
      ``timm:NAME``, ``pkg.module:factory``).
    * ``dataset`` / ``data_root`` / ``download`` / ``val_size`` / ``train_size``: passed to
      :func:`keepgym.envs.data.load_dataset`. The split is the one recorded in the baseline's model file
      (dataset, seed, ``val_size``, ``train_size``; :mod:`keepgym.envs.splits`), rebuilt and checked
      against the file's fingerprint, so the validation images were never trained on; a ``val_size`` or
      ``train_size`` that contradicts the record raises ``SplitMismatchError``. A file without a record:
      split seed 0, ``val_size`` 0.1 unless given. ``eval_size``: score on this many validation images (a
      seeded subset; None = all).
    * ``checkpoint``: a ``keepgym.models.save_model`` file of ``model_name`` (another model is a
      ``ValueError``; unreadable or foreign files raise ``keepgym.models.ModelLoadError``). Without it and
      with ``pretrained=True`` the baseline is read from :func:`default_checkpoint_path`; for
      ``digits``/``synthetic`` it is trained (``baseline_epochs``) and cached there on first use, for
      other datasets a ``FileNotFoundError`` prints the ``keepgym train`` command that makes it.
      ``pretrained=False``: a randomly initialised model (smoke tests only).
    * ``width_mult``: channel multiplier of the model (tiny models for tests).
    * ``target_sparsity`` (0.6), ``stage_sparsity`` (0.05): fractions of ``N0``.
    * ``target_macs``, ``target_params`` (None): a compute target instead, a fraction in (0, 1) of the
      original MACs / params (one of them); ``stage_sparsity`` is then the fraction of the original
      MACs / params a stage removes. ``image_size``: passed to ``load_dataset`` (e.g. an image folder).
    * ``criterion``: ``taylor`` | ``l1`` | ``l2`` | ``random``; ``calibration_size``: Taylor images.
    * ``candidate_scoring``: how :meth:`evaluate` scores a candidate: ``vanilla`` (validation accuracy
      right after masking) or ``adaptive_bn`` (first re-estimate every BatchNorm's statistics on
      ``bn_calibration_size`` training images, drawn once per stage from the stage's seed, then score and
      restore them: :func:`adaptive_bn`; EagleEye, ECCV 2020). A public attribute; it may be changed
      between calls. ``vanilla`` draws the same random numbers as before the option existed.
    * ``candidate_path``: where a candidate's forward runs: ``masked`` (the full-width model with the
      candidate's channels zeroed in place and restored), ``physical`` (a pruned copy: copy + surgery,
      then the smaller forward) or ``auto`` (the default: per stage, whichever the measured costs predict
      cheaper for that candidate; see :class:`CandidatePathCosts`). Both give the same scores; a test
      checks it on the five CIFAR architectures. The Ray evaluator always masks.
    * ``alpha``, ``beta``: reward weights of the MACs and params reductions.
    * ``action_param``: ``weights`` (the default) or ``log_prior`` (the ``-LogPrior`` ids); see *Action Space*.
    * ``recovery``: a :class:`keepgym.envs.recovery.Recovery` run after every stage's surgery, e.g.
      ``KDRecovery(epochs=1, teacher_swap=True)``; its :attr:`~keepgym.envs.recovery.Recovery.stage_records`
      keep a per-stage history. ``finetune_steps`` (0), ``finetune_lr``, ``kd_temperature``, ``kd_weight``: the
      shortcut that builds ``KDRecovery(steps=finetune_steps, ...)`` (give one or the other).
    * ``min_channels`` (1), ``round_to`` (1): width floor and multiple per group.
    * ``batch_size``: evaluation and fine-tuning batch size. ``device``: ``cpu`` / ``cuda`` / ``auto``.
    * ``model``, ``data``: inject a model / :class:`keepgym.envs.data.DatasetSplits` instead (tests).
    * ``evaluator``: what scores the candidates of :meth:`evaluate_many`: a
      :class:`keepgym.envs.evaluators.Evaluator` (None: ``SerialEvaluator()``; ``make_evaluator("ray", workers=N)``
      for a Ray ``ActorPool``). The public attribute ``evaluator`` may be swapped; :meth:`close` closes it.
    * ``render_mode``: ``None``, ``"ansi"`` (a text summary of the stage) or ``"rgb_array"`` (a bar
      chart of the per-group sparsity; SB3's ``make_vec_env`` asks for it by default).

    ## Version History

    * v0: initial version. ``target_macs``/``target_params`` and ``candidate_scoring`` were added later
      without a version bump: they are off (``vanilla``) by default, and the observation and reward keep
      their meaning.
      ``action_param`` was added the same way (default ``weights``); its ``log_prior`` setting is registered
      as sibling ids, ``RLPrune-*-LogPrior-v0``, not as a new version.
    * ``candidate_path=`` (no bump): where a candidate's forward runs; the scores are the same, only the
      time changes. ``scoring_order()`` now lists the current model's fragile images first (racing only).
    * ``recovery=`` (no bump): ``finetune_steps`` now builds a ``KDRecovery``; with it the
      observation, reward and ``info`` mean what they meant (accuracy after recovery). ``keepgym prune``'s
      env now reports the post-distillation accuracy too (it used to report the one before).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"]}

    def __init__(
        self,
        model_name: str = "vgg11",
        dataset: str = "digits",
        data_root: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        pretrained: bool = True,
        width_mult: float = 1.0,
        target_sparsity: float = 0.6,
        stage_sparsity: float = 0.05,
        criterion: str = "taylor",
        alpha: float = 0.0,
        beta: float = 0.0,
        finetune_steps: int = 0,
        val_size: float | int | None = None,
        eval_size: int | None = None,
        calibration_size: int = 128,
        min_channels: int = 1,
        round_to: int = 1,
        batch_size: int = 256,
        device: str = "cpu",
        render_mode: str | None = None,
        model: nn.Module | None = None,
        data: DatasetSplits | None = None,
        train_size: int | None = None,
        download: bool = False,
        baseline_epochs: int = 5,
        finetune_lr: float = 1e-3,
        kd_temperature: float = 2.0,
        kd_weight: float = 0.75,
        target_macs: float | None = None,
        target_params: float | None = None,
        image_size: int | None = None,
        candidate_scoring: str = "vanilla",
        bn_calibration_size: int = 512,
        action_param: str = "weights",
        evaluator: Evaluator | None = None,
        recovery: Recovery | None = None,
        candidate_path: str = "auto",
    ) -> None:
        super().__init__()
        #: scores the candidates of :meth:`evaluate_many` (:mod:`keepgym.envs.evaluators`); may be swapped
        self.evaluator: Evaluator = SerialEvaluator() if evaluator is None else evaluator
        if candidate_scoring not in CANDIDATE_SCORINGS:
            raise ValueError(
                f"unknown candidate_scoring {candidate_scoring!r}; valid: {', '.join(CANDIDATE_SCORINGS)}"
            )
        if int(bn_calibration_size) != bn_calibration_size or bn_calibration_size < 1:
            raise ValueError(f"bn_calibration_size must be an int >= 1, got {bn_calibration_size}")
        #: ``vanilla`` or ``adaptive_bn`` (see the class docstring); may be changed between calls
        self.candidate_scoring = candidate_scoring
        if candidate_path not in CANDIDATE_PATHS:
            raise ValueError(f"unknown candidate_path {candidate_path!r}; valid: {', '.join(CANDIDATE_PATHS)}")
        #: ``auto``, ``masked`` or ``physical`` (see the class docstring); may be changed between calls
        self.candidate_path = candidate_path
        #: the stage's measured costs behind ``auto``; ``path_counts`` counts the candidates per path
        self.path_costs = CandidatePathCosts()
        self.bn_calibration_size = int(bn_calibration_size)
        if action_param not in ACTION_PARAMS:
            raise ValueError(f"unknown action_param {action_param!r}; valid: {', '.join(ACTION_PARAMS)}")
        #: ``weights`` (the action is the split) or ``log_prior`` (log-factors around the width-proportional split)
        self.action_param = action_param
        if target_macs is not None and target_params is not None:
            raise ValueError("give target_macs or target_params, not both")
        #: ``"macs"``, ``"params"`` (a compute target) or None (a channel-sparsity target)
        self.compute_target: str | None = (
            "macs" if target_macs is not None else "params" if target_params is not None else None
        )
        #: the compute target as a fraction of the original model's MACs/params (None: channel target)
        self.target_ratio: float | None = None
        if self.compute_target is not None:
            ratio = float(target_macs if target_macs is not None else target_params)
            if not (math.isfinite(ratio) and 0.0 < ratio < 1.0):
                raise ValueError(f"target_{self.compute_target} must be in (0, 1), got {ratio}")
            if not 0.0 < stage_sparsity <= 1.0 - ratio + 1e-9:  # 1 - 0.9 < 0.1 in floating point
                raise ValueError(
                    f"stage_sparsity (the fraction of the original {self.compute_target} a stage removes) must be "
                    f"in (0, 1 - target_{self.compute_target}={1.0 - ratio:g}], got {stage_sparsity}"
                )
            self.target_ratio = ratio
            target_sparsity = max(float(target_sparsity), float(stage_sparsity))  # unused; keeps the checks valid
        _validate_args(
            dataset=dataset,
            target_sparsity=target_sparsity,
            stage_sparsity=stage_sparsity,
            criterion=criterion,
            alpha=alpha,
            beta=beta,
            eval_size=eval_size,
            calibration_size=calibration_size,
            min_channels=min_channels,
            round_to=round_to,
            batch_size=batch_size,
            render_mode=render_mode,
            width_mult=width_mult,
            data=data,
            baseline_epochs=baseline_epochs,
        )
        if recovery is not None and finetune_steps:
            raise ValueError("give recovery=... or finetune_steps, not both (finetune_steps builds a KDRecovery)")
        if recovery is None:  # the shortcut: KD steps from the original model after every stage
            recovery = KDRecovery(
                steps=finetune_steps,
                learning_rate=finetune_lr,
                temperature=kd_temperature,
                kd_weight=kd_weight,
                teacher_swap=False,
            )
        elif not isinstance(recovery, Recovery):
            raise ValueError(f"recovery must be a keepgym.envs.recovery.Recovery, got {type(recovery).__name__}")
        #: the recovery strategy run after every stage's surgery (:mod:`keepgym.envs.recovery`)
        self.recovery = recovery
        self.model_name = model_name
        self.dataset = dataset
        self.target_sparsity = float(target_sparsity)
        self.stage_sparsity = float(stage_sparsity)
        self.criterion = criterion
        self.alpha, self.beta = float(alpha), float(beta)
        self.eval_size = eval_size
        self.calibration_size = int(calibration_size)
        self.min_channels = int(min_channels)
        self.round_to = int(round_to)
        self.batch_size = int(batch_size)
        self.render_mode = render_mode
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

        if model is None:
            from keepgym.models import resolve_model

            resolve_model(model_name)  # zoo name, torchvision:NAME, timm:NAME or pkg.module:factory
        if model is None and checkpoint is None and pretrained and dataset not in _OFFLINE_DATASETS:
            path = default_checkpoint_path(model_name, dataset, width_mult)
            if not path.is_file():  # before loading the data, which may be missing too
                raise FileNotFoundError(
                    f"no trained {model_name} for {dataset} at {path}. Train it with:\n"
                    f"    {_train_command(model_name, dataset, width_mult, path)}\n"
                    f"or pass checkpoint=PATH (CLI: --checkpoint PATH), or pretrained=False for a random model"
                )
        if data is None:
            source = Path(checkpoint).expanduser() if checkpoint is not None else None
            if source is None and model is None and pretrained:
                source = default_checkpoint_path(model_name, dataset, width_mult)
            split, val_size, train_size, split_seed = _recorded_split(
                None if model is not None else source, val_size, train_size
            )
            if split is not None and image_size is None and split.get("image_size") and dataset == "folder":
                image_size = int(split["image_size"])  # the size the baseline was trained at (image folders)
            try:
                data = _load_data(
                    dataset,
                    None if data_root is None else str(data_root),
                    val_size,
                    download,
                    train_size,
                    split_seed,
                    image_size,
                )
            except DatasetNotFoundError as err:
                # The data layer words its hint for the CLI; a Python caller holds keyword arguments.
                raise DatasetNotFoundError(
                    f"{err}\nFrom Python: pass download=True (needs internet) or data_root=DIR "
                    f"to gym.make/PruneEnv."
                ) from None
            if split is not None:
                check_split(data, split, source)
            self._split_args: tuple | None = (val_size, train_size, split_seed)
        else:
            self._split_args = None
        self.data = data
        teacher = self._build_model(model, model_name, checkpoint, pretrained, width_mult, baseline_epochs)
        classifier = _classifier(teacher)
        if classifier.out_features != data.num_classes:
            raise ValueError(
                f"the model has {classifier.out_features} outputs, "
                f"but {data.name} has {data.num_classes} classes"
            )
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._original_state = {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}
        self.input_size = (1, data.in_chans, data.image_size, data.image_size)

        self.model: nn.Module = self._fresh_model()
        self._pruner = self._make_pruner(self.model)
        self._pristine = True
        self.initial_group_widths = self._pruner.widths.copy()
        self._layer_counts = self._pruner.layer_counts
        self.num_groups = len(self.initial_group_widths)
        if self.num_groups == 0:
            raise ValueError(f"{model_name} has no prunable channel group")
        self.macs0, self.params0 = count_macs_params(self.model, self.input_size)
        self.n0 = int(self.initial_group_widths.sum())
        self.stage_size = max(1, int(round(self.stage_sparsity * self.n0)))
        self.target_channels = max(1, int(round(self.target_sparsity * self.n0)))
        w0 = self.initial_group_widths
        floor = self._min_width()
        capacity = int(np.where((w0 // self.round_to) * self.round_to >= floor, w0 - floor, 0).sum())
        if self.compute_target is not None:
            self._init_compute_target(w0, floor, capacity)
        elif self.target_channels > capacity:
            raise ValueError(
                f"target_sparsity={target_sparsity} asks for {self.target_channels} of {self.n0} channels, "
                f"but min_channels={min_channels}/round_to={round_to} leave only {capacity} removable"
            )
        if self.compute_target is None:
            self.num_stages = math.ceil(self.target_channels / self.stage_size)

        g = self.num_groups
        self.observation_space = spaces.Box(0.0, 1.0, (g + 4,), dtype=np.float32)
        low = -1.0 if self.action_param == "log_prior" else 0.0
        self.action_space = spaces.Box(low, 1.0, (g,), dtype=np.float32)

        self._started = False
        self._reset_state()

    # ------------------------------------------------------------------ construction
    def _init_compute_target(self, w0: np.ndarray, floor: int, capacity: int) -> None:
        """Stages and reachability of a MACs/params target (``target_macs``/``target_params``)."""
        ratio = self.target_ratio
        # a float tolerance, so that e.g. (1 - 0.7) / 0.15 is 2 stages, not 3
        self.num_stages = max(1, math.ceil((1.0 - ratio) / self.stage_sparsity - 1e-9))
        self.target_channels = capacity  # the channel budget is no limit: the compute target ends the episode
        cost = self._pruner.cost_model(self.input_size, self.macs0, self.params0)
        smallest = np.where((w0 // self.round_to) * self.round_to >= floor, floor, w0)
        reachable = cost(smallest)[self._metric_index] / self._metric0
        if reachable > ratio:
            raise ValueError(
                f"target_{self.compute_target}={ratio:g} is out of reach: with min_channels={self.min_channels}"
                f"/round_to={self.round_to} the smallest model keeps {reachable:.3f} of the original "
                f"{self.compute_target}"
            )

    @property
    def _metric_index(self) -> int:
        return 0 if self.compute_target == "macs" else 1

    @property
    def _metric0(self) -> int:
        return self.macs0 if self.compute_target == "macs" else self.params0

    @property
    def stage_goal(self) -> int | None:
        """With a compute target: the MACs (or params) the model may have at most after this stage.

        Stage ``k`` (0-based) brings the model to ``max(target, 1 - (k + 1) * stage_sparsity)`` of the
        original, so every stage removes the same fraction of the *original* MACs/params and the last
        one lands on the target. None for a channel-sparsity target.
        """
        if self.compute_target is None:
            return None
        fraction = max(self.target_ratio, 1.0 - (self.stage + 1) * self.stage_sparsity)
        return int(math.floor(fraction * self._metric0 + 1e-6))

    def predict_cost(self, counts: Any) -> tuple[int, int]:
        """``(macs, params)`` after removing ``counts[g]`` channels from each group this stage (closed form)."""
        self._require_started()
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (self.num_groups,):
            raise ValueError(f"counts must have shape ({self.num_groups},), got {counts.shape}")
        return self._cost(self.group_widths - counts)

    def _compute_target_met(self) -> bool:
        value = self.macs if self.compute_target == "macs" else self.params
        return value <= math.floor(self.target_ratio * self._metric0 + 1e-6)

    def _build_model(
        self, model, model_name, checkpoint, pretrained, width_mult, baseline_epochs
    ) -> nn.Module:
        import keepgym.models as models
        if model is not None:
            return copy.deepcopy(model)
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {path} does not exist")
            # model_name is what the user named: a pkg.module:factory file of that name may be rebuilt
            trust = model_name if isinstance(model_name, str) and ":" in model_name else None
            loaded = models.load_model(path, map_location="cpu", trust_factory=trust)
            saved_name = getattr(loaded, "keepgym_spec", {}).get("name")
            if saved_name != model_name:
                raise ValueError(
                    f"checkpoint {path} holds a {saved_name}, not a {model_name}; "
                    f"give the matching model name or the right file"
                )
            return loaded
        data = self.data
        if not pretrained:
            # fixed init seed, so two envs built alike are identical
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return models.create_model(model_name, data.num_classes, width_mult, data.in_chans)
        path = default_checkpoint_path(model_name, self.dataset, width_mult)
        if path.is_file():
            logger.info("using the cached %s baseline at %s", model_name, path)
            return models.load_model(path, map_location="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = models.create_model(model_name, data.num_classes, width_mult, data.in_chans)
        # a warning, not info: building an env then trains for a while and writes under $KEEPGYM_CACHE
        logger.warning(
            "no cached %s baseline for %s: training one for %d epochs and caching it at %s",
            model_name,
            self.dataset,
            baseline_epochs,
            path,
        )
        acc = _train_baseline(model.to(self.device), data, baseline_epochs, self.device)
        extra = {}
        if self._split_args is not None:  # the split this baseline is trained on travels with it
            val_size, train_size, seed = self._split_args
            extra["split"] = split_record(data, seed=seed, val_size=val_size, train_size=train_size)
        models.save_model(
            model.cpu(), path, dataset=self.dataset, val_accuracy=acc, epochs=baseline_epochs, **extra
        )
        return model

    def _fresh_model(self) -> nn.Module:
        model = copy.deepcopy(self.teacher)
        model.load_state_dict(self._original_state)
        for p in model.parameters():
            p.requires_grad_(True)
        return model.eval()

    def _make_pruner(self, model: nn.Module) -> GroupPruner:
        example = torch.zeros(self.input_size, device=self.device)
        return GroupPruner(model, example, ignored_layers=[_classifier(model)])

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.stage = 0
        self._removed = 0
        self._scores: list[torch.Tensor] | None = None
        self._cost = None
        self._calib: tuple[torch.Tensor, torch.Tensor] | None = None
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stage_seed: int | None = None
        self._bn_cache: tuple[int, torch.Tensor] | None = None
        self._order_key: tuple[int | None, int] | None = None  # (stage seed, images) of scoring_order()'s cache
        self._parent_margin: torch.Tensor | None = None  # per scoring image, of the current model (scoring_order)
        #: (stage seed, counts bytes) -> vanilla accuracy of a candidate scored on every image this stage
        self._scored: dict[tuple[int | None, bytes], float] = {}
        self._scored_margin: dict[tuple[int | None, bytes], torch.Tensor] = {}  # their per-image margins
        self._terminated = False
        self.macs, self.params = self.macs0, self.params0
        self.last_accuracy = 0.0

    @property
    def group_widths(self) -> np.ndarray:
        """Current width of every coupling group, ``int64`` array of shape ``(G,)``."""
        return self._pruner.widths

    @property
    def groups(self) -> list:
        """The :class:`keepgym.envs.pruning.ChannelGroup` objects (root layer, member layers, width)."""
        return self._pruner.groups

    @property
    def original_model(self) -> nn.Module:
        """The unpruned model (the distillation teacher); do not modify it."""
        return self.teacher

    @property
    def stage_budget(self) -> int:
        """Channels the current stage removes (``M``, less in the last stage, 0 once done).

        With a compute target the count depends on the action; this is the count of a uniform split
        (every group gives the same fraction of its width).
        """
        if self._terminated:
            return 0
        if self.compute_target is not None:
            return int(self.allocate(self.group_widths.astype(np.float64)).sum())
        return int(min(self.stage_size, self.target_channels - self._removed))

    @property
    def removed_channels(self) -> int:
        """Channels removed so far in this episode (group channels)."""
        return self._removed

    def _min_width(self) -> int:
        r = self.round_to
        return r * math.ceil(self.min_channels / r)

    def _capacity(self, widths: np.ndarray) -> np.ndarray:
        """Removable units per group (channels, or multiples of ``round_to``)."""
        r, floor = self.round_to, self._min_width()
        w = np.asarray(widths, dtype=np.int64)
        if r == 1:
            return np.maximum(0, w - floor)
        base = (w // r) * r
        units = np.maximum(0, (base - floor) // r)
        # a width that is not a multiple first drops to the multiple below (one unit)
        return np.where((w % r != 0) & (base >= floor), units + 1, units)

    def prunable_mask(self) -> np.ndarray:
        """Boolean ``(G,)``: groups that can still give channels above ``min_channels``."""
        return self._capacity(self.group_widths) > 0

    # ------------------------------------------------------------------ action handling
    def _check_action(self, action: Any) -> np.ndarray:
        try:
            raw = np.asarray(action)
        except Exception as exc:  # noqa: BLE001 - ragged lists, objects whose __array__ fails, ...
            raise ValueError(f"action must be a numeric array of shape ({self.num_groups},)") from exc
        # Only real numbers (and bools): numpy would parse strings ("0.5"), drop imaginary parts and
        # unpack object arrays silently, which hides bugs in the caller.
        if raw.dtype.kind not in "biuf":
            raise ValueError(
                f"action must be a real numeric array of shape ({self.num_groups},), got dtype {raw.dtype}"
            )
        a = raw.astype(np.float64)
        if a.shape != (self.num_groups,):
            raise ValueError(f"action must have shape ({self.num_groups},), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError("action contains NaN or inf")
        if self.action_param == "log_prior":
            return a
        if np.all(a < 0):
            raise ValueError("action is all negative; weights must be >= 0 (all zeros means uniform)")
        return a

    def split_weights(self, action: Any) -> np.ndarray:
        """The non-negative group weights ``action`` stands for (before normalisation); checks the action.

        ``weights``: the action itself, negatives clipped to 0. ``log_prior``: the current group widths
        (the width-proportional split, under which every group loses the same fraction this stage) times
        ``exp(LOG_PRIOR_SCALE * clip(action, -1, 1))``, so the zero action is that split and each entry
        scales its group's share by between 1/4 and 4; a Gaussian policy centred on zero, as PPO, SAC and
        A2C start, explores around a sensible allocation.
        """
        a = self._check_action(action)
        if self.action_param == "log_prior":
            return self.group_widths.astype(np.float64) * np.exp(LOG_PRIOR_SCALE * np.clip(a, -1.0, 1.0))
        return np.clip(a, 0.0, None)

    def allocate(self, action: Any) -> np.ndarray:
        """Channels each group gives this stage for ``action`` (``int64`` array of shape ``(G,)``).

        The action is normalised to ``p`` (negatives clipped to 0, all zeros = uniform); group ``g``
        is asked for ``p_g * M``; groups that hit ``min_channels`` give what they can and the rest
        is spread over the others in proportion to ``p`` (uniformly if they all have ``p = 0``);
        integers by largest remainder, so the total is ``M`` unless fewer channels are left.

        Raises:
            ValueError: NaN/inf, wrong shape, non-real dtype, all-negative action.
        """
        a = self.split_weights(action)
        if a.max() > 0:
            a = a / a.max()  # scale first: the sum of huge weights (1e308) would overflow to inf
        p = a / a.sum() if a.sum() > 0 else np.full(self.num_groups, 1.0 / self.num_groups)
        widths = self.group_widths
        cap = self._capacity(widths)
        if self._terminated:
            return np.zeros(self.num_groups, dtype=np.int64)
        if self.compute_target is not None:
            return self._units_to_counts(self._compute_units(p, cap), widths)
        budget = self.stage_budget
        if budget <= 0:
            return np.zeros(self.num_groups, dtype=np.int64)
        r = self.round_to
        return self._units_to_counts(_waterfill(p, max(1, int(round(budget / r))) if r > 1 else budget, cap), widths)

    def _units_to_counts(self, units: np.ndarray, widths: np.ndarray) -> np.ndarray:
        r = self.round_to
        if r == 1:
            return units
        first = np.where(widths % r != 0, widths % r, r)  # the first unit of an off-multiple width is smaller
        return np.where(units > 0, first + r * (units - 1), 0).astype(np.int64)

    def _compute_units(self, p: np.ndarray, cap: np.ndarray) -> np.ndarray:
        """The smallest split of the stage, in proportion to ``p``, that meets :attr:`stage_goal`.

        Bisection over the number of units (channels, or ``round_to`` multiples) split by ``p``; the
        MACs/params of each split come from the stage's closed-form cost model. If even every
        removable unit cannot meet the goal, all of them go.
        """
        widths, goal, k = self.group_widths, self.stage_goal, self._metric_index

        def split(n: int) -> np.ndarray:
            return _waterfill(p, n, cap)

        def meets(units: np.ndarray) -> bool:
            return self._cost(widths - self._units_to_counts(units, widths))[k] <= goal

        total = int(cap.sum())
        if total == 0 or not meets(split(total)):
            return split(total)
        lo, hi = 1, total
        while lo < hi:
            mid = (lo + hi) // 2
            if meets(split(mid)):
                hi = mid
            else:
                lo = mid + 1
        return split(lo)

    # ------------------------------------------------------------------ stage preparation
    def _prepare_stage(self) -> float:
        """Draw the calibration batch, score channels and fix the stage's cost model. Returns seconds."""
        t0 = time.perf_counter()
        rng = self.np_random
        n = len(self.data.train_y)
        idx = np.sort(rng.choice(n, size=min(self.calibration_size, n), replace=False))
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        x = self.data.normalize(self.data.train_x[idx_t].to(self.device))
        y = self.data.train_y[idx_t].to(self.device)
        self._calib = (x, y)
        self._stage_seed = int(rng.integers(2**62))
        generator = torch.Generator().manual_seed(self._stage_seed)
        self._scores = self._pruner.importance(self.criterion, x, y, generator, self.batch_size)
        self._pruner.set_ranking(self._scores)
        self._cost = self._pruner.cost_model(self.input_size, self.macs, self.params)
        synchronize(self.device)
        return time.perf_counter() - t0

    def bn_calibration_batch(self) -> torch.Tensor | None:
        """This stage's normalised training images for ``adaptive_bn`` scoring (None with ``vanilla``).

        ``bn_calibration_size`` images drawn from the stage's seed (no draw from ``np_random``, so the
        ``vanilla`` random stream is unchanged); the same tensor object for every call within a stage.
        """
        self._require_started()
        if self.candidate_scoring != "adaptive_bn" or self._stage_seed is None:
            return None
        if self._bn_cache is None or self._bn_cache[0] != self._stage_seed:
            n = len(self.data.train_y)
            generator = torch.Generator().manual_seed(self._stage_seed ^ 0x5EED_B4)
            idx = torch.sort(torch.randperm(n, generator=generator)[: min(self.bn_calibration_size, n)]).values
            self._bn_cache = (self._stage_seed, self.data.normalize(self.data.train_x[idx].to(self.device)))
        return self._bn_cache[1]

    def _score(
        self, counts: np.ndarray, val: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[float, float, torch.Tensor]:
        """Accuracy, mean cross-entropy and per-image margins (:func:`score_images`) of the candidate ``counts``
        under :attr:`candidate_scoring` on ``val`` (default: all scoring images), masked or on a pruned copy
        as :attr:`candidate_path` says."""
        bn_x = self.bn_calibration_batch()
        x, y = self._val if val is None else val
        costs = self.path_costs
        costs.start_stage(self._stage_seed)
        widths = self.group_widths - counts
        macs_fraction = self._cost(widths)[0] / max(self.macs, 1)
        path = self.candidate_path
        if path == "auto":
            path = costs.choose(macs_fraction, len(y))
        t0 = time.perf_counter()
        if path == "physical":
            model = self._pruner.pruned_copy(counts)
            setup_s = time.perf_counter() - t0
            with contextlib.nullcontext() if bn_x is None else adaptive_bn(model, bn_x, self.batch_size):
                correct, margin, loss = score_images(model, x, y, self.batch_size)
            synchronize(self.device)
            costs.record_physical(setup_s, time.perf_counter() - t0 - setup_s, macs_fraction, len(y))
        else:
            with self._pruner.masked(counts):
                with contextlib.nullcontext() if bn_x is None else adaptive_bn(self.model, bn_x, self.batch_size):
                    correct, margin, loss = score_images(self.model, x, y, self.batch_size)
                synchronize(self.device)
            costs.record_masked(time.perf_counter() - t0, len(y))
        return int(correct.sum()) / max(1, len(y)), loss, margin

    def stage_importance(self) -> list[np.ndarray]:
        """Per-channel importance of every group for this stage, each divided by its group's mean.

        Mean-normalised (Torch-Pruning's default normaliser) so scores can be ranked across groups
        (e.g. by a global-ranking baseline). Channel ``j`` of group ``g`` is channel ``j`` of its layers.
        """
        self._require_started()
        out = []
        for s in self._scores:
            v = s.numpy().astype(np.float64)
            mean = v.mean()
            out.append(v / mean if mean > 0 else np.zeros_like(v))
        return out

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Restore the original model (from the kept state dict) and start a new compression run.

        The recovery is reset too (its teacher is the original model again).
        """
        super().reset(seed=seed)
        t0 = time.perf_counter()
        if not self._pristine:
            self.model = self._fresh_model()
            self._pruner = self._make_pruner(self.model)
            self._pristine = True
        self._reset_state()
        self.recovery.reset(self)
        rng = self.np_random
        n_val = len(self.data.val_y)
        if self.eval_size is not None and self.eval_size < n_val:
            vidx = torch.as_tensor(
                np.sort(rng.choice(n_val, size=self.eval_size, replace=False)), dtype=torch.long
            )
        else:
            vidx = torch.arange(n_val)
        self._val = (
            self.data.normalize(self.data.val_x[vidx].to(self.device)),
            self.data.val_y[vidx].to(self.device),
        )
        t1 = time.perf_counter()
        self.last_accuracy = self._parent_accuracy()
        eval_s = time.perf_counter() - t1
        importance_s = self._prepare_stage()
        self._started = True
        times = WallTimes(importance_s=importance_s, eval_s=eval_s, total_s=time.perf_counter() - t0)
        return self._obs(), self._info(self.last_accuracy, self.macs, self.params, self.group_widths, times)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Prune one stage for real: allocate, remove channels, recover, score, rank the next stage.

        The order is: allocate ``action`` over the groups, surgery, validation accuracy *before* recovery,
        ``recovery.recover`` (e.g. KD; :mod:`keepgym.envs.recovery`), validation accuracy *after* recovery,
        then one importance pass for the next stage from the recovered weights.

        Returns:
            ``(obs, reward, terminated, truncated, info)``; the observation's last entry, the reward and
            ``info["accuracy"]`` hold the accuracy **after** recovery, ``info["accuracy_before_recovery"]``
            (alias ``accuracy_before_finetune``) the one right after the surgery, which is what
            :meth:`evaluate` scores candidates by.
        """
        self._require_started()
        if self._terminated:
            raise RuntimeError("the episode is over (target sparsity reached); call reset()")
        action = self.recovery.prepare_action(action)
        counts = self.allocate(action)  # validates before anything changes
        t0 = time.perf_counter()
        predicted = self._cost(self.group_widths - counts)
        self._pruner.prune(counts)
        self._pristine = False
        self._parent_margin, self._order_key = None, None
        synchronize(self.device)
        surgery_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        key = (self._stage_seed, counts.tobytes())
        acc_before = self._scored.get(key)
        if acc_before is None:  # not scored as a candidate of this stage (or scored another way)
            acc_before = self._parent_accuracy()
        else:  # the search measured the pruned model: its margins order the next stage's images
            self._parent_margin = self._scored_margin.get(key)
        self._scored.clear()
        self._scored_margin.clear()
        eval_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        result: RecoveryResult = self.recovery.recover(self, self.stage)
        finetune_s = time.perf_counter() - t1
        acc = acc_before
        if result.changed:
            t2 = time.perf_counter()
            acc = self._parent_accuracy()
            eval_s += time.perf_counter() - t2
        self.macs, self.params = count_macs_params(self.model, self.input_size)
        if (self.macs, self.params) != predicted:
            logger.warning(
                "closed-form MACs/params %s differ from the counter's %s", predicted, (self.macs, self.params)
            )
        self._removed += int(counts.sum())
        self.stage += 1
        self.last_accuracy = acc
        if self.compute_target is not None:
            reached = self._compute_target_met()
        else:
            reached = self._removed >= self.target_channels
        self._terminated = reached or not self.prunable_mask().any()
        importance_s = 0.0 if self._terminated else self._prepare_stage()
        reward = self._reward(acc, self.macs, self.params)
        times = WallTimes(importance_s, surgery_s, finetune_s, eval_s, time.perf_counter() - t0)
        info = self._info(acc, self.macs, self.params, self.group_widths, times)
        info.update(
            removed=counts.tolist(),
            closed_form_macs=predicted[0],
            closed_form_params=predicted[1],
            accuracy_before_recovery=acc_before,
            accuracy_before_finetune=acc_before,
            **result.info,
        )
        self.recovery.record_stage(info, reward, self._terminated, result)
        return self._obs(), reward, self._terminated, False, info

    def evaluate(self, action: Any) -> tuple[float, dict]:
        """Score ``action`` as this stage's allocation without committing it.

        The parameters the allocation would remove are zeroed in place, the model is evaluated in
        eval mode on the validation images and the parameters are restored bit for bit; MACs and
        params come from the closed form. With ``candidate_scoring="adaptive_bn"`` the BatchNorm
        statistics are re-estimated on :meth:`bn_calibration_batch` before scoring and restored after.
        No random numbers are drawn, so weights, batch-norm buffers, RNG state and observation are
        exactly as before.

        Returns:
            ``(reward, info)`` with the same keys as :meth:`step`'s info.
        """
        self._require_open_stage()
        return self.evaluate_allocation(self.allocate(action))

    def evaluate_allocation(self, counts: np.ndarray, images: slice | None = None) -> tuple[float, dict]:
        """:meth:`evaluate` of an already allocated candidate: ``counts[g]`` channels leave group ``g``.

        ``counts`` is what :meth:`allocate` returns; evaluators (:mod:`keepgym.envs.evaluators`) score with it.
        ``images`` (racing): score only on the validation images at these positions of
        :meth:`scoring_order` (the stage's scoring images, most fragile first), so disjoint slices add up:
        ``info["correct"]`` and ``info["scored_images"]`` of the slices sum to those of the whole set, and
        ``info["accuracy"]`` (and the reward) are the slice's. None: every scoring image.
        """
        self._require_open_stage()
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (self.num_groups,) or (counts < 0).any() or (counts > self.group_widths).any():
            raise ValueError(f"counts must be {self.num_groups} ints in [0, group width], got {counts.tolist()}")
        t0 = time.perf_counter()
        val = self._val
        if images is not None:
            if not isinstance(images, slice) or images.step not in (None, 1):
                raise ValueError(f"images must be a slice with step 1 or None, got {images!r}")
            idx = torch.as_tensor(self.scoring_order()[images], dtype=torch.long, device=val[1].device)
            if len(idx) == 0:
                raise ValueError(f"images {images} selects none of the {len(val[1])} scoring images")
            val = (val[0][idx], val[1][idx])
        acc, loss, margin = self._score(counts, val)
        eval_s = time.perf_counter() - t0
        times = WallTimes(eval_s=eval_s, total_s=time.perf_counter() - t0)
        reward, info = self.candidate_result(counts, acc, times, scored_images=len(val[1]))
        if images is None and self.candidate_scoring == "vanilla":  # step() reuses them with the accuracy
            self._scored_margin[(self._stage_seed, counts.tobytes())] = margin
        if images is not None:
            info["loss"] = loss  # mean cross-entropy on the slice: racing breaks accuracy ties with it
        return reward, info

    @property
    def num_scoring_images(self) -> int:
        """How many validation images a candidate is scored on (``eval_size`` or the whole split)."""
        self._require_started()
        return len(self._val[1])

    def scoring_order(self) -> np.ndarray:
        """The positions of the scoring images, most fragile first, for :meth:`evaluate_allocation`'s ``images``.

        Sorted by ``|logit[y] - max other logit|`` of the current model (the parent of every candidate of
        the stage), smallest first, ties broken by a fixed shuffle drawn from the stage's seed (the env's
        ``np_random`` is untouched). A stage removes few channels, so a candidate's predictions differ
        from its parent's mostly on the images near the parent's decision boundary: the first slices of
        this order hold most of the differences between candidates, and racing (``RLPruner(racing=True)``)
        ranks them there. The same for every candidate of a stage and reproducible. The margins come from
        the pass that measured the current model, or from the committed candidate's full-set ``vanilla``
        scoring; otherwise (e.g. a Ray evaluator scored it) from one forward pass, once per stage.
        """
        self._require_started()
        n = len(self._val[1])
        key = (self._stage_seed, n)
        if self._order_key != key:
            if self._parent_margin is None or len(self._parent_margin) != n:
                self._parent_accuracy()
            assert self._parent_margin is not None
            shuffle = np.random.default_rng([self._stage_seed, 0x5C0E]).permutation(n)
            tie = np.empty(n, dtype=np.int64)
            tie[shuffle] = np.arange(n)
            self._order = np.lexsort((tie, np.abs(self._parent_margin.double().numpy())))
            self._order_key = key
        return self._order

    def _parent_accuracy(self) -> float:
        """Accuracy of the current model on the scoring images; keeps the per-image margins for
        :meth:`scoring_order`."""
        assert self._val is not None
        correct, self._parent_margin, _ = score_images(self.model, *self._val, self.batch_size)
        self._order_key = None
        return int(correct.sum()) / max(1, len(correct))

    def scoring_inputs(self) -> ScoringInputs:
        """The current stage's model, validation tensors, ranking and settings (read-only), for evaluators.

        An evaluator that scores elsewhere (another process, a Ray actor) masks ``counts`` on a copy of
        ``model`` with the coupling groups rebuilt from ``input_size`` and ranked by ``ranking``, and scores
        it with :func:`accuracy` on ``val_x``/``val_y`` (inside :func:`adaptive_bn` on ``bn_x`` when that is
        not None), which is what :meth:`evaluate_allocation` does; then :meth:`candidate_result` gives the
        ``(reward, info)``.
        """
        self._require_started()
        calib_x, calib_y = self._calib
        return ScoringInputs(
            model=self.model,
            val_x=self._val[0],
            val_y=self._val[1],
            ranking=self._scores,
            bn_x=self.bn_calibration_batch(),
            calib_x=calib_x,
            calib_y=calib_y,
            input_size=tuple(self.input_size),
            batch_size=self.batch_size,
            criterion=self.criterion,
        )

    def _require_open_stage(self) -> None:
        self._require_started()
        if self._terminated:
            raise RuntimeError("the episode is over (target sparsity reached); call reset()")

    def candidate_result(
        self, counts: np.ndarray, accuracy: float, times: WallTimes, scored_images: int | None = None
    ) -> tuple[float, dict]:
        """``(reward, info)`` of a candidate allocation ``counts`` whose validation accuracy was measured.

        Shared by :meth:`evaluate` and the parallel evaluators, which measure the accuracy elsewhere:
        MACs and params come from the stage's closed-form cost model. ``scored_images``: how many images
        ``accuracy`` was measured on (default: all :attr:`num_scoring_images`); ``info["correct"]`` and
        ``info["scored_images"]`` report them.
        """
        n = self.num_scoring_images if scored_images is None else int(scored_images)
        if n == self.num_scoring_images and self.candidate_scoring == "vanilla":
            # what step() would measure right after the surgery (masked == physical): step reuses it
            self._scored[(self._stage_seed, counts.tobytes())] = float(accuracy)
        widths = self.group_widths - counts
        macs, params = self._cost(widths)
        info = self._info(accuracy, macs, params, widths, times, removed=self._removed + int(counts.sum()))
        info.update(removed=counts.tolist(), accuracy_before_recovery=accuracy, accuracy_before_finetune=accuracy)
        info.update(correct=int(round(accuracy * n)), scored_images=n)
        return self._reward(accuracy, macs, params), info

    def evaluate_many(self, actions: Sequence[Any], images: slice | None = None) -> list[tuple[float, dict]]:
        """Score several candidate actions (see :meth:`evaluate`) with :attr:`evaluator`.

        Every action is checked and allocated before any is scored, so one bad action raises
        ``ValueError`` with nothing scored; the env is left exactly as it was. ``images``: score on
        these positions of :meth:`scoring_order` only (see :meth:`evaluate_allocation`; racing).

        Returns:
            One ``(reward, info)`` per action, in order, equal to :meth:`evaluate`'s.
        """
        self._require_open_stage()
        counts = [self.allocate(a) for a in actions]
        if not counts:
            return []
        return list(self.evaluator.evaluate_many(self, counts, images=images))

    def close(self) -> None:
        """Close the :attr:`evaluator` (Ray actors, ...) and the env."""
        self.evaluator.close()
        super().close()

    def render(self) -> str | np.ndarray | None:
        """``"ansi"``: one line per group (layers, width, sparsity) and the totals; ``"rgb_array"``: an
        ``(H, W, 3)`` uint8 bar chart of the per-group sparsity (one bar per group, full height = 1)."""
        if self.render_mode == "rgb_array":
            return _bar_image(1.0 - self.group_widths / np.maximum(self.initial_group_widths, 1))
        if self.render_mode != "ansi":
            return None
        w, w0 = self.group_widths, self.initial_group_widths
        lines = [
            f"stage {self.stage}/{self.num_stages}  acc {self.last_accuracy:.4f}  "
            f"MACs {self.macs / self.macs0:.3f}  params {self.params / self.params0:.3f}  "
            f"sparsity {self._removed / self.n0:.3f}"
        ]
        for g, wi, w0i in zip(self._pruner.groups, w, w0, strict=True):
            lines.append(f"  [{g.index:3d}] {g.root_name:40s} {wi:5d}/{w0i:<5d} x{len(g.layers)}")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write the current (pruned) model with ``keepgym.models.save_model`` (state dict + widths)."""
        from keepgym.models import save_model

        return save_model(
            self.model,
            path,
            stage=self.stage,
            sparsity=self._removed / self.n0,
            val_accuracy=self.last_accuracy,
            **extra,
        )

    def snapshot(self) -> dict:
        """A copy of the episode state (model, counters, RNG) for :meth:`restore`."""
        self._require_started()
        return {
            "model": copy.deepcopy(self.model),
            "stage": self.stage,
            "removed": self._removed,
            "terminated": self._terminated,
            "macs": self.macs,
            "params": self.params,
            "accuracy": self.last_accuracy,
            "scores": [s.clone() for s in self._scores],
            "calib": self._calib,
            "val": self._val,
            "stage_seed": self._stage_seed,
            "rng": copy.deepcopy(self.np_random.bit_generator.state),
            "recovery": self.recovery.snapshot(),
        }

    def restore(self, snap: dict) -> None:
        """Return to a :meth:`snapshot` (rebuilds the dependency graph of the copied model)."""
        self.model = copy.deepcopy(snap["model"])
        self._pruner = self._make_pruner(self.model)
        self._scored, self._scored_margin = {}, {}
        self._parent_margin, self._order_key = None, None
        self._pristine = snap["stage"] == 0 and snap["removed"] == 0
        self.stage, self._removed, self._terminated = snap["stage"], snap["removed"], snap["terminated"]
        self.macs, self.params, self.last_accuracy = snap["macs"], snap["params"], snap["accuracy"]
        self._scores = [s.clone() for s in snap["scores"]]
        self._calib, self._val = snap["calib"], snap["val"]
        self._stage_seed = snap.get("stage_seed")
        self.np_random.bit_generator.state = copy.deepcopy(snap["rng"])
        if "recovery" in snap:
            self.recovery.restore(snap["recovery"])
        if not self._terminated:  # an ended episode ranks no next stage (its scores predate the last step)
            self._pruner.set_ranking(self._scores)
        self._cost = self._pruner.cost_model(self.input_size, self.macs, self.params)

    def model_with_widths(self, widths: Sequence[int]) -> nn.Module:
        """A copy of the original model cut to the per-group ``widths`` (weights to be loaded by the caller).

        Every layer's shape follows from its groups' widths, so this rebuilds the architecture of any model
        this env pruned (e.g. a checkpointed one) without a model file.
        """
        widths = np.asarray(widths, dtype=np.int64)
        model = self._fresh_model()
        pruner = self._make_pruner(model)
        if widths.shape != pruner.widths.shape or (widths < 1).any() or (widths > pruner.widths).any():
            raise ValueError(f"widths {widths.tolist()} do not fit the groups {pruner.widths.tolist()}")
        counts = pruner.widths - widths
        if counts.any():
            pruner.set_ranking([torch.arange(int(w), dtype=torch.float64) for w in pruner.widths])
            pruner.prune(counts)
        return model

    def state_dict(self) -> dict[str, Any]:
        """The whole episode state (model widths and weights, counters, stage ranking, RNG, recovery with its
        teacher) as tensors and plain values, on the CPU: ``torch.load(weights_only=True)`` reads it back and
        :meth:`load_state_dict` continues the episode bit for bit."""
        self._require_started()

        def cpu(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return obj.detach().cpu().clone()
            if isinstance(obj, list | tuple):
                return [cpu(v) for v in obj]
            return obj

        return {
            "widths": [int(w) for w in self.group_widths],
            "model": {k: cpu(v) for k, v in self.model.state_dict().items()},
            "stage": self.stage,
            "removed": self._removed,
            "terminated": self._terminated,
            "macs": int(self.macs),
            "params": int(self.params),
            "accuracy": float(self.last_accuracy),
            "scores": cpu(self._scores),
            "calib": cpu(self._calib),
            "val": cpu(self._val),
            "stage_seed": self._stage_seed,
            "rng": copy.deepcopy(self.np_random.bit_generator.state),
            "recovery": self.recovery.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (of an env built with the same arguments)."""
        model = self.model_with_widths(state["widths"]).to(self.device)
        model.load_state_dict(state["model"])
        dev = self.device
        self.restore(
            {
                "model": model,
                "stage": int(state["stage"]),
                "removed": int(state["removed"]),
                "terminated": bool(state["terminated"]),
                "macs": int(state["macs"]),
                "params": int(state["params"]),
                "accuracy": float(state["accuracy"]),
                "scores": list(state["scores"]),
                "calib": None if state["calib"] is None else tuple(t.to(dev) for t in state["calib"]),
                "val": tuple(t.to(dev) for t in state["val"]),
                "stage_seed": state["stage_seed"],
                "rng": state["rng"],
            }
        )
        self._started = True
        self.recovery.load_state_dict(state["recovery"], self)

    # ------------------------------------------------------------------ internals
    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("call reset() first")

    def _reward(self, acc: float, macs: int, params: int) -> float:
        return float(acc + self.alpha * (1.0 - macs / self.macs0) + self.beta * (1.0 - params / self.params0))

    def _obs(self) -> np.ndarray:
        w, w0 = self.group_widths, self.initial_group_widths
        obs = np.concatenate(
            [
                1.0 - w / w0,
                [
                    self._removed / self.n0,
                    self.macs / self.macs0,
                    self.params / self.params0,
                    self.last_accuracy,
                ],
            ]
        )
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def _info(
        self,
        acc: float,
        macs: int,
        params: int,
        widths: np.ndarray,
        times: WallTimes,
        removed: int | None = None,
    ) -> dict:
        removed = self._removed if removed is None else removed
        k, w0 = self._layer_counts, self.initial_group_widths
        return {
            "accuracy": float(acc),
            "macs": int(macs),
            "params": int(params),
            "macs_ratio": macs / self.macs0,
            "params_ratio": params / self.params0,
            "sparsity": removed / self.n0,
            "layer_sparsity": float((k * (w0 - widths)).sum() / (k * w0).sum()),
            "stage": self.stage,
            "widths": [int(v) for v in widths],
            "wall_times": times,
        }


def _bar_image(values: np.ndarray, height: int = 64, bar: int = 6) -> np.ndarray:
    """``values`` in [0, 1] as an ``(height, bar * len(values), 3)`` uint8 bar chart (no matplotlib)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    image = np.full((height, bar * len(values), 3), 255, dtype=np.uint8)
    for i, v in enumerate(values):
        top = height - int(round(v * height))
        image[top:, i * bar : (i + 1) * bar - 1] = (230, 120, 30)
    return image


def _classifier(model: nn.Module) -> nn.Linear:
    from keepgym.models import get_classifier

    return get_classifier(model)


def _waterfill(p: np.ndarray, budget: int, cap: np.ndarray) -> np.ndarray:
    """Split ``budget`` integer units over groups in proportion to ``p`` with per-group caps.

    Real-valued proportional shares are capped and the excess re-split among the uncapped groups
    (uniformly when they all have zero weight); integers then follow by largest remainder (ties to
    the lower index). The total is ``min(budget, cap.sum())``.
    """
    cap = np.asarray(cap, dtype=np.int64)
    total = int(min(budget, cap.sum()))
    x = np.zeros(len(p))
    remaining = float(total)
    while remaining > 1e-9:
        active = x < cap - 1e-12
        if not active.any():
            break
        w = np.where(active, p, 0.0)
        if w.sum() <= 0:
            w = active.astype(np.float64)
        share = w / w.sum() * remaining
        room = cap - x
        full = active & (share >= room - 1e-12)
        if full.any():
            remaining -= float(room[full].sum())
            x[full] = cap[full]
            continue
        x += share
        remaining = 0.0
    n = np.minimum(np.floor(x + 1e-9).astype(np.int64), cap)
    deficit = total - int(n.sum())
    frac = x - n
    while deficit > 0:
        order = np.argsort(-frac, kind="stable")
        progressed = False
        for i in order:
            if deficit == 0:
                break
            if n[i] < cap[i]:
                n[i] += 1
                frac[i] -= 1.0
                deficit -= 1
                progressed = True
        if not progressed:
            break
    return n


@dataclass
class CandidatePathCosts:
    """The current stage's measured costs of scoring a candidate masked or on a physically pruned copy.

    Model: masked = ``masked_per_image * n`` (the full-width forward; zeroing is ~free); physical =
    ``physical_setup + physical_per_image * macs_fraction * n`` (copy + surgery, then a forward that
    shrinks with the candidate's MACs as a fraction of the current model's). ``auto`` scores the
    stage's first candidate masked and its second physically (one measurement of each), then picks the
    cheaper prediction per candidate; the estimates are running means. A new stage starts over (the
    model changed). ``path_counts`` counts the candidates scored each way since the env was built.
    """

    stage_key: int | None = None
    masked_per_image: float | None = None
    physical_setup: float | None = None
    physical_per_image: float | None = None
    path_counts: dict[str, int] = field(default_factory=lambda: {"masked": 0, "physical": 0})

    def start_stage(self, key: int | None) -> None:
        if key != self.stage_key:
            self.stage_key, self.masked_per_image, self.physical_setup, self.physical_per_image = key, None, None, None

    def choose(self, macs_fraction: float, images: int) -> str:
        if self.masked_per_image is None:
            return "masked"
        if self.physical_setup is None or self.physical_per_image is None:
            return "physical"
        masked = self.masked_per_image * images
        physical = self.physical_setup + self.physical_per_image * macs_fraction * images
        return "physical" if physical < masked else "masked"

    def record_masked(self, seconds: float, images: int) -> None:
        self.path_counts["masked"] += 1
        self.masked_per_image = _running_mean(self.masked_per_image, seconds / max(images, 1))

    def record_physical(self, setup_s: float, forward_s: float, macs_fraction: float, images: int) -> None:
        self.path_counts["physical"] += 1
        self.physical_setup = _running_mean(self.physical_setup, setup_s)
        per_image = forward_s / max(images * macs_fraction, 1e-12)
        self.physical_per_image = _running_mean(self.physical_per_image, per_image)


def _running_mean(old: float | None, new: float, weight: float = 0.5) -> float:
    return new if old is None else (1.0 - weight) * old + weight * new


def compare_candidate_paths(env: PruneEnv, action: Any, rounds: int = 3) -> dict[str, Any]:
    """Median wall time of ``env.evaluate(action)`` with every :data:`CANDIDATE_PATHS` entry, in interleaved
    rounds (so load drift hits all alike), and the ratios to ``masked``; the env's path is put back.

    ``auto`` is timed after its stage's measurements are in (the first two rounds' candidates teach it).
    """
    env = env.unwrapped if hasattr(env, "unwrapped") else env
    kept = env.candidate_path
    times: dict[str, list[float]] = {p: [] for p in CANDIDATE_PATHS}
    try:
        for _ in range(max(1, rounds)):
            for path in ("masked", "physical", "auto"):
                env.candidate_path = path
                synchronize(env.device)
                t = time.perf_counter()
                env.evaluate(action)
                synchronize(env.device)
                times[path].append(time.perf_counter() - t)
    finally:
        env.candidate_path = kept
    median = {p: float(np.median(v)) for p, v in times.items()}
    widths = env.group_widths - env.allocate(action)
    return {
        "seconds": median,
        "over_masked": {p: median[p] / median["masked"] for p in ("physical", "auto")},
        "candidate_macs_fraction": env._cost(widths)[0] / env.macs,
    }


def profile_evaluate(env: PruneEnv, action: Any, repeats: int = 3) -> dict[str, float]:
    """Wall-time breakdown of scoring one candidate with ``env.evaluate`` (median of ``repeats``).

    Returns:
        ``importance_s``: one importance pass (done once per stage, shared by every candidate);
        ``surgery_s``: zeroing and restoring the candidate's parameters (the masking overhead);
        ``eval_s``: a whole ``env.evaluate(action)`` call;
        ``forward_s``: the forward pass of the physically pruned model over the same images;
        ``overhead_ratio``: ``(eval_s - forward_s) / forward_s``;
        ``images``: validation images per evaluation.
    The env's state is left as it was (the physical copy is a deep copy).
    """
    from keepgym.models import get_classifier

    env = env.unwrapped if hasattr(env, "unwrapped") else env
    counts = env.allocate(action)
    inputs = env.scoring_inputs()
    device = env.device

    def timed(fn: Callable[[], Any]) -> float:
        out = []
        for _ in range(max(1, repeats)):
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - t)
        return float(np.median(out))

    # importance and masking are timed on a copy with the same coupling groups, so the env is untouched
    pruned = copy.deepcopy(inputs.model)
    pruner = GroupPruner(pruned, torch.zeros(inputs.input_size, device=device), [get_classifier(pruned)])
    generator = torch.Generator().manual_seed(0)
    x, y = inputs.calib_x, inputs.calib_y
    importance_s = timed(lambda: pruner.importance(inputs.criterion, x, y, generator, inputs.batch_size))
    pruner.set_ranking(inputs.ranking)

    def mask_only() -> None:
        with pruner.masked(counts):
            pass

    surgery_s = timed(mask_only)
    eval_s = timed(lambda: env.evaluate(action))
    pruner.prune(counts)
    forward_s = timed(lambda: accuracy(pruned, inputs.val_x, inputs.val_y, inputs.batch_size))
    return {
        "importance_s": importance_s,
        "surgery_s": surgery_s,
        "eval_s": eval_s,
        "forward_s": forward_s,
        "overhead_ratio": (eval_s - forward_s) / forward_s if forward_s > 0 else math.nan,
        "images": int(len(inputs.val_y)),
    }
