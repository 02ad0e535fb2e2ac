"""PruneEnv: Gymnasium/SB3 checkers, one stage per paper model, determinism, bit-identical evaluate."""

from __future__ import annotations

import copy
import os
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

from keepgym.envs.data import load_dataset
from keepgym.envs.evaluators import CountingEvaluator, Evaluator, SerialEvaluator, make_evaluator
from keepgym.envs.metrics import count_macs_params
from keepgym.envs.prune_env import (
    PruneEnv,
    WallTimes,
    _waterfill,
    default_checkpoint_path,
    profile_evaluate,
)
from keepgym.models import create_model, load_model

PAPER_MODELS = ["vgg19", "resnet56", "googlenet", "mobilenetv3_large", "densenet121"]
ALL_IDS = [
    "RLPrune-VGG19-v0",
    "RLPrune-ResNet56-v0",
    "RLPrune-GoogLeNet-v0",
    "RLPrune-MobileNetV3-v0",
    "RLPrune-DenseNet121-v0",
    "RLPrune-Digits-v0",
]
TINY = {"width_mult": 0.125, "dataset": "synthetic", "pretrained": False, "calibration_size": 16}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", train_size=240, test_size=10, val_size=40)


def _env(data, model_name="vgg11", **kw) -> PruneEnv:
    args = dict(TINY, model_name=model_name, data=data)
    args.update(kw)
    return PruneEnv(**args)


def _state(env: PruneEnv) -> dict:
    return {k: v.clone() for k, v in env.model.state_dict().items()}


# ----------------------------------------------------------------------------- checkers
@pytest.mark.parametrize("env_id", ALL_IDS)
def test_gymnasium_and_sb3_checkers_on_every_id(env_id):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    import keepgym  # noqa: F401  (registers the ids)

    # l1 importance keeps the checkers quick; the Taylor path is exercised by the other tests
    env = gym.make(
        env_id, **TINY, train_size=200, val_size=20, target_sparsity=0.2, stage_sparsity=0.1, criterion="l1"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped, warn=False)
    obs, _ = env.reset(seed=0)
    obs, _, _, truncated, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs) and not truncated
    assert info["macs"] < env.unwrapped.macs0
    env.close()


# ----------------------------------------------------------------------------- one stage
@pytest.mark.parametrize("name", PAPER_MODELS)
def test_one_stage_on_each_paper_model(data, name):
    env = _env(data, name)
    obs, info0 = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    action = env.np_random.random(env.num_groups).astype(np.float32)
    counts = env.allocate(action)
    widths_before = env.group_widths.copy()
    obs, reward, terminated, truncated, info = env.step(action)
    assert env.observation_space.contains(obs)
    assert obs.shape == (env.num_groups + 4,) and obs.dtype == np.float32
    # removed channels per group == allocation, total == M
    assert np.array_equal(widths_before - env.group_widths, counts)
    assert counts.sum() == env.stage_size and info["removed"] == counts.tolist()
    # MACs and params strictly drop; closed form == counter
    assert info["macs"] < info0["macs"] and info["params"] < info0["params"]
    assert (info["closed_form_macs"], info["closed_form_params"]) == count_macs_params(
        env.model, env.input_size
    )
    assert (info["macs"], info["params"]) == count_macs_params(env.model, env.input_size)
    assert 0 < info["macs_ratio"] < 1 and 0 < info["params_ratio"] < 1
    assert info["sparsity"] == pytest.approx(env.stage_size / env.n0)
    assert info["widths"] == env.group_widths.tolist() and info["stage"] == 1
    assert isinstance(info["wall_times"], WallTimes)
    assert reward == pytest.approx(info["accuracy"])
    with torch.no_grad():  # the pruned model still runs
        out = env.model(torch.randn(2, *env.input_size[1:]))
    assert out.shape == (2, data.num_classes) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("scoring", ["vanilla", "adaptive_bn"])
