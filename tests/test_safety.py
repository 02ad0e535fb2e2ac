"""Safety and reliability (issue 14): nothing runs code from a file, split travels with the model, run locks,
one-line OS errors, checkpoint retention, ``--env`` resume.

* A pickle whose ``__reduce__`` creates a marker file is planted in every file kind keepgym reads (agent zip
  ``data`` and ``tensors.pt``, replay buffer, ``state.pt``, ``model.pt``, and each file of a prune stage
  checkpoint read by ``--resume``): the marker is never created, and the CLI ends in one line.
* Agents save and load without pickle: our format round-trips; a plain SB3 zip loads with ``custom_objects``
  for every pickled field (``load_sb3_agent``) or is refused.
* A baseline trained with ``--seed 1 --val-size 0.2`` gives a PruneEnv whose validation images are disjoint
  from that baseline's training images; a contradicting ``--val-size`` is refused in one line.
* A live run holds ``OUT/.lock``: a second command is refused, ``--force`` included, and deletes nothing.
* Disk full / read-only folder / allocator failure / NaN weights: exit 2, one line, no temp files left, and
  ``--resume`` then finishes exactly as an uninterrupted run.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import os
import pickle
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import keepgym.experiments.prune as prune_cmd
import keepgym.experiments.train as train_cmd
from keepgym.agents.serialization import AgentLoadError, load_sb3_agent
from keepgym.envs.data import load_dataset
from keepgym.envs.prune_env import PruneEnv
from keepgym.envs.splits import SplitMismatchError
from keepgym.experiments.cli import main
from keepgym.experiments.common import CliError, load_state
from keepgym.models import create_model, load_model, save_model
from keepgym.models.serialization import ModelLoadError

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


class _Marker:
    """Unpickling this creates ``path`` (stands for any code an attacker would run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_Marker(str(marker)))


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def _no_temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name != ".lock"]


# ----------------------------------------------------------------------------- agents
@pytest.fixture
def toy_env():
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_prune_env", Path(__file__).parent / "agents/toy_prune_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ToyPruneEnv()


def _rlpruner(env):
    from keepgym.agents.rl_pruner import RLPruner

    agent = RLPruner("PruneDistributionPolicy", env, sample_num=3, rounds_per_stage=2, seed=1)
    return agent.learn(3)


def test_rlpruner_file_is_json_plus_tensors_and_round_trips(tmp_path, toy_env):
    from keepgym.agents.rl_pruner import RLPruner

    agent = _rlpruner(toy_env)
    agent.save(tmp_path / "agent.zip")
    with zipfile.ZipFile(tmp_path / "agent.zip") as z:
        assert sorted(z.namelist()) == ["keepgym-agent.json", "tensors.pt"]  # no SB3 "data" (pickles)
        torch.load(__import__("io").BytesIO(z.read("tensors.pt")), weights_only=True)
    loaded = RLPruner.load(tmp_path / "agent.zip", env=type(toy_env)(), force_reset=False)
    assert np.array_equal(loaded.distribution, agent.distribution)
    assert loaded._rng.bit_generator.state == agent._rng.bit_generator.state
    assert len(loaded.history) == 3 and np.array_equal(loaded.history[-1]["action"], agent.history[-1]["action"])


def test_ddqn_agent_and_replay_buffer_round_trip_without_pickle(tmp_path):
    from keepgym.agents.ddqn import DDQN

    env = gym.make("CartPole-v1")
    agent = DDQN("MlpPolicy", env, learning_starts=10, buffer_size=64, batch_size=8, seed=0).learn(40)
    agent.save(tmp_path / "agent.zip")
    agent.save_replay_buffer(tmp_path / "replay_buffer.npz")
    with np.load(tmp_path / "replay_buffer.npz", allow_pickle=False) as npz:
        assert "observations" in npz.files
    loaded = DDQN.load(tmp_path / "agent.zip", env=env)
    loaded.load_replay_buffer(tmp_path / "replay_buffer.npz")
    obs = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0], agent.predict(obs, deterministic=True)[0])
    assert loaded.replay_buffer.pos == agent.replay_buffer.pos
    assert np.array_equal(loaded.replay_buffer.actions, agent.replay_buffer.actions)
    assert loaded.num_timesteps == 40 and loaded.exploration_rate == agent.exploration_rate


