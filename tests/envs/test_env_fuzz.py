"""Hostile actions for PruneEnv and PatchSelectEnv (hypothesis): accepted as documented or ``ValueError``.

Every action is either accepted exactly when it is valid by the documented rules (an independent
oracle below) or rejected with ``ValueError`` -- never TypeError / RuntimeError / IndexError from
deep inside numpy or torch -- and a rejection leaves the env bit for bit as it was: model (and
optimiser) tensors, observation, ``np_random`` state, stage / step counters, the pending batch.
An accepted action is really taken; then ``reset(seed=0)`` must rebuild the snapshot exactly.

Envs are built once per module (tiny: VGG-11 at width 0.125 on 120 synthetic images; a one-block
ViT of width 16 on 16x16 images) and compared against a snapshot taken after ``reset(seed=0)``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keepgym.envs.data import load_dataset
from keepgym.envs.patch_select_env import PatchSelectEnv
from keepgym.envs.prune_env import PruneEnv

FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the default suite stays reproducible; raise max_examples locally to dig
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SPECIAL = [np.nan, np.inf, -np.inf, -1.0, -1e30, 1e30, 1e308, -1e308, 0.0, -0.0, 5e-324, 0.5, 1.0, 2.0]


class _BadArray:
    """An object whose conversion to an array blows up with a RuntimeError."""

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise RuntimeError("no array for you")

    def __repr__(self) -> str:
        return "_BadArray()"


def named_bad_inputs(n: int) -> dict[str, Any]:
    """The hand-written list of hostile actions tried on every env (``n`` = action length)."""
    return {
        "nan": np.full(n, np.nan),
        "inf": np.full(n, np.inf),
        "-inf": np.full(n, -np.inf),
        "one_nan": np.r_[np.nan, np.ones(n - 1)],
        "all_negative": -np.ones(n),
        "some_negative": np.r_[-1.0, np.ones(n - 1)],
        "huge_1e30": np.full(n, 1e30),
        "huge_1e308": np.full(n, 1e308),
        "mixed_huge_tiny": np.r_[1e308, np.full(n - 1, 5e-324)],
        "all_zero": np.zeros(n),
        "too_short": np.ones(n - 1),
        "too_long": np.ones(n + 1),
        "2d_row": np.ones((1, n)),
        "2d_column": np.ones((n, 1)),
        "empty": np.zeros(0),
        "string": "abc",
        "string_array_of_numbers": np.array(["1"] * n),
        "list_of_number_strings": ["1"] * n,
        "object_array": np.array([object()] * n, dtype=object),
        "object_array_of_floats": np.array([1.0] * n, dtype=object),
        "complex_real": np.ones(n, dtype=complex),
        "complex_imag": np.ones(n) * 1j,
        "list_float": [1.0] * n,
        "list_int": [1] * n,
        "list_with_none": [None] * n,
        "ragged_list": [[1, 2], [3]],
        "dict": {"a": 1},
        "array_conversion_raises": _BadArray(),
        "none": None,
        "float_scalar": 1.0,
        "int_scalar": 1,
        "negative_int": -1,
        "huge_int": 10**30,
        "fractional": 2.5,
        "integral_float": 2.0,
        "bool_scalar": True,
        "np_int64": np.int64(2),
        "bool_array": np.ones(n, dtype=bool),
        "float16": np.ones(n, dtype=np.float16),
        "uint8": np.ones(n, dtype=np.uint8),
        "int64_2_62": np.full(n, 2**62, dtype=np.int64),
        "torch_tensor": torch.ones(n),
        "twos": np.full(n, 2),
        "halves": np.full(n, 0.5),
    }


# ----------------------------------------------------------------------------- oracles
def _as_array(action: Any) -> np.ndarray | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(action)
    except Exception:  # noqa: BLE001
        return None


def prune_valid(action: Any, g: int) -> bool:
    """PruneEnv: real (bool/int/float) array of shape (G,), finite, not all negative."""
    a = _as_array(action)
    if a is None or a.dtype.kind not in "biuf" or a.shape != (g,):
        return False
    a = a.astype(np.float64)
    return bool(np.all(np.isfinite(a)) and not np.all(a < 0))


def ratio_valid(action: Any, k: int) -> bool:
    """Discrete keep-ratio index: one int (or integral float) in [0, k); bools are not indices."""
    a = _as_array(action)
    if a is None or a.dtype.kind not in "iuf" or a.size != 1 or a.ndim > 1:
        return False
    v = float(a.reshape(()).item())
    return v.is_integer() and 0 <= v < k


def mask_valid(action: Any, n: int) -> bool:
    """MultiBinary(N) mask: real array of shape (N,), only 0/1 (all zeros keeps the top-scored patch)."""
    a = _as_array(action)
    if a is None or a.dtype.kind not in "biuf" or a.shape != (n,):
        return False
    return bool(np.all((a == 0) | (a == 1)))


# ----------------------------------------------------------------------------- snapshots
def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def prune_state(env: PruneEnv) -> dict:
    return _clone(
        {
            "model": env.model.state_dict(),
            "obs": env._obs(),
            "rng": env.np_random.bit_generator.state,
            "stage": env.stage,
            "removed": env.removed_channels,
            "widths": env.group_widths,
            "accuracy": env.last_accuracy,
            "macs_params": (env.macs, env.params),
            "scores": env._scores,
            "val": env._val,
            "calib": env._calib,
        }
    )


def patch_state(env: PatchSelectEnv) -> dict:
    return _clone(
        {
            "vit": env.vit.state_dict(),
            "optimizer": env._optimizer.state_dict(),
            "obs": env._observation(),
            "rng": env.np_random.bit_generator.state,
            "data_rng": env._loader.generator.get_state(),
            "epoch": env._epoch,
            "step": env._step,
            "loss_ref": env._loss_ref,
            "batch": env._batch,
            "scores": env._scores,
            "events": env.divergence_events,
        }
    )


# ----------------------------------------------------------------------------- envs
@pytest.fixture(scope="module")
def prune_env() -> PruneEnv:
    data = load_dataset("synthetic", train_size=120, test_size=10, val_size=24)
    env = PruneEnv(
        model_name="vgg11",
        dataset="synthetic",
        data=data,
        pretrained=False,
        width_mult=0.125,
        criterion="l1",
        calibration_size=16,
        eval_size=16,
        target_sparsity=0.3,
        stage_sparsity=0.1,
    )
    env.reset(seed=0)
    return env


@pytest.fixture(scope="module")
def vit_data():
    return load_dataset("synthetic", image_size=16, train_size=80, test_size=10, num_classes=4)


def _patch_env(data, action_mode: str) -> PatchSelectEnv:
    env = PatchSelectEnv(
        data=data,
        patch_size=4,
        dim=16,
        depth=1,
        heads=2,
        mlp_dim=32,
        dim_head=8,
        batch_size=16,
        device="cpu",
        warmup_epochs=0,
        augment=False,
        info_timings=False,
        action_mode=action_mode,
    )
    env.reset(seed=0)
    return env


@pytest.fixture(scope="module")
def ratio_env(vit_data) -> PatchSelectEnv:
    return _patch_env(vit_data, "ratio")


@pytest.fixture(scope="module")
def mask_env(vit_data) -> PatchSelectEnv:
    return _patch_env(vit_data, "mask")


# ----------------------------------------------------------------------------- the property
def _try(fn, action: Any) -> tuple[bool, Any]:
    """(accepted, result); a ValueError is a rejection, anything else fails the test."""
    try:
        with warnings.catch_warnings():
            # numpy's ComplexWarning (imaginary part dropped) or an overflow must not be how it "works"
            warnings.simplefilter("error", np.exceptions.ComplexWarning)
            warnings.simplefilter("error", RuntimeWarning)
            return True, fn(action)
    except ValueError:
        return False, None


def check_prune_action(env: PruneEnv, action: Any) -> bool:
    """The property for one action on PruneEnv; returns whether it was accepted."""
    before = prune_state(env)
    valid = prune_valid(action, env.num_groups)
    # evaluate: accepted iff valid, and never changes anything
    accepted, result = _try(env.evaluate, action)
    assert accepted == valid, f"evaluate({action!r}): accepted={accepted}, documented valid={valid}"
    _assert_same(before, prune_state(env), "evaluate")
    if accepted:
        reward, info = result
        assert np.isfinite(reward) and sum(info["removed"]) == env.stage_budget
        assert all(r >= 0 for r in info["removed"])
    # step: same decision; a rejection leaves the env as it was, an acceptance really prunes
    accepted, result = _try(env.step, action)
    assert accepted == valid, f"step({action!r}): accepted={accepted}, documented valid={valid}"
    if accepted:
        obs, reward, _, _, info = result
        assert env.observation_space.contains(obs) and np.isfinite(reward)
        assert env.removed_channels == sum(info["removed"]) > 0
        env.reset(seed=0)
    _assert_same(before, prune_state(env), "step")
    return accepted


def check_patch_action(env: PatchSelectEnv, action: Any) -> bool:
    """The property for one action on PatchSelectEnv; returns whether it was accepted."""
    before = patch_state(env)
    if env.action_mode == "ratio":
        valid = ratio_valid(action, len(env.keep_ratios))
    else:
        valid = mask_valid(action, env.num_patches)
    accepted, result = _try(env.step, action)
    assert accepted == valid, f"step({action!r}): accepted={accepted}, documented valid={valid}"
    if accepted:
        obs, reward, terminated, _, info = result
        assert env.observation_space.contains(obs) and np.isfinite(reward) and not terminated
        assert 1 <= info["kept"] <= env.num_patches and not info["diverged"]
        env.reset(seed=0)
    _assert_same(before, patch_state(env), "step")
    return accepted


# ----------------------------------------------------------------------------- named inputs
@pytest.mark.parametrize("name", list(named_bad_inputs(4)))
def test_named_inputs_prune_env(prune_env, name):
    check_prune_action(prune_env, named_bad_inputs(prune_env.num_groups)[name])


@pytest.mark.parametrize("mode", ["ratio", "mask"])
def test_named_inputs_patch_select_env(ratio_env, mask_env, mode):
    env = ratio_env if mode == "ratio" else mask_env
    accepted = {name: check_patch_action(env, action) for name, action in named_bad_inputs(env.num_patches).items()}
    # the list covers both sides of the line
    assert any(accepted.values()) and not all(accepted.values())


def test_rejected_actions_do_not_disturb_the_next_step(vit_data):
    """Many rejections in a row, then a valid step: bit-identical to a run that never saw them."""
    clean, fuzzed = _patch_env(vit_data, "mask"), _patch_env(vit_data, "mask")
    n = fuzzed.num_patches
    for action in named_bad_inputs(n).values():
        if not mask_valid(action, n):
            with pytest.raises(ValueError):
                fuzzed.step(action)
    keep = np.zeros(n, dtype=np.int8)
    keep[::3] = 1
    for _ in range(2):
        a, b = clean.step(keep), fuzzed.step(keep)
        _assert_same(a[0], b[0])
        assert a[1:] == b[1:]
    _assert_same(patch_state(clean), patch_state(fuzzed))


# ----------------------------------------------------------------------------- random inputs
def _floats() -> st.SearchStrategy:
    return st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True))


def _actions(n: int, small_ints: tuple[int, int]) -> st.SearchStrategy:
    """Arrays of many dtypes and shapes near (n,), python lists, scalars, None, strings, tensors."""
    shapes = st.sampled_from([(n,), (n,), (n,), (n - 1,), (n + 1,), (1, n), (n, 1), (), (0,), (2, 2)])
    lo, hi = small_ints
    arrays = shapes.flatmap(
        lambda shape: st.one_of(
            hnp.arrays(np.float64, shape, elements=_floats()),
            hnp.arrays(np.float32, shape, elements=st.floats(width=32)),
            hnp.arrays(np.float16, shape, elements=st.floats(width=16)),
            hnp.arrays(np.int64, shape, elements=st.integers(lo, hi)),
            hnp.arrays(np.int64, shape),
            hnp.arrays(np.uint8, shape, elements=st.integers(0, 2)),
            hnp.arrays(np.bool_, shape),
            hnp.arrays(
                np.complex128,
                shape,
                elements=st.one_of(st.complex_numbers(max_magnitude=2), st.just(complex(np.nan, 0))),
            ),
            hnp.arrays("U3", shape),
        )
    )
    lengths = st.sampled_from([n - 1, n, n, n + 1])
    lists = lengths.flatmap(
        lambda m: st.one_of(
            st.lists(_floats(), min_size=m, max_size=m),
            st.lists(st.integers(lo, hi), min_size=m, max_size=m),
            st.lists(st.one_of(st.integers(lo, hi), st.none(), st.text(max_size=2)), min_size=m, max_size=m),
            st.lists(st.integers(lo, hi), min_size=m, max_size=m).map(lambda v: np.array(v, dtype=object)),
            st.lists(st.floats(width=32), min_size=m, max_size=m).map(lambda v: torch.tensor(v, dtype=torch.float32)),
        )
    )
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(lo - 3, hi + 3),
        st.integers(),
        _floats(),
        st.text(max_size=3),
        st.complex_numbers(max_magnitude=5),
        st.lists(st.lists(st.integers(0, 1), max_size=3), max_size=3),  # nested, often ragged
        st.sampled_from([np.int64(1), np.float32(2.0), np.uint8(0), np.array([3]), np.array([[1]])]),
    )
    # right shape, mostly valid values, now and then one NaN/inf/negative: the border of the space
    near_valid = st.one_of(
        hnp.arrays(np.float64, (n,), elements=st.floats(0, 1e30)),
        hnp.arrays(np.float64, (n,), elements=st.one_of(st.floats(0, 1), st.floats(0, 1), st.sampled_from(SPECIAL))),
        hnp.arrays(np.float32, (n,), elements=st.one_of(st.integers(lo, hi).map(float), st.just(np.nan))),
        hnp.arrays(st.sampled_from([np.int64, np.uint8, np.int8]), (n,), elements=st.integers(max(lo, 0), hi)),
    )
    return st.one_of(near_valid, arrays, lists, scalars)


@FUZZ
@given(data=st.data())
def test_prune_env_random_actions(prune_env, data):
    accepted = check_prune_action(prune_env, data.draw(_actions(prune_env.num_groups, (-2, 3)), label="action"))
    event("accepted" if accepted else "rejected")


@FUZZ
@given(data=st.data())
def test_patch_select_ratio_random_actions(ratio_env, data):
    accepted = check_patch_action(ratio_env, data.draw(_actions(ratio_env.num_patches, (-1, 6)), label="action"))
    event("accepted" if accepted else "rejected")


@FUZZ
@given(data=st.data())
def test_patch_select_mask_random_actions(mask_env, data):
    accepted = check_patch_action(mask_env, data.draw(_actions(mask_env.num_patches, (0, 1)), label="action"))
    event("accepted" if accepted else "rejected")


def test_evaluate_many_checks_every_action_first(prune_env):
    """One bad action in a batch of candidates: ValueError, nothing scored, nothing changed."""
    before = prune_state(prune_env)
    good = np.ones(prune_env.num_groups)
    with pytest.raises(ValueError):
        prune_env.evaluate_many([good, good, np.full(prune_env.num_groups, np.nan)])
    with pytest.raises(ValueError):
        prune_env.evaluate_allocation(prune_env.group_widths + 1)  # more channels than a group has
    _assert_same(before, prune_state(prune_env))


def test_huge_weights_keep_their_proportions(prune_env):
    """Weights near the float64 limit are scaled, not summed to inf (which used to mean 'uniform')."""
    g = prune_env.num_groups
    huge = np.r_[np.full(g - 1, 1e-300), 1e308]
    tiny = np.r_[np.full(g - 1, 1e-300 / 1e308), 1.0]
    np.testing.assert_array_equal(prune_env.allocate(huge), prune_env.allocate(tiny))
    assert prune_env.allocate(huge)[-1] > prune_env.allocate(np.ones(g))[-1]
