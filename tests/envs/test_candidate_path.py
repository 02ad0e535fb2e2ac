"""Candidate scoring on a physically pruned copy (``candidate_path``): same scores, cheaper when it pays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keepgym.envs.data import load_dataset
from keepgym.envs.prune_env import CandidatePathCosts, PruneEnv
from keepgym.experiments.prune_config import PruneConfig, env_kwargs

try:  # the same tiny models with perturbed batch-norm statistics as the masked == physical tests
    from tests.envs.test_pruning import PAPER_MODELS, _pruner, _random_counts, _tiny
except ImportError:  # pytest's rootdir-relative import when tests/ is not a package on sys.path
    from test_pruning import PAPER_MODELS, _pruner, _random_counts, _tiny


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_pruned_copy_is_what_prune_makes_and_leaves_the_model_alone(name):
    model = _tiny(name)
    pruner = _pruner(model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    pruner.set_ranking(pruner.importance("l1", x, y))
    counts = _random_counts(pruner.widths, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy_ = pruner.pruned_copy(counts)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the original is untouched
    with torch.no_grad():
        with pruner.masked(counts):
            masked = model(x)
        physical = copy_(x)
    pruner.prune(counts)
    real = model.state_dict()
    assert real.keys() == copy_.state_dict().keys()
    for k, v in copy_.state_dict().items():
        assert torch.equal(v, real[k]), k  # the copy is the real surgery's model, tensor for tensor
    torch.testing.assert_close(physical, masked, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", train_size=240, test_size=10, val_size=90)


@pytest.mark.parametrize("name", ["vgg11", "resnet20", "googlenet", "mobilenetv3_small", "densenet121"])
def test_every_path_gives_the_same_scores(data, name):
    kw = dict(model_name=name, data=data, width_mult=0.125, pretrained=False, calibration_size=16, criterion="l1")
    envs = {p: PruneEnv(**kw, stage_sparsity=0.2, candidate_path=p) for p in ("masked", "physical", "auto")}
    results = {}
    for path, env in envs.items():
        env.reset(seed=0)
        g = env.num_groups
        actions = [np.linspace(0.1, 1.0, g), np.ones(g), np.linspace(1.0, 0.1, g)]
        results[path] = env.evaluate_many(actions) + env.evaluate_many(actions[:2], images=slice(0, 30))
    for path in ("physical", "auto"):
        for (r0, i0), (r1, i1) in zip(results["masked"], results[path], strict=True):
            assert r1 == r0 and i1["accuracy"] == i0["accuracy"] and i1["correct"] == i0["correct"]
            assert i1.get("loss", 0.0) == pytest.approx(i0.get("loss", 0.0), rel=1e-5, abs=1e-6)
    assert envs["masked"].path_costs.path_counts == {"masked": 5, "physical": 0}
    assert envs["physical"].path_costs.path_counts == {"masked": 0, "physical": 5}
    auto = envs["auto"].path_costs.path_counts
    assert auto["masked"] >= 1 and auto["physical"] >= 1  # auto measured both


def test_auto_picks_the_cheaper_predicted_path():
    costs = CandidatePathCosts()
    costs.start_stage(7)
    assert costs.choose(0.5, 100) == "masked"  # nothing measured: masked first
    costs.record_masked(1.0, 100)  # 10 ms per image at full width
    assert costs.choose(0.5, 100) == "physical"  # then one physical measurement
    costs.record_physical(0.2, 0.4, 0.5, 100)  # 0.2 s copy + surgery; 8 ms per image per unit of MACs
    assert costs.physical_per_image == pytest.approx(0.008)
    assert costs.choose(0.5, 100) == "physical"  # 0.2 + 0.4 < 1.0
    assert costs.choose(0.99, 100) == "physical"  # 0.2 + 0.79 < 1.0
    assert costs.choose(0.99, 10) == "masked"  # on 10 images the copy does not pay: 0.28 > 0.1
    costs.start_stage(7)
    assert costs.masked_per_image is not None  # same stage: measurements kept
    costs.start_stage(8)
    assert costs.masked_per_image is None and costs.choose(0.5, 100) == "masked"  # new stage: start over


def test_bad_path_is_one_line_error_and_cli_passes_it(data):
    with pytest.raises(ValueError, match="candidate_path"):
        PruneEnv(model_name="vgg11", data=data, pretrained=False, width_mult=0.125, candidate_path="gpu")
    cfg = PruneConfig(model="vgg11", dataset="digits", candidate_path="physical")
    assert env_kwargs(cfg)["candidate_path"] == "physical"
    assert env_kwargs(PruneConfig(model="vgg11", dataset="digits"))["candidate_path"] == "auto"
