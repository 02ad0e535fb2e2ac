"""Structured channel pruning behind a small adapter over Torch-Pruning's dependency graph.

RL-Pruner (Wang et al., arXiv 2411.06463) spreads a channel budget over the layers of a CNN and
removes the least important channels of each layer. Channels that must go together (residual adds,
concatenations, squeeze-excite gates, depthwise convs) are found here by Torch-Pruning's
``DependencyGraph`` (Fang et al., "DepGraph", CVPR 2023), never by a hand-made tracer: every
*coupling group* is one output-channel index space shared by one or more conv / linear layers, the
batch norms behind them and the in-channel slices of their consumers.

:class:`GroupPruner` offers what :class:`keepgym.envs.prune_env.PruneEnv` needs, in three speeds:

* :meth:`GroupPruner.importance` scores every channel of every group once per stage (Taylor
  ``|w * dL/dw|``, ``l1``, ``l2`` or ``random``), summed over all parameters the group would remove;
* :meth:`GroupPruner.masked` scores a *candidate* allocation without surgery: it zeroes in place
  exactly the parameter slices the allocation would remove (producers' out-channel weights, biases
  and BatchNorm affine parameters, consumers' in-channel slices) and restores them bit for bit on
  exit. In eval mode this gives the logits of the physically pruned model;
* :meth:`GroupPruner.prune` does the real surgery (Torch-Pruning's pruning functions, the ones
  ``Group.prune`` calls) and moves the per-group layout along by index bookkeeping.

:class:`CostModel` gives MACs and parameter counts of any per-group width vector in closed form
(a bilinear formula per layer, derived once per stage from the traced shapes and anchored to the
project's counter), so candidates never need a counter pass.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

__all__ = ["CRITERIA", "ChannelGroup", "CostModel", "GroupPruner", "count_macs_params"]

logger = logging.getLogger(__name__)

CRITERIA = ("taylor", "l1", "l2", "random")

# Operations per element that envs.metrics (thop conventions) charges to a batch norm: 2 for the
# normalisation, doubled with an affine map. Pools are in `_pool_ops`; activations, max-pools and
# dropout cost nothing.
_BN_OPS_AFFINE = 4
_BN_OPS_PLAIN = 2

_PF = tp.pruner.function
_OUT_FNS = {
    _PF.prune_conv_out_channels: "conv_out",
    _PF.prune_depthwise_conv_out_channels: "dw",
    _PF.prune_linear_out_channels: "linear_out",
    _PF.prune_batchnorm_out_channels: "bn",
}
_IN_FNS = {
    _PF.prune_conv_in_channels: "conv_in",
    _PF.prune_linear_in_channels: "linear_in",
}


def _handler_kind(handler: Callable) -> str | None:
    for table in (_OUT_FNS, _IN_FNS):
        for fn, kind in table.items():
            if handler == fn:
                return kind
    return None


@dataclass
class _Slice:
    """Positions along one dimension of one parameter that belong to one group's channels."""

    module: nn.Module
    name: str  # "weight" or "bias"
    dim: int
    positions: torch.Tensor  # long (P,), positions along `dim`
    channels: torch.Tensor  # long (P,), the group channel of each position
    # filled by GroupPruner.set_ranking: positions sorted by channel rank, and cum counts per rank
    ranked: torch.Tensor | None = None
    cum: np.ndarray | None = None

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.name)


@dataclass
class ChannelGroup:
    """One coupling group: channels that are kept or removed together.

    Attributes:
        index: position of the group in :attr:`GroupPruner.groups` (forward order).
        root: the conv / linear layer whose output channels index the group.
        root_name: its qualified name in the model.
        width: current number of channels.
        layers: names of the conv / linear layers whose output channels the group holds; a channel
            of the group is one output channel of each of them (``len(layers)`` RL-Pruner filters).
        slices: every parameter slice the group removes (internal).
    """

    index: int
    root: nn.Module
    root_name: str
    width: int
    layers: list[str]
    slices: list[_Slice] = field(default_factory=list, repr=False)
    # per module: ("out" | "in" | "dw" | "elem", channels per group channel) for the cost model
    shape_terms: list[tuple[nn.Module, str, int]] = field(default_factory=list, repr=False)
    # per layer the group prunes: (pruning function, layer, positions, group channel of each position)
    surgery: list[tuple[Callable, nn.Module, np.ndarray, np.ndarray]] = field(
        default_factory=list, repr=False
    )
    order: torch.Tensor | None = field(default=None, repr=False)  # channels, least important first


