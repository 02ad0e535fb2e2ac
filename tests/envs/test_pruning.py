"""GroupPruner: coupling groups, masked scoring == real surgery, closed-form costs == counter."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from keepgym.envs.metrics import count_macs_params
from keepgym.envs.pruning import GroupPruner
from keepgym.models import create_model, get_classifier

PAPER_MODELS = ["vgg19", "resnet56", "googlenet", "mobilenetv3_large", "densenet121"]
INPUT = (1, 3, 32, 32)


def _tiny(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, width_mult=0.125).eval()
    # non-trivial batch-norm statistics and affine maps, so masking is a real test
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _pruner(model: nn.Module) -> GroupPruner:
    return GroupPruner(model, torch.zeros(INPUT), ignored_layers=[get_classifier(model)])


def _random_counts(widths: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([rng.integers(0, w) for w in widths], dtype=np.int64)  # each < width


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_masked_logits_equal_physically_pruned_logits(name):
    model = _tiny(name)
    pruner = _pruner(model)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    scores = pruner.importance("taylor", x, y)
    pruner.set_ranking(scores)
    widths = pruner.widths
    counts = _random_counts(widths, seed=1)
    cost = pruner.cost_model(INPUT)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad(), pruner.masked(counts):
        masked = model(x)
    for k, v in model.state_dict().items():  # restored bit for bit
        assert torch.equal(v, before[k]), k

    physical = copy.deepcopy(model)
    other = _pruner(physical)
    other.set_ranking(scores)
    other.prune(counts)
    with torch.no_grad():
        pruned = physical(x)
    assert (masked - pruned).abs().max().item() < 1e-4
    assert np.array_equal(other.widths, widths - counts)
    # closed-form MACs/params of the candidate == the project's counter on the pruned model
    assert cost(widths - counts) == count_macs_params(physical, INPUT)
    macs0, params0 = count_macs_params(model, INPUT)
    assert cost(widths) == (macs0, params0)


def test_groups_follow_the_architecture():
    resnet = _pruner(_tiny("resnet56"))
    # 27 blocks each own their conv1 channels; 3 residual groups (one per stage) hold the stem or
    # projection conv plus nine conv2 each -- RL-Pruner's 3 clusters of 10 layers.
    counts = sorted(resnet.layer_counts.tolist())
    assert counts == [1] * 27 + [10, 10, 10]
    vgg = _pruner(_tiny("vgg19"))
    assert vgg.layer_counts.tolist() == [1] * 18  # 16 convs + 2 hidden FC layers, classifier excluded
    mobilenet = _pruner(_tiny("mobilenetv3_large"))
    # depthwise convs are never groups of their own: they follow their producer
    names = [n for g in mobilenet.groups for n in g.layers]
    assert any(n.endswith("conv2") and n.startswith("bneck") for n in names)
    assert all(len(g.layers) >= 1 for g in mobilenet.groups)
    classifier = get_classifier(vgg.model)
    assert all(g.root is not classifier for g in vgg.groups)


def test_taylor_importance_leaves_bn_buffers_and_grads_alone():
    model = _tiny("resnet20")
    pruner = _pruner(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # the pruner must switch to eval mode itself
    scores = pruner.importance("taylor", torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert [s.shape[0] for s in scores] == pruner.widths.tolist()
    assert all(bool((s >= 0).all()) for s in scores)
    assert any(float(s.sum()) > 0 for s in scores)


@pytest.mark.parametrize("criterion", ["l1", "l2", "random"])
def test_data_free_criteria(criterion):
    pruner = _pruner(_tiny("vgg11"))
    gen = torch.Generator().manual_seed(0)
    scores = pruner.importance(criterion, generator=gen)
    assert [s.shape[0] for s in scores] == pruner.widths.tolist()
    pruner.set_ranking(scores)
    removed = pruner.removal_indices(np.ones(len(scores), dtype=np.int64))
    for s, r in zip(scores, removed, strict=True):
        assert s[r[0]] == s.min()  # the least important channel goes first


def test_l1_ranks_a_zeroed_filter_first():
    model = _tiny("vgg11")
    pruner = _pruner(model)
    conv = pruner.groups[0].root
    with torch.no_grad():
        conv.weight[3].zero_()
        conv.bias[3] = 0.0
    scores = pruner.importance("l1")
    pruner.set_ranking(scores)
    assert pruner.removal_indices([1] + [0] * (len(scores) - 1))[0].tolist() == [3]


def test_bad_requests_raise():
    pruner = _pruner(_tiny("vgg11"))
    with pytest.raises(ValueError, match="criterion"):
        pruner.importance("variance")
    with pytest.raises(RuntimeError, match="set_ranking"):
        with pruner.masked(np.zeros(len(pruner.groups), dtype=np.int64)):
            pass
    pruner.set_ranking(pruner.importance("l1"))
    too_many = pruner.widths.copy()  # removing every channel of a group is refused
    with pytest.raises(ValueError, match="cannot remove"):
        pruner.prune(too_many)


def test_unsupported_grouped_conv_is_reported():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with pytest.raises(NotImplementedError, match="grouped conv"):
        GroupPruner(model, torch.zeros(INPUT), ignored_layers=[model[-1]])


@pytest.mark.parametrize("name", ["googlenet", "densenet121", "mobilenetv3_large"])
def test_batched_surgery_matches_torch_pruning_group_by_group(name):
    """Two stages of our one-call-per-layer surgery == Torch-Pruning's own Group.prune, in sequence."""
    import torch_pruning as tp

    model = _tiny(name)
    reference = copy.deepcopy(model)
    pruner = _pruner(model)
    ref_graph = tp.DependencyGraph().build_dependency(
        reference, example_inputs=torch.zeros(INPUT), verbose=False
    )
    ref_modules = dict(reference.named_modules())
    x = torch.randn(4, 3, 32, 32)
    for stage in range(2):
        pruner.set_ranking(pruner.importance("l1"))
        counts = _random_counts(pruner.widths, seed=stage) // 2
        cost = pruner.cost_model(INPUT)
        with torch.no_grad(), pruner.masked(counts):
            masked = model(x)
        roots = [g.root_name for g in pruner.groups]
        removed = pruner.prune(counts)
        for root_name, idxs in zip(roots, removed, strict=True):
            if len(idxs):
                root = ref_modules[root_name]
                fn = ref_graph.get_pruner_of_module(root).prune_out_channels
                ref_graph.get_pruning_group(root, fn, idxs.tolist()).prune()
        ours, theirs = model.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), (stage, k)
        with torch.no_grad():
            assert (model(x) - masked).abs().max().item() < 1e-4
        assert cost(pruner.widths) == count_macs_params(model, INPUT)