def test_evaluate_leaves_env_bit_identical_and_matches_step(data, scoring):
    env = _env(data, "resnet20", alpha=0.3, beta=0.2, candidate_scoring=scoring, bn_calibration_size=48)
    env.reset(seed=3)
    env.step(np.ones(env.num_groups))  # start from a pruned state
    obs = env._obs()
    state = _state(env)
    rng_state = env.np_random.bit_generator.state
    widths = env.group_widths.copy()
    action = env.np_random.random(env.num_groups)
    rng_state = env.np_random.bit_generator.state
    reward, info = env.evaluate(action)
    for k, v in env.model.state_dict().items():  # weights and BN buffers
        assert torch.equal(v, state[k]), k
    assert np.array_equal(env._obs(), obs)
    assert env.np_random.bit_generator.state == rng_state
    assert np.array_equal(env.group_widths, widths) and env.stage == 1
    assert all(p.grad is None for p in env.model.parameters())
    assert not any(m.training for m in env.model.modules())
    if scoring == "adaptive_bn":  # committing does not re-estimate statistics: compare with vanilla scoring
        env.candidate_scoring = "vanilla"
        reward, info = env.evaluate(action)
    # committing the same action gives the same reward and figures (no fine-tuning)
    _, step_reward, _, _, step_info = env.step(action)
    assert step_reward == pytest.approx(reward, abs=1e-12)
    for key in ("accuracy", "macs", "params", "widths", "sparsity"):
        assert step_info[key] == info[key], key


class _CountingEvaluator(Evaluator):
    """Scores serially through the env's public API and records what it was given."""

    def __init__(self) -> None:
        self.calls: list[list[list[int]]] = []
        self.closed = 0

    def evaluate_many(self, env, counts, images=None):
        self.calls.append([c.tolist() for c in counts])
        return [env.evaluate_allocation(c) for c in counts]

    def close(self) -> None:
        self.closed += 1


def test_evaluate_many_and_evaluators(data):
    env = _env(data, "vgg11")
    assert isinstance(env.evaluator, SerialEvaluator)  # the default
    env.reset(seed=0)
    actions = [env.np_random.random(env.num_groups) for _ in range(3)]
    serial = env.evaluate_many(actions)
    assert [r for r, _ in serial] == [env.evaluate(a)[0] for a in actions]
    assert env.evaluate_many([]) == []
    # an injected evaluator gets the allocated counts and gives the same rewards; env.close() closes it
    counting = _CountingEvaluator()
    env.evaluator = counting
    assert [r for r, _ in env.evaluate_many(actions)] == [r for r, _ in serial]
    assert counting.calls == [[env.allocate(a).tolist() for a in actions]]
    # one bad action: ValueError before the evaluator sees anything
    with pytest.raises(ValueError, match="NaN"):
        env.evaluate_many([actions[0], np.full(env.num_groups, np.nan)])
    assert len(counting.calls) == 1
    with pytest.raises(ValueError, match="counts"):
        env.evaluate_allocation(env.group_widths + 1)
    wrapped = CountingEvaluator(counting)
    env.evaluator = wrapped
    env.evaluate_many(actions[:2])
    assert wrapped.count == 2 and len(counting.calls) == 2
    env.close()
    assert counting.closed == 1
    with pytest.raises(ValueError, match="unknown evaluator 'nope'"):
        make_evaluator("nope")
    with pytest.raises(ValueError, match="workers"):
        make_evaluator("serial", workers=2)
    with pytest.raises(ValueError, match="option"):
        make_evaluator("ray", workers=2, adress="x")


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_actions_identical(data):
    runs = []
    for _ in range(2):
        env = _env(data, "resnet20", criterion="taylor", finetune_steps=2, batch_size=32, stage_sparsity=0.2)
        obs, _ = env.reset(seed=11)
        trace = [obs]
        rng = np.random.default_rng(5)
        for _ in range(2):
            obs, reward, *_ = env.step(rng.random(env.num_groups))
            trace += [obs, reward, env.evaluate(rng.random(env.num_groups))[0]]
        runs.append(trace)
    for a, b in zip(*runs, strict=True):
        assert np.array_equal(a, b)