def test_sb3_dqn_replay_buffer_saves_as_npz(tmp_path):
    import stable_baselines3 as sb3

    from keepgym.agents.serialization import load_replay_buffer, save_replay_buffer

    env = gym.make("CartPole-v1")
    agent = sb3.DQN("MlpPolicy", env, learning_starts=5, buffer_size=50, seed=0).learn(30)
    save_replay_buffer(agent, tmp_path / "replay_buffer.npz")
    other = sb3.DQN("MlpPolicy", env, learning_starts=5, buffer_size=50, seed=1)
    load_replay_buffer(other, tmp_path / "replay_buffer.npz")
    assert other.replay_buffer.pos == agent.replay_buffer.pos > 0
    assert np.array_equal(other.replay_buffer.observations, agent.replay_buffer.observations)
    small = sb3.DQN("MlpPolicy", env, buffer_size=20, seed=0)
    with pytest.raises(AgentLoadError, match="does not fit"):
        load_replay_buffer(small, tmp_path / "replay_buffer.npz")


@pytest.mark.parametrize("algo", ["PPO", "A2C", "DQN"])
def test_sb3_plugin_zip_loads_with_custom_objects_only(tmp_path, algo, monkeypatch):
    import cloudpickle
    import stable_baselines3 as sb3

    cls = getattr(sb3, algo)
    env = gym.make("CartPole-v1")
    kw = {"n_steps": 16, "batch_size": 16} if algo == "PPO" else {}
    model = cls("MlpPolicy", env, seed=0, **kw).learn(32)
    model.save(tmp_path / "m.zip")

    def forbidden(*a, **k):
        raise AssertionError("cloudpickle.loads was called")

    monkeypatch.setattr(cloudpickle, "loads", forbidden)
    loaded = load_sb3_agent(cls, tmp_path / "m.zip", env=env, device="cpu")
    obs = np.random.default_rng(1).random((5, 4)).astype(np.float32)
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def _sb3_zip_with_payload(tmp_path: Path, marker: Path, field: str) -> Path:
    import stable_baselines3 as sb3

    sb3.A2C("MlpPolicy", gym.make("CartPole-v1"), seed=0).save(tmp_path / "clean.zip")
    with zipfile.ZipFile(tmp_path / "clean.zip") as z:
        files = {n: z.read(n) for n in z.namelist()}
    data = json.loads(files["data"])
    data[field] = {":type:": "<class 'object'>", ":serialized:": base64.b64encode(_payload(marker)).decode()}
    files["data"] = json.dumps(data).encode()
    path = tmp_path / f"evil_{field}.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in files.items():
            z.writestr(name, blob)
    return path


def _keepgym_zip_with_payload(tmp_path: Path, marker: Path, toy_env) -> Path:
    _rlpruner(toy_env).save(tmp_path / "good.zip")
    path = tmp_path / "evil_tensors.zip"
    with zipfile.ZipFile(tmp_path / "good.zip") as z, zipfile.ZipFile(path, "w") as w:
        w.writestr("keepgym-agent.json", z.read("keepgym-agent.json"))
        w.writestr("tensors.pt", _payload(marker))
    return path


HOSTILE_AGENT_FILES = [
    "sb3-data-observation_space->DDQN.load",
    "sb3-data-policy_class->RLPruner.load",
    "sb3-data-observation_space->load_sb3_agent",
    "sb3-data-unknown_field->load_sb3_agent",
    "keepgym-zip-tensors->RLPruner.load",
    "replay-buffer-pickle->load_replay_buffer",
    "replay-buffer-object-array->load_replay_buffer",
    "state.pt->load_state",
    "model.pt->load_model",
]