def _layout(pruner: GroupPruner, placeholders: bool = True) -> list:
    """Every group's width, layers, surgery plan, parameter slices and cost terms, layers by name.

    Torch-Pruning's placeholder ops (concat, split, add, ...) belong to one graph and are not in the
    model: they are identified by object, or left out with ``placeholders=False`` (to compare graphs).
    """
    names = {m: n for n, m in pruner.model.named_modules()}
    return [
        (
            g.root_name,
            g.width,
            g.layers,
            [
                (h, names.get(m, id(m)), p.tolist(), c.tolist())
                for h, m, p, c in g.surgery
                if placeholders or m in names
            ],
            [(names[s.module], s.name, s.dim, s.positions.tolist(), s.channels.tolist()) for s in g.slices],
            [(names[m], kind, per) for m, kind, per in g.shape_terms],
        )
        for g in pruner.groups
    ]


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_surgery_bookkeeping_equals_torch_pruning_layout(name, monkeypatch):
    """prune() renumbers the group layouts itself, without asking the dependency graph again.

    Asking it (one ``get_pruning_group`` per group, each re-deriving every concat/reshape index
    mapping of the model) is what made surgery slow on DenseNet; the old fix patched Torch-Pruning
    globally. The renumbered layouts must equal what the graph gives when asked afresh, after every
    stage, and what a graph traced from the pruned model gives.
    """
    model = _tiny(name)
    pruner = _pruner(model)

    def no_query(*args, **kwargs):
        raise AssertionError("prune() queried the dependency graph")

    for stage in range(3):
        pruner.set_ranking(pruner.importance("random", generator=torch.Generator().manual_seed(stage)))
        counts = _random_counts(pruner.widths, seed=10 + stage) // 2
        assert counts.sum() > 0
        with monkeypatch.context() as patch:
            patch.setattr(pruner.graph, "get_pruning_group", no_query)
            pruner.prune(counts)
        kept = _layout(pruner)
        assert all(g.order is None for g in pruner.groups)  # a new ranking is needed
        pruner.refresh()  # the same graph, asked again (its placeholder ops were pruned along)
        assert _layout(pruner) == kept, stage
    fresh = _pruner(copy.deepcopy(model))
    assert _layout(fresh, placeholders=False) == _layout(pruner, placeholders=False)
