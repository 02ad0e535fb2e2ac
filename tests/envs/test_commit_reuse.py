"""A stage's commit does no work the search already did: the committed candidate's score is reused."""

from __future__ import annotations

import numpy as np
import pytest

import keepgym.envs.prune_env as prune_env_module
from keepgym.envs.data import load_dataset
from keepgym.envs.prune_env import PruneEnv

TINY = {"width_mult": 0.125, "dataset": "synthetic", "pretrained": False, "calibration_size": 16, "criterion": "l1"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", train_size=240, test_size=10, val_size=60)


def _counting(monkeypatch) -> list[int]:
    calls = []
    real = prune_env_module.score_images  # the env measures its current model with it

    def counted(model, x, y, batch_size):
        calls.append(len(y))
        return real(model, x, y, batch_size)

    monkeypatch.setattr(prune_env_module, "score_images", counted)
    return calls


@pytest.mark.parametrize("scoring", ["vanilla", "adaptive_bn"])
def test_commit_of_a_scored_candidate_skips_the_evaluation_only_when_exact(data, monkeypatch, scoring):
    env = PruneEnv(**TINY, model_name="vgg11", data=data, stage_sparsity=0.1, candidate_scoring=scoring)
    env.reset(seed=0)
    action = np.linspace(0.2, 1.0, env.num_groups)
    _, cand = env.evaluate(action)
    calls = _counting(monkeypatch)
    _, _, _, _, info = env.step(action)
    if scoring == "vanilla":  # masked == physical: the search's score is the commit's
        assert calls == []
        assert info["accuracy_before_recovery"] == cand["accuracy"] == info["accuracy"]
        env.scoring_order()  # racing's order: the committed candidate's margins, no new pass
        assert calls == []
    else:  # adaptive-BN scores are not what the committed model (old statistics) gets: measured again
        assert calls == [env.num_scoring_images]


def test_unscored_or_partly_scored_candidates_are_evaluated_and_match(data, monkeypatch):
    env = PruneEnv(**TINY, model_name="vgg11", data=data, stage_sparsity=0.1)
    twin = PruneEnv(**TINY, model_name="vgg11", data=data, stage_sparsity=0.1)
    env.reset(seed=0)
    twin.reset(seed=0)
    action = np.linspace(1.0, 0.2, env.num_groups)
    env.evaluate_many([action], images=slice(0, 20))  # a racing slice is not a full-set score
    _, scored = twin.evaluate(action)
    calls = _counting(monkeypatch)
    _, _, _, _, info = env.step(action)
    assert calls == [env.num_scoring_images]
    assert info["accuracy"] == scored["accuracy"]  # physically pruned == masked, here exactly
    # the next stage starts with an empty cache: a stale score of the same counts is never reused
    assert env._scored == {}