def count_macs_params(model: nn.Module, input_size: Sequence[int]) -> tuple[int, int]:
    """MACs and parameters of ``model`` at ``input_size``: ``keepgym.envs.metrics.count_macs_params``."""
    from keepgym.envs.metrics import count_macs_params as counter

    macs, params = counter(model, tuple(input_size))
    return int(macs), int(params)


def _pool_ops(module: nn.Module, ishape: Sequence[int], oshape: Sequence[int]) -> float:
    """The counter's operations for a weight-free layer (average pools; everything else is free)."""
    numel = float(np.prod(oshape))
    if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd):
        kernel = float(np.prod([i / o for i, o in zip(ishape[2:], oshape[2:], strict=False)]))
        return float(int((kernel + 1) * numel))
    if isinstance(module, nn.modules.pooling._AvgPoolNd):
        return numel
    return 0.0


class CostModel:
    """Closed-form MACs and parameters as a function of the per-group widths.

    Every layer that a group touches has an input width and an output width that are affine in the
    group widths (``in = a0 + a . w``); its cost is ``s * in_eff * out`` MACs and
    ``q * in_eff * out + r * out`` parameters, with ``s, q, r`` read off the traced shapes
    (``in_eff`` is 1 for depthwise convs, batch norms and pools). Layers no group touches cost
    what they cost now. The totals are anchored to the counter's figures for the current widths.

    Args:
        macs: counter MACs of the model at the current widths.
        params: counter parameters at the current widths.
        widths: current group widths, shape ``(G,)``.
        terms: per touched layer ``(s, q, r, in0, in_coef, out0, out_coef)``.
    """

    def __init__(self, macs: int, params: int, widths: np.ndarray, terms: list[tuple]) -> None:
        self.macs0 = int(macs)
        self.params0 = int(params)
        self.widths0 = np.asarray(widths, dtype=np.float64)
        g = len(self.widths0)
        n = len(terms)
        self._s = np.array([t[0] for t in terms], dtype=np.float64)
        self._q = np.array([t[1] for t in terms], dtype=np.float64)
        self._r = np.array([t[2] for t in terms], dtype=np.float64)
        self._in0 = np.array([t[3] for t in terms], dtype=np.float64)
        self._out0 = np.array([t[5] for t in terms], dtype=np.float64)
        self._a_in = np.zeros((n, g))
        self._a_out = np.zeros((n, g))
        for k, t in enumerate(terms):
            for gi, c in t[4].items():
                self._a_in[k, gi] = c
            for gi, c in t[6].items():
                self._a_out[k, gi] = c
        self._base_macs, self._base_params = self._raw(self.widths0[None])
        self._base_macs, self._base_params = self._base_macs[0], self._base_params[0]

    def _raw(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = w - self.widths0  # (B, G): width change per group
        fin = self._in0 + d @ self._a_in.T  # (B, L)
        fout = self._out0 + d @ self._a_out.T
        macs = (self._s * fin * fout).sum(axis=1)
        params = (self._q * fin * fout + self._r * fout).sum(axis=1)
        return macs, params

    def __call__(self, widths: Sequence[int] | np.ndarray) -> tuple[int, int]:
        """``(macs, params)`` of the model pruned to ``widths`` (shape ``(G,)``)."""
        w = np.asarray(widths, dtype=np.float64)[None]
        macs, params = self._raw(w)
        return (
            int(round(self.macs0 + macs[0] - self._base_macs)),
            int(round(self.params0 + params[0] - self._base_params)),
        )


class GroupPruner:
    """Coupling groups of a model, per-channel importance, masked scoring and real surgery.

    The classifier (``ignored_layers``) keeps its output channels; its input channels belong to the
    group of the layer that feeds it. Groups are ordered by the position of their first conv/linear
    layer in ``model.named_modules()``. The model is modified in place by :meth:`prune`.

    Args:
        model: the network to prune (any ``nn.Module`` Torch-Pruning can trace).
        example_inputs: one input batch for tracing, e.g. ``torch.zeros(1, 3, 32, 32)``.
        ignored_layers: layers whose output channels are never pruned (at least the classifier).

    Raises:
        NotImplementedError: a group holds a layer whose channels cannot be masked exactly
            (grouped non-depthwise convs, LayerNorm, GroupNorm, PReLU, ...).
    """

    def __init__(
        self, model: nn.Module, example_inputs: torch.Tensor, ignored_layers: Sequence[nn.Module] = ()
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.ignored_layers = list(ignored_layers)
        names = {m: n for n, m in model.named_modules()}
        self._module_names = names
        self._order = {m: i for i, (_, m) in enumerate(model.named_modules())}
        self._gradfn_to_leaf: dict = {}
        was_training = model.training
        model.eval()
        handles = self._register_gradfn_hooks()
        try:
            with torch.enable_grad():
                self.graph = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_inputs, verbose=False
                )
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        found = []
        for group in self.graph.get_all_groups(
            ignored_layers=self.ignored_layers, root_module_types=(nn.modules.conv._ConvNd, nn.Linear)
        ):
            outs = [
                dep.target.module
                for dep, _ in group
                if _handler_kind(dep.handler) in ("conv_out", "dw", "linear_out")
            ]
            found.append((min(self._order[m] for m in outs), group))
        found.sort(key=lambda t: t[0])
        self.groups: list[ChannelGroup] = []
        for i, (_, group) in enumerate(found):
            root = group[0].dep.target.module
            g = ChannelGroup(i, root, names[root], 0, [])
            self._set_layout(g, group)
            self.groups.append(g)

    # ------------------------------------------------------------------ layout
    def _register_gradfn_hooks(self) -> list:
        """Map the autograd node of every weight-free leaf module's output to the module.

        Torch-Pruning's graph shows pools and activations as anonymous element-wise nodes; this
        mapping tells the cost model which of them are counted layers (pools).
        """
        registered = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)

        def hook(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                if inputs and out is inputs[0]:
                    return  # identity (eval-mode dropout): keep the producer's mapping
                self._gradfn_to_leaf[out.grad_fn] = m

        return [
            m.register_forward_hook(hook)
            for m in self.model.modules()
            if not list(m.children()) and not isinstance(m, registered)
        ]

    def refresh(self) -> None:
        """Derive every group's layout again from Torch-Pruning's dependency graph.

        :meth:`prune` keeps the layouts current by itself; this asks the graph afresh (one
        ``get_pruning_group`` per group), e.g. to check that bookkeeping. The ranking is cleared.
        """
        for g in self.groups:
            pruner = self.graph.get_pruner_of_module(g.root)
            width = pruner.get_out_channels(g.root)
            self._set_layout(g, self.graph.get_pruning_group(g.root, pruner.prune_out_channels, list(range(width))))

    def _set_layout(self, g: ChannelGroup, group: tp.Group) -> None:
        """Fill ``g`` from a Torch-Pruning group that holds all of its root's output channels."""
        g.width = int(self.graph.get_pruner_of_module(g.root).get_out_channels(g.root))
        g.shape_terms, g.surgery, layers = [], [], []
        for item in group:
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            kind = _handler_kind(dep.handler)
            pos = np.asarray(idxs, dtype=np.int64)
            chans = np.asarray(item.root_idxs, dtype=np.int64)
            if kind is None:
                if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
                    raise NotImplementedError(
                        f"group of {g.root_name!r} holds {type(module).__name__} "
                        f"({self._module_names.get(module)}), which cannot be pruned by masking"
                    )
                leaf = self._gradfn_to_leaf.get(dep.target.grad_fn)
                if leaf is not None:
                    per = self._per_channel(len(pos), g.width, g.root_name)
                    g.shape_terms.append((leaf, "elem", per))
                # Torch-Pruning's placeholder ops keep state (concat sizes, slice bounds): prune them too
                g.surgery.append((dep.handler, module, pos, chans))
                continue
            per = self._per_channel(len(pos), g.width, g.root_name)
            if kind in ("conv_out", "conv_in") and module.groups != 1:
                raise NotImplementedError(f"grouped conv {self._module_names[module]!r} is not supported")
            g.shape_terms.append((module, {"dw": "dw", "conv_in": "in", "linear_in": "in"}.get(kind, "out"), per))
            g.surgery.append((dep.handler, module, pos, chans))
            if kind in ("conv_out", "linear_out", "dw"):
                layers.append(self._module_names[module])
        g.layers = sorted(layers, key=lambda n: self._order[self.model.get_submodule(n)])
        self._set_slices(g)

    @staticmethod
    def _set_slices(g: ChannelGroup) -> None:
        """The parameter slices of ``g``'s real layers, read off its surgery plan; clears the ranking."""
        g.slices = []
        for handler, module, pos, chans in g.surgery:
            kind = _handler_kind(handler)
            if kind is None:
                continue  # a placeholder op: no parameters
            pos_t, chans_t = torch.from_numpy(pos), torch.from_numpy(chans)
            if kind in ("conv_in", "linear_in"):  # consumer in-channels
                g.slices.append(_Slice(module, "weight", 1, pos_t, chans_t))
            else:  # producer out-channels, depthwise convs, batch norms
                for name in ("weight", "bias"):
                    if getattr(module, name, None) is not None:
                        g.slices.append(_Slice(module, name, 0, pos_t, chans_t))
        g.order = None

    @staticmethod
    def _per_channel(count: int, width: int, name: str) -> int:
        if count % width:
            raise NotImplementedError(
                f"group of {name!r}: {count} positions do not split evenly over {width}"
            )
        return count // width

    @property
    def widths(self) -> np.ndarray:
        """Current number of channels of every group, shape ``(G,)``."""
        return np.array([g.width for g in self.groups], dtype=np.int64)

    @property
    def layer_counts(self) -> np.ndarray:
        """Number of conv/linear layers whose output channels each group holds, shape ``(G,)``."""
        return np.array([len(g.layers) for g in self.groups], dtype=np.int64)

    # -------------------------------------------------------------- importance
    def importance(
        self,
        criterion: str,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
    ) -> list[torch.Tensor]:
        """Per-channel importance of every group (higher = more important), on the CPU.

        ``taylor``: ``sum |w * dL/dw|`` over every parameter slice of the channel, L = mean
        cross-entropy on ``(x, y)`` (normalised inputs). The model runs in **eval** mode, so batch
        norm statistics and dropout are untouched; gradients are cleared afterwards.
        ``l1``: ``sum |w|``; ``l2``: ``sqrt(sum w^2)`` over the same slices; ``random``: uniform
        scores from ``generator``.
        """
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
        if criterion == "random":
            return [torch.rand(g.width, generator=generator, dtype=torch.float64) for g in self.groups]
        if criterion == "taylor":
            if x is None or y is None:
                raise ValueError("the taylor criterion needs a calibration batch (x, y)")
            self._taylor_backward(x, y, batch_size)
        scores = []
        try:
            for g in self.groups:
                imp = torch.zeros(g.width, dtype=torch.float64)
                for s in g.slices:
                    p = s.param
                    w = p.detach()
                    if criterion == "taylor":
                        grad = p.grad
                        val = (w * grad).abs() if grad is not None else torch.zeros_like(w)
                    elif criterion == "l1":
                        val = w.abs()
                    else:
                        val = w * w
                    dims = [d for d in range(val.dim()) if d != s.dim]
                    per_pos = val.sum(dim=dims) if dims else val
                    per_pos = per_pos.double().cpu()[s.positions]
                    imp.index_add_(0, s.channels, per_pos)
                if criterion == "l2":
                    imp = imp.sqrt()
                scores.append(imp)
        finally:
            if criterion == "taylor":
                for p in self.model.parameters():
                    p.grad = None
        return scores

    def _taylor_backward(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        was_training = self.model.training
        self.model.eval()
        for p in self.model.parameters():
            p.grad = None
        n = len(y)
        try:
            with torch.enable_grad():
                for start in range(0, n, batch_size):
                    xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                    loss = F.cross_entropy(self.model(xb), yb, reduction="sum") / n
                    loss.backward()
        finally:
            self.model.train(was_training)

    def set_ranking(self, scores: Sequence[torch.Tensor]) -> None:
        """Fix, for this stage, the order in which each group gives up channels (least important first)."""
        if len(scores) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} score vectors, got {len(scores)}")
        for g, imp in zip(self.groups, scores, strict=True):
            if imp.shape != (g.width,):
                raise ValueError(f"group {g.index}: expected {g.width} scores, got {tuple(imp.shape)}")
            order = torch.sort(imp.double().cpu(), stable=True).indices
            g.order = order
            rank = torch.empty_like(order)
            rank[order] = torch.arange(g.width)
            for s in g.slices:
                r = rank[s.channels]
                sort = torch.sort(r, stable=True).indices
                s.ranked = s.positions[sort].to(s.param.device)
                counts = torch.bincount(r, minlength=g.width).numpy()
                s.cum = np.concatenate([[0], np.cumsum(counts)])

    def removal_indices(self, counts: Sequence[int]) -> list[np.ndarray]:
        """Channel indices (within each group) that ``counts`` removes: the least important ones."""
        self._check_counts(counts)
        return [g.order[: int(n)].numpy().copy() for g, n in zip(self.groups, counts, strict=True)]

    def _check_counts(self, counts: Sequence[int]) -> None:
        if any(g.order is None for g in self.groups):
            raise RuntimeError("call set_ranking() before masking or pruning (again after each prune)")
        if len(counts) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} counts, got {len(counts)}")
        for g, n in zip(self.groups, counts, strict=True):
            if not 0 <= int(n) < g.width:
                raise ValueError(f"group {g.index} ({g.root_name}) has {g.width} channels, cannot remove {n}")

    # ------------------------------------------------------- masked evaluation
    @contextlib.contextmanager
    def masked(self, counts: Sequence[int]) -> Iterator[None]:
        """Zero, in place, every parameter slice that removing ``counts`` channels would delete.

        On exit the zeroed values are written back, so the parameters are bit-identical to before.
        BatchNorm running statistics are not touched (a zeroed affine map already outputs 0).
        """
        self._check_counts(counts)
        saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for g, n in zip(self.groups, counts, strict=True):
                    n = int(n)
                    if n == 0:
                        continue
                    for s in g.slices:
                        pos = s.ranked[: int(s.cum[n])]
                        data = s.param.data
                        saved.append((data, s.dim, pos, data.index_select(s.dim, pos)))
                        data.index_fill_(s.dim, pos, 0.0)
            yield
        finally:
            with torch.no_grad():
                for data, dim, pos, old in reversed(saved):
                    data.index_copy_(dim, pos, old)

    # ----------------------------------------------------------------- surgery
    def prune(self, counts: Sequence[int]) -> list[np.ndarray]:
        """Remove the ``counts`` least important channels of every group for real.

        All removals are expressed in the pre-surgery index space of every layer and applied with
        one Torch-Pruning pruning-function call per (layer, function), so groups that share a layer
        (e.g. the slices of a batch norm behind a concatenation) cannot shift each other's indices.
        The group layouts then move along by index bookkeeping: a kept position ``p`` of a layer
        becomes ``p`` minus the number of removed positions below it, exactly what the pruning
        functions do to the tensors, so the dependency graph is not queried again
        (:meth:`refresh` would give the same layouts; a test checks it).

        Returns:
            The removed channel indices of every group (in the group's index space before pruning).
        """
        removed, drops, plan = self._surgery_plan(counts)
        cut: dict[tuple[int, Callable], np.ndarray] = {}
        for key, (handler, module, positions) in plan.items():
            cut[key] = positions
            handler(module, positions.tolist())
        for g, drop in zip(self.groups, drops, strict=True):
            self._compact(g, drop, cut)
        return removed

    def pruned_copy(self, counts: Sequence[int]) -> nn.Module:
        """A deep copy of the model with the ``counts`` least important channels of every group removed
        for real (the same surgery as :meth:`prune`); the model and this pruner are left as they are."""
        _, _, plan = self._surgery_plan(counts)
        memo: dict[int, Any] = {}
        model = copy.deepcopy(self.model, memo)
        for handler, module, positions in plan.values():
            twin = memo.get(id(module))
            if twin is not None:  # Torch-Pruning's graph-only ops (concat, add, ...) are not in the model
                handler(twin, positions.tolist())
        return model

    def _surgery_plan(
        self, counts: Sequence[int]
    ) -> tuple[list[np.ndarray], list[np.ndarray], dict[tuple[int, Callable], tuple[Callable, nn.Module, np.ndarray]]]:
        """Removed channels per group, their boolean masks, and per (layer, pruning function) the sorted
        positions to cut in the layer's pre-surgery index space."""
        removed = self.removal_indices(counts)
        drops = []
        parts: dict[tuple[int, Callable], tuple[Callable, nn.Module, list[np.ndarray]]] = {}
        for g, idxs in zip(self.groups, removed, strict=True):
            drop = np.zeros(g.width, dtype=bool)
            drop[idxs] = True
            drops.append(drop)
            if len(idxs) == 0:
                continue
            for handler, module, pos, chans in g.surgery:
                key = (id(module), handler)
                parts.setdefault(key, (handler, module, []))[2].append(pos[drop[chans]])
        plan = {key: (h, m, np.unique(np.concatenate(ps))) for key, (h, m, ps) in parts.items()}
        return removed, drops, plan

    @staticmethod
    def _compact(g: ChannelGroup, drop: np.ndarray, cut: dict[tuple[int, Callable], np.ndarray]) -> None:
        """Move ``g``'s layout past a surgery: forget the channels in ``drop``, renumber the rest.

        ``cut`` holds, per (layer, pruning function), the sorted positions all groups removed there.
        """
        keep = ~drop
        renumber = np.cumsum(keep) - 1  # old channel -> new channel, for the kept ones
        surgery = []
        for handler, module, pos, chans in g.surgery:
            kept = keep[chans]
            pos, chans = pos[kept], renumber[chans[kept]]
            removed_here = cut.get((id(module), handler))
            if removed_here is not None:
                pos = pos - np.searchsorted(removed_here, pos)
            surgery.append((handler, module, pos, chans))
        g.surgery = surgery
        g.width = int(keep.sum())
        GroupPruner._set_slices(g)

    # -------------------------------------------------------------- cost model
    def cost_model(
        self, input_size: Sequence[int], macs: int | None = None, params: int | None = None
    ) -> CostModel:
        """Closed-form MACs/params of the current model as a function of the group widths.

        Args:
            input_size: counter input, e.g. ``(1, 3, 32, 32)``.
            macs, params: the counter's figures for the current model (counted here when None).
        """
        if macs is None or params is None:
            macs, params = count_macs_params(self.model, input_size)
        shapes: dict[nn.Module, tuple[torch.Size, torch.Size]] = {}
        touched = {m for g in self.groups for (m, _, _) in g.shape_terms}

        def hook(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
            if m in touched:
                shapes[m] = (i[0].shape, o.shape)

        handles = [m.register_forward_hook(hook) for m in touched]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(torch.zeros(tuple(input_size), device=device))
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        coef_in: dict[nn.Module, dict[int, int]] = {m: {} for m in touched}
        coef_out: dict[nn.Module, dict[int, int]] = {m: {} for m in touched}
        for g in self.groups:
            for m, kind, per in g.shape_terms:
                if kind in ("out", "dw", "elem"):
                    coef_out[m][g.index] = coef_out[m].get(g.index, 0) + per
                if kind == "in":
                    coef_in[m][g.index] = coef_in[m].get(g.index, 0) + per
        terms = []
        for m in sorted(touched, key=lambda m: self._order.get(m, -1)):
            if m not in shapes:
                continue  # not run on this input
            ishape, oshape = shapes[m]
            terms.append(self._term(m, ishape, oshape, coef_in[m], coef_out[m]))
        return CostModel(macs, params, self.widths, terms)

    @staticmethod
    def _term(m: nn.Module, ishape: torch.Size, oshape: torch.Size, cin: dict, cout: dict) -> tuple:
        if isinstance(m, nn.modules.conv._ConvNd):
            k = int(np.prod(m.kernel_size))
            positions = int(np.prod(oshape[2:])) * oshape[0]
            bias = 1 if m.bias is not None else 0
            if m.groups == 1:
                return (k * positions, k, bias, m.in_channels, cin, m.out_channels, cout)
            # depthwise: in/groups stays 1 whatever the width
            return (k * positions, k, bias, 1, {}, m.out_channels, cout)
        if isinstance(m, nn.Linear):
            tokens = int(np.prod(oshape[:-1]))
            bias = 1 if m.bias is not None else 0
            return (tokens, 1, bias, m.in_features, cin, m.out_features, cout)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            per_ch = int(np.prod(oshape)) // oshape[1]
            ops = _BN_OPS_AFFINE if m.affine else _BN_OPS_PLAIN
            return (ops * per_ch, 0, 2 if m.affine else 0, 1, {}, m.num_features, cout)
        # weight-free layer (pool): the counter's cost per channel
        return (_pool_ops(m, ishape, oshape) / oshape[1], 0, 0, 1, {}, oshape[1], cout)
