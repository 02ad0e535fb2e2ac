"""`keepgym prune` at tiny size: outputs, loadable compressed model, resume equivalence, clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import keepgym.experiments.prune as prune_cmd
from keepgym.experiments.cli import main
from keepgym.models import create_model, load_model, save_model

TIMING = set(prune_cmd.TIMING_KEYS)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1)
    path = tmp_path_factory.mktemp("base") / "model.pt"
    save_model(model, path)
    return path


def _args(checkpoint, out, *extra):
    return [
        "prune",
        "--model",
        "vgg11",
        "--dataset",
        "digits",
        "--checkpoint",
        str(checkpoint),
        "--sparsity",
        "0.5",
        "--stage-sparsity",
        "0.25",
        "--sample-num",
        "2",
        "--rounds-per-stage",
        "1",
        "--finetune-epochs",
        "1",
        "--final-finetune-epochs",
        "2",
        "--calibration-size",
        "32",
        "--latency-repeats",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--seed",
        "3",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def full_run(base_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "run"
    assert main(_args(base_checkpoint, out)) == 0
    return out


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def test_full_run_writes_every_output(full_run):
    for name in ("compressed.pt", "summary.json", "policy.png", "config.json"):
        assert (full_run / name).is_file(), name
    assert list((full_run / "tb").rglob("events.out.tfevents*")), "no TensorBoard events"
    stages = sorted(p.name for p in (full_run / "stages").iterdir() if p.is_dir())
    assert stages == ["001", "002"]
    assert {"model.pt", "agent.zip", "state.pt"} <= {p.name for p in (full_run / "stages" / "002").iterdir()}
    assert not list((full_run / "stages").glob(".*")), "temporary checkpoint folders left behind"


def test_summary_reports_reductions(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    for block in ("baseline", "final"):
        for key in ("val_accuracy", "test_accuracy", "macs", "params", "latency_ms_b1", "latency_ms_b64"):
            assert summary[block][key] is not None, (block, key)
    assert summary["final"]["macs"] < summary["baseline"]["macs"]
    assert summary["final"]["params"] < summary["baseline"]["params"]
    assert 0 < summary["macs_reduction"] < 1 and 0 < summary["params_reduction"] < 1
    assert summary["speedup_b1"] > 0 and summary["speedup_b64"] > 0
    assert math.isclose(summary["sparsity"], 0.5, abs_tol=0.02)
    assert len(summary["widths"]) == len(summary["initial_widths"])
    assert all(w <= w0 for w, w0 in zip(summary["widths"], summary["initial_widths"], strict=True))
    assert summary["evaluations"] == 2 * 2  # 2 stages x 1 round x 2 candidates
    assert summary["num_stages"] == 2 and len(summary["stages"]) == 2
    assert summary["wall_seconds"] > 0


def test_compressed_model_loads_safely_with_reported_cost(full_run):
    from keepgym.envs.metrics import count_macs_params

    payload = torch.load(full_run / "compressed.pt", weights_only=True)
    assert payload["format"] == "keepgym-model"
    model = load_model(full_run / "compressed.pt")
    summary = json.loads((full_run / "summary.json").read_text())
    macs, params = count_macs_params(model, (1, 1, 32, 32))
    assert (macs, params) == (summary["final"]["macs"], summary["final"]["params"])


def test_resume_after_interruption_equals_uninterrupted_run(base_checkpoint, full_run, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def interrupt(stage):
        if stage == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(prune_cmd, "_after_checkpoint", interrupt)
    assert main(_args(base_checkpoint, out)) == 130
    assert (out / "stages" / "001" / "state.pt").is_file()
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(prune_cmd, "_after_checkpoint", lambda stage: None)
    assert main(_args(base_checkpoint, out, "--resume")) == 0

    a = torch.load(full_run / "compressed.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "compressed.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa = _strip_timing(json.loads((full_run / "summary.json").read_text()))
    sb = _strip_timing(json.loads((out / "summary.json").read_text()))
    assert sa == sb


def test_python_and_cli_run_the_same_stages(base_checkpoint, full_run):
    """`keepgym prune` and the same config built by hand in Python commit the same stages, bit for bit."""
    from stable_baselines3.common.callbacks import BaseCallback

    from keepgym.agents import RLPruner
    from keepgym.envs.prune_env import PruneEnv
    from keepgym.envs.recovery import KDRecovery

    env = PruneEnv(
        model_name="vgg11",
        dataset="digits",
        checkpoint=base_checkpoint,
        target_sparsity=0.5,
        stage_sparsity=0.25,
        calibration_size=32,
        device="cpu",
        recovery=KDRecovery(epochs=1, learning_rate=1e-3, batch_size=128, seed=3),
    )
    infos = []

    class Infos(BaseCallback):
        def _on_step(self) -> bool:
            infos.append(self.locals["info"])
            return True

    RLPruner("MlpPolicy", env, sample_num=2, rounds_per_stage=1, archive_size=2, seed=3).learn(
        env.num_stages, callback=Infos()
    )
    cli = json.loads((full_run / "summary.json").read_text())["stages"]
    python = env.recovery.stage_records
    assert len(python) == len(cli) == 2
    for key in ("widths", "accuracy_before_kd", "val_accuracy", "kd_val_accuracies", "reward", "teacher_swapped"):
        assert [r[key] for r in python] == [r[key] for r in cli], key
    # step's info says the same: accuracy after recovery, and the one before it
    assert [i["accuracy_before_recovery"] for i in infos] == [r["accuracy_before_kd"] for r in cli]
    assert [i["widths"] for i in infos] == [r["widths"] for r in cli]
    assert cli[-1]["widths"] == json.loads((full_run / "summary.json").read_text())["widths"]


def test_existing_run_folder_is_refused_without_force(base_checkpoint, full_run, capsys):
    assert main(_args(base_checkpoint, full_run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("--sparsity", "1.5"), "--sparsity must be in (0, 1)"),
        (("--algo", "dqn"), "valid algos: rlpruner, uniform, global, ppo, sac, a2c"),
        (("--checkpoint", "/nonexistent/model.pt"), "no such file"),
        (("--stage-sparsity", "0.6"), "must not exceed --sparsity"),
        (("--model", "vgg99"), "valid models"),
        (("--criterion", "magic"), "valid criteria"),
        (("--sample-num", "0"), "--sample-num must be >= 1"),
    ],
)
def test_bad_arguments_give_one_line(base_checkpoint, tmp_path, capsys, change, expected):
    args = _args(base_checkpoint, tmp_path / "bad")
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert expected in err[0]
    assert not (tmp_path / "bad").exists(), "work started before validation"


def test_uniform_baseline_and_sb3_algorithm_share_the_outputs(base_checkpoint, tmp_path):
    for algo in ("uniform", "ppo"):
        out = tmp_path / algo
        args = _args(base_checkpoint, out, "--algo", algo)
        args[args.index("--final-finetune-epochs") + 1] = "0"
        assert main(args) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["algo"] == algo
        assert summary["final"]["macs"] < summary["baseline"]["macs"]
        assert (out / "compressed.pt").is_file() and (out / "policy.png").is_file()
    # the SB3 algorithm's TensorBoard run carries the env figures, one point per stage
    from keepgym.agents.callbacks import read_tensorboard

    runs = [p.parent for p in (tmp_path / "ppo").rglob("events.out.tfevents*")]
    tags = set().union(*(set(read_tensorboard(r).Tags()["scalars"]) for r in runs))
    assert {"env/accuracy", "env/macs_ratio"} <= tags


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(base_checkpoint, full_run, tmp_path):
    """A real SIGKILL (no cleanup code runs) once stage 1 is checkpointed, then --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = _args(base_checkpoint, out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "keepgym", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (out / "stages" / "001" / "state.pt").exists():
        assert proc.poll() is None, "the run ended before stage 1 was checkpointed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    assert main(_args(base_checkpoint, out, "--resume")) == 0
    a = torch.load(full_run / "compressed.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "compressed.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    sa = _strip_timing(json.loads((full_run / "summary.json").read_text()))
    sb = _strip_timing(json.loads((out / "summary.json").read_text()))
    assert sa == sb