def test_reset_restores_the_original_model(data):
    env = _env(data, "vgg11", finetune_steps=1, batch_size=16)
    env.reset(seed=0)
    original = _state(env)
    obs0 = env._obs()
    env.step(np.zeros(env.num_groups))
    assert env.model.state_dict().keys() == original.keys()
    assert any(env.model.state_dict()[k].shape != v.shape for k, v in original.items())
    obs, info = env.reset(seed=0)
    for k, v in env.model.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert np.array_equal(obs, obs0) and env.stage == 0 and info["sparsity"] == 0.0


def test_episode_terminates_at_target_sparsity(data):
    env = _env(data, "vgg11", target_sparsity=0.5, stage_sparsity=0.2)
    env.reset(seed=0)
    assert env.num_stages == 3
    terminated, steps = False, 0
    while not terminated:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        steps += 1
        assert not truncated
    assert steps == env.num_stages
    assert env.removed_channels == round(0.5 * env.n0) and info["sparsity"] == pytest.approx(0.5, abs=1e-2)
    assert env.stage_budget == 0
    for call in (env.step, env.evaluate):
        with pytest.raises(RuntimeError, match="reset"):
            call(env.action_space.sample())


# ----------------------------------------------------------------------------- allocation
def test_allocation_rules(data):
    env = _env(data, "vgg11", stage_sparsity=0.3)
    env.reset(seed=0)
    g, m = env.num_groups, env.stage_budget
    cap = env.group_widths - env.min_channels
    uniform = env.allocate(np.zeros(g))
    assert uniform.sum() == m
    free = uniform < cap  # groups that are not capped get equal shares
    assert free.any() and uniform[free].max() - uniform[free].min() <= 1
    assert (uniform[~free] <= uniform[free].max()).all()
    one_hot = np.zeros(g)
    one_hot[0] = 1.0  # group 0 cannot give M channels: the surplus goes to the others
    counts = env.allocate(one_hot)
    assert counts.sum() == m
    assert counts[0] == cap[0] and (counts[1:] <= cap[1:]).all()
    assert np.array_equal(env.allocate(np.r_[-1.0, np.zeros(g - 1)]), uniform)  # negatives clip to 0
    assert env.prunable_mask().all()


def test_waterfill_is_proportional_capped_and_exact():
    assert _waterfill(np.array([0.5, 0.25, 0.25]), 8, np.array([10, 10, 10])).tolist() == [4, 2, 2]
    assert _waterfill(np.array([0.9, 0.1, 0.0]), 8, np.array([2, 10, 10])).tolist() == [2, 6, 0]
    assert _waterfill(np.array([1.0, 0.0, 0.0]), 8, np.array([2, 3, 10])).tolist() == [2, 3, 3]
    assert _waterfill(np.array([1 / 3] * 3), 7, np.array([10] * 3)).sum() == 7
    assert _waterfill(np.array([1.0, 0.0]), 9, np.array([2, 3])).tolist() == [2, 3]  # all that is left


def test_min_channels_and_round_to(data):
    env = _env(data, "vgg11", min_channels=4, round_to=4, target_sparsity=0.5, stage_sparsity=0.25)
    env.reset(seed=0)
    for _ in range(2):
        env.step(env.action_space.sample())
        widths = env.group_widths
        changed = widths != env.initial_group_widths
        assert (widths[changed] % 4 == 0).all() and (widths >= 4).all()