@pytest.mark.parametrize("case", HOSTILE_AGENT_FILES)
def test_planted_payload_never_runs(tmp_path, case, toy_env):
    import stable_baselines3 as sb3

    from keepgym.agents.ddqn import DDQN
    from keepgym.agents.rl_pruner import RLPruner

    marker = tmp_path / "MARKER"
    env = gym.make("CartPole-v1")
    kind, _, loader = case.partition("->")
    if kind.startswith("sb3-data-"):
        field = kind.removeprefix("sb3-data-")
        path = _sb3_zip_with_payload(tmp_path, marker, field)
        calls = {
            "DDQN.load": lambda: DDQN.load(path, env=env),
            "RLPruner.load": lambda: RLPruner.load(path),
            "load_sb3_agent": lambda: load_sb3_agent(sb3.A2C, path, env=env),
        }
        if field == "observation_space":  # replaced by the env's own space: loads, payload ignored
            if loader == "load_sb3_agent":
                assert load_sb3_agent(sb3.A2C, path, env=env) is not None
                assert not marker.exists()
                return
        with pytest.raises(AgentLoadError):
            calls[loader]()
    elif kind == "keepgym-zip-tensors":
        path = _keepgym_zip_with_payload(tmp_path, marker, toy_env)
        with pytest.raises(AgentLoadError, match="unreadable tensors"):
            RLPruner.load(path, env=type(toy_env)())
    elif kind.startswith("replay-buffer"):
        agent = DDQN("MlpPolicy", env, learning_starts=5, buffer_size=32, seed=0)
        path = tmp_path / "replay_buffer.npz"
        if kind == "replay-buffer-pickle":
            path.write_bytes(_payload(marker))
        else:
            np.savez(path, format=np.array("keepgym-replay-buffer"), observations=np.array([_Marker(str(marker))]))
        with pytest.raises(AgentLoadError):
            agent.load_replay_buffer(path)
    elif kind == "state.pt":
        path = tmp_path / "state.pt"
        torch.save({"stage": 1, "rng": _Marker(str(marker))}, path)
        with pytest.raises(CliError, match="not a readable checkpoint state"):
            load_state(path)
    else:
        path = tmp_path / "model.pt"
        torch.save({"format": "keepgym-model", "version": 1, "spec": _Marker(str(marker))}, path)
        with pytest.raises(ModelLoadError):
            load_model(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- prune resume with hostile files
def _prune_args(checkpoint, out, *extra):
    return [
        "prune", "--model", "vgg11", "--dataset", "digits", "--checkpoint", str(checkpoint),
        "--sparsity", "0.5", "--stage-sparsity", "0.25", "--sample-num", "2", "--rounds-per-stage", "1",
        "--finetune-epochs", "0", "--final-finetune-epochs", "1", "--calibration-size", "16",
        "--latency-repeats", "0", "--device", "cpu", "--no-progress", "--seed", "3", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "model.pt"
    save_model(create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1), path)
    return path


@pytest.fixture(scope="module")
def interrupted_prune(base_checkpoint, tmp_path_factory):
    """A prune run stopped (Ctrl-C) right after stage 1's checkpoint."""
    out = tmp_path_factory.mktemp("cut") / "run"
    saved = prune_cmd._after_checkpoint

    def interrupt(stage):
        if stage == 1:
            raise KeyboardInterrupt

    prune_cmd._after_checkpoint = interrupt
    try:
        assert main(_prune_args(base_checkpoint, out)) == 130
    finally:
        prune_cmd._after_checkpoint = saved
    assert (out / "stages" / "001" / "agent.zip").is_file()
    return out


@pytest.mark.parametrize("name", ["agent.zip", "state.pt", "model.pt"])
def test_prune_resume_refuses_planted_stage_file_in_one_line(capsys, tmp_path, base_checkpoint, interrupted_prune,
                                                             name):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(interrupted_prune, out)
    (out / ".lock").unlink(missing_ok=True)
    marker = tmp_path / "MARKER"
    target = out / "stages" / "001" / name
    if name == "agent.zip":
        with zipfile.ZipFile(target, "w") as z:  # an SB3-style zip whose data field is a pickle
            z.writestr("data", json.dumps({"policy_class": {":serialized:": base64.b64encode(
                _payload(marker)).decode()}}))
    else:
        torch.save({"format": "keepgym-model", "version": 1, "stage": _Marker(str(marker))}, target)
    rc, err = _cli(capsys, *_prune_args(base_checkpoint, out, "--resume"))
    assert rc == 2 and len(err) == 1 and "keepgym prune: error:" in err[0], err
    assert not marker.exists()


# ----------------------------------------------------------------------------- the split travels with the model
TRAIN_TINY = [
    "train", "--model", "vgg11", "--dataset", "digits", "--width-mult", "0.125", "--epochs", "1",
    "--train-size", "300", "--batch-size", "64", "--no-progress",
]  # fmt: skip


def _image_keys(x: torch.Tensor) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in x}


