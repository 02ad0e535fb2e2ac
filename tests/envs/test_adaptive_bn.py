"""Adaptive-BN candidate scoring (EagleEye): masked == physically pruned, statistics restored bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from keepgym.envs.data import load_dataset
from keepgym.envs.prune_env import PruneEnv, adaptive_bn

try:  # the same tiny models with perturbed batch-norm statistics as the masked == physical tests
    from tests.envs.test_pruning import PAPER_MODELS, _pruner, _tiny
except ImportError:  # pytest's rootdir-relative import when tests/ is not a package on sys.path
    from test_pruning import PAPER_MODELS, _pruner, _tiny


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_adaptive_bn_masked_equals_adaptive_bn_physical(name):
    model = _tiny(name)
    pruner = _pruner(model)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    bn_x = torch.randn(20, 3, 32, 32)
    scores = pruner.importance("taylor", x, y)
    pruner.set_ranking(scores)
    counts = np.array([w // 2 for w in pruner.widths], dtype=np.int64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    with torch.no_grad():
        vanilla = model(x)
        with pruner.masked(counts), adaptive_bn(model, bn_x, batch_size=8):
            assert not any(m.training for m in model.modules())
            masked = model(x)
    for k, v in model.state_dict().items():  # weights, running stats and num_batches_tracked restored
        assert torch.equal(v, before[k]), k
    assert [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == momenta
    assert not model.training

    physical = copy.deepcopy(model)
    other = _pruner(physical)
    other.set_ranking(scores)
    other.prune(counts)
    with torch.no_grad(), adaptive_bn(physical, bn_x, batch_size=8):
        pruned = physical(x)
    assert (masked - pruned).abs().max().item() < 1e-4
    assert (masked - vanilla).abs().max().item() > 1e-2  # the statistics were really re-estimated


def test_adaptive_bn_restores_training_flags_after_an_error():
    model = _tiny("vgg19").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError), adaptive_bn(model, torch.randn(4, 3, 32, 32)):
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", train_size=240, test_size=10, val_size=40)


def _env(data, **kw) -> PruneEnv:
    args = dict(
        model_name="resnet20",
        dataset="synthetic",
        data=data,
        pretrained=False,
        width_mult=0.125,
        calibration_size=16,
        bn_calibration_size=48,
        batch_size=32,
    )
    args.update(kw)
    return PruneEnv(**args)


def test_env_adaptive_bn_scoring_matches_physical_copy_and_keeps_vanilla_stream(data):
    env = _env(data, candidate_scoring="adaptive_bn")
    env.reset(seed=5)
    bn_x = env.bn_calibration_batch()
    assert bn_x.shape[0] == 48 and env.bn_calibration_batch() is bn_x  # one batch per stage
    action = np.linspace(0.1, 1.0, env.num_groups)
    reward, info = env.evaluate(action)
    # the same candidate, physically pruned and re-estimated on the same images
    physical = copy.deepcopy(env.model)
    pruner = _pruner(physical)
    pruner.set_ranking(env._scores)
    pruner.prune(env.allocate(action))
    with adaptive_bn(physical, bn_x, env.batch_size):
        logits = torch.cat([physical(env._val[0][i : i + 32]) for i in range(0, len(env._val[1]), 32)])
    assert info["accuracy"] == int((logits.argmax(1) == env._val[1]).sum()) / len(env._val[1])
    # vanilla scoring of the same env: no BN batch, and the env's random stream is that of a vanilla env
    env.candidate_scoring = "vanilla"
    assert env.bn_calibration_batch() is None
    vanilla = _env(data)
    vanilla.reset(seed=5)
    assert env.evaluate(action)[0] == vanilla.evaluate(action)[0]
    assert env.np_random.bit_generator.state == vanilla.np_random.bit_generator.state


def test_bad_candidate_scoring_is_refused(data):
    with pytest.raises(ValueError, match="candidate_scoring"):
        _env(data, candidate_scoring="eagle")
    with pytest.raises(ValueError, match="bn_calibration_size"):
        _env(data, bn_calibration_size=0)