# ----------------------------------------------------------------------------- bad input
def test_bad_actions_raise_and_leave_env_untouched(data):
    env = _env(data, "vgg11")
    env.reset(seed=0)
    state, obs, rng = _state(env), env._obs(), env.np_random.bit_generator.state
    g = env.num_groups
    bad = [
        np.full(g, np.nan),
        np.r_[np.inf, np.ones(g - 1)],
        np.ones(g + 1),
        np.ones((1, g)),
        -np.ones(g),
        "abc",
    ]
    for action in bad:
        for call in (env.step, env.evaluate, env.allocate):
            with pytest.raises(ValueError):
                call(action)
    for k, v in env.model.state_dict().items():
        assert torch.equal(v, state[k])
    assert np.array_equal(env._obs(), obs) and env.np_random.bit_generator.state == rng and env.stage == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_sparsity": 0.0}, "target_sparsity"),
        ({"target_sparsity": 1.0}, "target_sparsity"),
        ({"stage_sparsity": 0.7}, "stage_sparsity"),
        ({"criterion": "variance"}, "criterion"),
        ({"model_name": "alexnet"}, "unknown model"),
        ({"round_to": 0}, "round_to"),
        ({"min_channels": 0}, "min_channels"),
        ({"target_sparsity": 0.6, "min_channels": 200}, "removable"),
    ],
)
def test_bad_arguments_raise(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _env(data, **kwargs)


def test_missing_cifar_checkpoint_prints_the_train_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEPGYM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        PruneEnv(model_name="vgg19", dataset="cifar100")
    path = default_checkpoint_path("vgg19", "cifar100")
    assert f"keepgym train --model vgg19 --dataset cifar100 --download --out {path.parent}" in str(err.value)


# ----------------------------------------------------------------------------- I/O and extras
def test_checkpoint_save_and_digits_baseline_cache(data, tmp_path, monkeypatch):
    monkeypatch.setenv("KEEPGYM_CACHE", str(tmp_path))
    digits = load_dataset("digits", val_size=0.1)
    env = PruneEnv(model_name="vgg11", dataset="digits", data=digits, width_mult=0.125, baseline_epochs=1)
    path = default_checkpoint_path("vgg11", "digits", 0.125)
    assert path.is_file()
    mtime = os.path.getmtime(path)
    again = PruneEnv(model_name="vgg11", dataset="digits", data=digits, width_mult=0.125, baseline_epochs=1)
    assert os.path.getmtime(path) == mtime  # loaded from the cache, not retrained
    for k, v in again.teacher.state_dict().items():
        assert torch.equal(v, env.teacher.state_dict()[k])
    # step, save, reload: the same logits
    env.reset(seed=0)
    env.step(np.zeros(env.num_groups))
    saved = env.save(tmp_path / "pruned.pt")
    loaded = load_model(saved).eval()
    x = torch.randn(3, *env.input_size[1:])
    with torch.no_grad():
        assert torch.allclose(loaded(x), env.model(x), atol=1e-6)
    # an explicit checkpoint is used as given
    from_ckpt = _env(digits, "vgg11", checkpoint=saved, pretrained=True, dataset="digits")
    assert from_ckpt.initial_group_widths.tolist() == env.group_widths.tolist()


def test_injected_model_is_copied_and_checked(data):
    model = create_model("vgg11", num_classes=data.num_classes, width_mult=0.125)
    env = _env(data, model=model)
    assert env.teacher is not model
    with pytest.raises(ValueError, match="classes"):
        _env(data, model=create_model("vgg11", num_classes=3, width_mult=0.125))


def test_importance_snapshot_render_and_profile(data):
    env = _env(data, "resnet20", render_mode="ansi")
    env.reset(seed=0)
    scores = env.stage_importance()
    assert [len(s) for s in scores] == env.group_widths.tolist()
    assert all(np.isclose(s.mean(), 1.0) or not s.any() for s in scores)
    snap = env.snapshot()
    action = env.np_random.random(env.num_groups)
    reward_before = env.evaluate(action)[0]
    obs_before = env._obs()
    env.step(action)
    env.restore(snap)
    assert np.array_equal(env._obs(), obs_before) and env.evaluate(action)[0] == reward_before
    assert "stage 0/" in env.render()
    prof = profile_evaluate(env, action, repeats=1)
    assert set(prof) >= {"importance_s", "surgery_s", "eval_s", "forward_s"}
    assert all(prof[k] >= 0 for k in ("importance_s", "surgery_s", "eval_s", "forward_s"))
    assert env.evaluate(action)[0] == reward_before  # profiling changed nothing


# ----------------------------------------------------------------------------- recovery and state_dict
def _kd_env(data, **kw) -> PruneEnv:
    from keepgym.envs.recovery import KDRecovery

    recovery = KDRecovery(epochs=1, batch_size=32, learning_rate=5e-2, teacher_swap=True, seed=4)
    return _env(data, "resnet20", stage_sparsity=0.2, target_sparsity=0.6, batch_size=32, recovery=recovery, **kw)


def test_step_reports_accuracy_after_recovery_and_before_it(data):
    env = _kd_env(data)
    env.reset(seed=1)
    action = np.linspace(1.0, 2.0, env.num_groups)
    _, candidate = env.evaluate(action)
    obs, reward, _, _, info = env.step(action)
    # the candidate score is the committed model's accuracy before recovery (masked == physical)
    assert info["accuracy_before_recovery"] == pytest.approx(candidate["accuracy"], abs=1.5 / 40)
    assert info["accuracy_before_finetune"] == info["accuracy_before_recovery"]
    # obs, reward and info["accuracy"] all hold the accuracy after recovery, measured on the recovered weights
    assert info["accuracy"] == pytest.approx(float(obs[-1])) and reward == pytest.approx(info["accuracy"])
    record = env.recovery.stage_records[-1]
    assert record["accuracy_before_kd"] == info["accuracy_before_recovery"] and len(record["kd_val_accuracies"]) == 1
    assert record["widths"] == info["widths"]


def test_finetune_steps_is_a_kd_recovery_and_both_at_once_is_refused(data):
    from keepgym.envs.recovery import KDRecovery

    env = _env(data, finetune_steps=3, finetune_lr=2e-3)
    assert isinstance(env.recovery, KDRecovery) and env.recovery.steps == 3 and not env.recovery.teacher_swap
    assert env.recovery.learning_rate == 2e-3
    with pytest.raises(ValueError, match="not both"):
        _env(data, finetune_steps=3, recovery=KDRecovery(epochs=1))
    with pytest.raises(ValueError, match=r"\(finetune_steps\) must be an int >= 0"):
        _env(data, finetune_steps=-1)


def test_reset_gives_the_recovery_the_original_teacher_back(data):
    env = _kd_env(data)
    env.reset(seed=0)
    env.step(np.ones(env.num_groups))
    env.recovery._teacher = copy.deepcopy(env.model)  # force a swapped teacher whatever the tiny model's accuracies did
    env.reset(seed=0)
    assert env.recovery.teacher is env.original_model


def test_state_dict_loads_with_weights_only_and_continues_bit_for_bit(data, tmp_path):
    a = _kd_env(data)
    a.reset(seed=3)
    a.step(np.linspace(0.5, 1.5, a.num_groups))
    # a swapped teacher travels too (rebuilt from its widths)
    teacher = copy.deepcopy(a.model).eval().requires_grad_(False)
    a.recovery._teacher, a.recovery._teacher_widths = teacher, [int(w) for w in a.group_widths]
    torch.save(a.state_dict(), tmp_path / "env.pt")
    state = torch.load(tmp_path / "env.pt", weights_only=True)
    b = _kd_env(data)
    b.reset(seed=99)
    b.load_state_dict(state)
    assert np.array_equal(a.group_widths, b.group_widths) and a.stage == b.stage
    for k, v in a.recovery.teacher.state_dict().items():
        assert torch.equal(v, b.recovery.teacher.state_dict()[k]), k
    action = np.linspace(2.0, 1.0, a.num_groups)
    assert a.evaluate(action) == b.evaluate(action)
    ra, rb = a.step(action), b.step(action)
    assert np.array_equal(ra[0], rb[0]) and ra[1] == rb[1] and ra[4]["widths"] == rb[4]["widths"]
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert a.recovery.stage_records[-1]["kd_val_accuracies"] == b.recovery.stage_records[-1]["kd_val_accuracies"]


def test_snapshot_restore_undoes_a_step_and_its_recovery(data):
    env = _kd_env(data)
    env.reset(seed=2)
    snap = env.snapshot()
    before = (env.stage, len(env.recovery.stage_records), env.recovery.teacher)
    env.step(np.ones(env.num_groups))
    env.restore(snap)
    assert (env.stage, len(env.recovery.stage_records), env.recovery.teacher) == before