def test_env_validation_split_is_the_baselines_own(tmp_path, capsys):
    out = tmp_path / "base"
    assert main([*TRAIN_TINY, "--seed", "1", "--val-size", "0.2", "--out", str(out)]) == 0
    extra = torch.load(out / "model.pt", weights_only=True)["extra"]
    assert extra["split"]["seed"] == 1 and extra["split"]["val_size"] == 0.2 and extra["split"]["train_size"] == 300
    baseline_train = load_dataset("digits", seed=1, val_size=0.2, train_size=300).train_x
    leaky_val = load_dataset("digits", seed=0, val_size=0.2, train_size=300).val_x  # the old seed-0 re-draw
    assert len(_image_keys(leaky_val) & _image_keys(baseline_train)) > 10  # the test can fail

    env = PruneEnv(model_name="vgg11", dataset="digits", checkpoint=out / "model.pt", calibration_size=16)
    assert len(env.data.val_y) == 60
    assert not _image_keys(env.data.val_x) & _image_keys(baseline_train)
    assert not _image_keys(env.data.train_x) ^ _image_keys(baseline_train)

    with pytest.raises(SplitMismatchError, match="val_size"):
        PruneEnv(model_name="vgg11", dataset="digits", checkpoint=out / "model.pt", val_size=0.1)
    rc, err = _cli(capsys, *_prune_args(out / "model.pt", tmp_path / "p", "--val-size", "0.1"))
    assert rc == 2 and len(err) == 1 and "val_size" in err[0]
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- run-folder lock
@pytest.mark.parametrize("force", [False, True])
def test_live_run_folder_is_refused_even_with_force(tmp_path, capsys, force):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another live run
    try:
        rc, err = _cli(capsys, *TRAIN_TINY, "--out", out, *(["--force"] if force else []))
    finally:
        os.close(fd)
    assert rc == 2 and len(err) == 1 and "in use by another running keepgym command" in err[0]
    assert (out / "config.json").read_text() == "{}"  # --force deleted nothing of the live run
    assert main([*TRAIN_TINY, "--out", str(out), "--force"]) == 0  # once it has ended
    fd = os.open(out / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end of the run
    os.close(fd)


# ----------------------------------------------------------------------------- OS errors: one line, resumable
@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "full"
    assert main([*TRAIN_TINY, "--epochs", "3", "--out", str(out)]) == 0
    return out


def _same_model(a: Path, b: Path) -> bool:
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/3"),
        OSError(errno.EROFS, "Read-only file system"),
    ],
    ids=["ENOSPC", "torch-write-failed", "EROFS"],
)
def test_disk_failure_mid_checkpoint_is_one_line_and_resumable(tmp_path, capsys, monkeypatch, train_reference,
                                                               failure):
    out = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += isinstance(obj, dict) and "trainer" in obj  # an epoch checkpoint's state
        if calls["n"] == 2:  # epoch 2's checkpoint state: half a file, then the disk fails
            f.write(b"PK\x03\x04 partial")
            raise failure
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    rc, err = _cli(capsys, *TRAIN_TINY, "--epochs", "3", "--out", out)
    monkeypatch.setattr(torch, "save", real_save)
    assert rc == 2 and len(err) == 1 and "keepgym train: error:" in err[0] and "--resume" in err[0], err
    assert _no_temp_files(out) == []
    assert (out / "checkpoints" / "001" / "state.pt").is_file()  # the previous checkpoint is intact
    assert main([*TRAIN_TINY, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert _same_model(out / "model.pt", train_reference / "model.pt")


def test_read_only_out_folder_is_one_line(tmp_path, capsys, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if self.name == "ro":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    rc, err = _cli(capsys, *TRAIN_TINY, "--out", tmp_path / "ro")
    assert rc == 2 and len(err) == 1 and "Read-only file system" in err[0]


def test_allocator_failure_and_non_finite_weights_are_one_line(tmp_path, capsys):
    model = create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1)
    save_model(model, tmp_path / "ok.pt")
    payload = torch.load(tmp_path / "ok.pt", weights_only=True)
    payload["spec"]["kwargs"]["num_classes"] = 10**12  # a huge-dims layer: the allocator refuses
    torch.save(payload, tmp_path / "huge.pt")
    rc, err = _cli(capsys, "evaluate", "--checkpoint", tmp_path / "huge.pt", "--dataset", "digits",
                   "--latency-repeats", "0")
    assert rc == 2 and len(err) == 1 and "allocate" in err[0]

    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_model(model, tmp_path / "nan.pt")
    name = next(iter(model.state_dict()))
    with pytest.raises(ModelLoadError, match=f"tensor '{name}' holds .* NaN/inf"):
        load_model(tmp_path / "nan.pt")
    for argv in (
        ["evaluate", "--checkpoint", tmp_path / "nan.pt", "--dataset", "digits", "--latency-repeats", "0"],
        _prune_args(tmp_path / "nan.pt", tmp_path / "p"),
    ):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and len(err) == 1 and "NaN/inf" in err[0], err


def test_killed_first_config_write_leaves_a_usable_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.json.abc123.tmp").write_bytes(b'{"mod')  # SIGKILL during the very first write
    rc, err = _cli(capsys, *TRAIN_TINY, "--out", out, "--resume")
    assert rc == 2 and len(err) == 1 and "holds no run to resume" in err[0]
    assert main([*TRAIN_TINY, "--out", str(out)]) == 0
    assert _no_temp_files(out) == []


# ----------------------------------------------------------------------------- retention
def test_checkpoint_retention_keeps_last_n_and_best(tmp_path):
    out = tmp_path / "run"
    assert main([*TRAIN_TINY, "--epochs", "4", "--keep-checkpoints", "1", "--out", str(out)]) == 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    best = json.loads((out / "summary.json").read_text())["best_epoch"]
    assert kept == sorted({"004", f"{best:03d}"})


def test_prune_keeps_last_n_stage_checkpoints(base_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = _prune_args(base_checkpoint, out, "--stage-sparsity", "0.1", "--keep-checkpoints", "2")
    assert main(args) == 0
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["004", "005"]


def test_prune_interrupted_after_its_last_stage_resumes_exactly(base_checkpoint, tmp_path, monkeypatch):
    """The final stage is checkpointed, the search record is not: the env is restored in its ended state."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_prune_args(base_checkpoint, full)) == 0

    def interrupt(stage):
        if stage == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prune_cmd, "_after_checkpoint", interrupt)
    assert main(_prune_args(base_checkpoint, cut)) == 130
    assert (cut / "stages" / "002").is_dir() and not (cut / "search").exists()
    monkeypatch.setattr(prune_cmd, "_after_checkpoint", lambda stage: None)
    assert main(_prune_args(base_checkpoint, cut, "--resume")) == 0
    assert _same_model(full / "compressed.pt", cut / "compressed.pt")


# ----------------------------------------------------------------------------- --env resume
def test_prune_env_id_run_resumes_exactly(tmp_path, monkeypatch):
    base = [
        "prune", "--env", "RLPrune-Digits-v0", "--width-mult", "0.125", "--sparsity", "0.4", "--stage-sparsity",
        "0.2", "--algo", "uniform", "--finetune-epochs", "0", "--final-finetune-epochs", "1", "--calibration-size",
        "16", "--latency-repeats", "0", "--device", "cpu", "--no-progress", "--seed", "1",
    ]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*base, "--out", str(full)]) == 0

    def interrupt(stage):
        if stage == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(prune_cmd, "_after_checkpoint", interrupt)
    assert main([*base, "--out", str(cut)]) == 130
    monkeypatch.setattr(prune_cmd, "_after_checkpoint", lambda stage: None)
    assert main([*base, "--out", str(cut), "--resume"]) == 0
    assert _same_model(full / "compressed.pt", cut / "compressed.pt")


def test_train_interrupted_between_checkpoint_and_model_resumes_exactly(tmp_path, monkeypatch, train_reference):
    out = tmp_path / "run"

    def interrupt(epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "_after_checkpoint", interrupt)
    assert main([*TRAIN_TINY, "--epochs", "3", "--out", str(out)]) == 130
    monkeypatch.setattr(train_cmd, "_after_checkpoint", lambda epoch: None)
    assert main([*TRAIN_TINY, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert _same_model(out / "model.pt", train_reference / "model.pt")
    ref = json.loads((train_reference / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    for key in ("train_seconds", "finished"):
        ref.pop(key), got.pop(key)
    assert ref == got
