"""`keepgym agentvit` and `keepgym evaluate --vit --agent`: outputs, agents, resume, clear errors."""

import json
import zipfile

import numpy as np
import pytest
import torch

from keepgym.agents.ddqn import DDQN
from keepgym.agents.patch_agents import agent_class
from keepgym.experiments import agentvit as av
from keepgym.experiments.cli import main

TINY = [
    "--dataset", "digits", "--preset", "vit_tiny", "--train-size", "200", "--test-size", "100",
    "--batch-size", "32", "--epochs", "2", "--warmup-epochs", "1", "--speed-rounds", "1", "--examples", "4",
    "--device", "cpu", "--no-progress",
]  # fmt: skip

BLOCK_KEYS = ("test_accuracy", "macs_per_image", "images_per_second", "kept_patches")


def _tiny_config(out, **kw):
    base = dict(
        dataset="digits", preset="vit_tiny", train_size=200, test_size=100, batch_size=32, epochs=3,
        warmup_epochs=1, speed_rounds=1, examples=4, device="cpu", progress=False, out=str(out),
    )  # fmt: skip
    base.update(kw)
    return av.AgentViTConfig(**base)


def test_agentvit_outputs_and_evaluate(tmp_path):
    out = tmp_path / "run"
    assert main(["agentvit", *TINY, "--baseline", "--out", str(out)]) == 0
    for name in ("summary.json", "config.json", "agent.zip", "vit.pt", "baseline_vit.pt", "patches.png"):
        assert (out / name).is_file(), name
    assert list(out.rglob("events.out.tfevents*")), "no TensorBoard events"
    summary = json.loads((out / "summary.json").read_text())
    for block in ("full", "agent", "random", "topk", "joint_full"):
        for key in BLOCK_KEYS:
            assert isinstance(summary[block][key], float | int), (block, key)
        assert 0.0 <= summary[block]["test_accuracy"] <= 1.0
    n = summary["num_patches"]
    # random-k and top-k use the agent's own mean number of kept patches
    assert summary["random"]["kept_patches"] == summary["topk"]["kept_patches"] == summary["k"]
    assert abs(summary["k"] - summary["agent"]["kept_patches"]) <= 0.5
    assert summary["full"]["kept_patches"] == summary["joint_full"]["kept_patches"] == n
    assert summary["agent"]["train_seconds"] > 0 and summary["full"]["train_seconds"] > 0
    assert "baseline" in summary["full"]["vit"] and "joint" in summary["agent"]["vit"]
    # fewer kept patches -> fewer forward MACs
    if summary["k"] < n:
        assert summary["topk"]["forward_macs_per_image"] < summary["joint_full"]["forward_macs_per_image"]
        assert summary["random"]["score_macs_per_image"] == 0 < summary["topk"]["score_macs_per_image"]

    # the agent loads and predicts a valid action; the ViT file is weights-only loadable
    agent = DDQN.load(str(out / "agent.zip"), device="cpu")
    action, _ = agent.predict(np.full(n, 1.0 / n, dtype=np.float32), deterministic=True)
    assert agent.action_space.contains(np.asarray(action).astype(np.int64).reshape(()))
    raw = torch.load(out / "vit.pt", weights_only=True)
    assert raw["format"] == "keepgym-model" and raw["extra"]["agentvit"]["action_mode"] == "ratio"
    assert zipfile.is_zipfile(out / "agent.zip")

    # keepgym evaluate --vit --agent: the agent selects patches at inference time
    result_path = tmp_path / "eval.json"
    vit, agent_zip = str(out / "vit.pt"), str(out / "agent.zip")
    argv = ["evaluate", "--vit", vit, "--agent", agent_zip, "--dataset", "digits"]
    assert main([*argv, "--out", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    assert result["agent"]["accuracy"] == pytest.approx(summary["agent"]["test_accuracy"])
    assert result["full"]["accuracy"] == pytest.approx(summary["joint_full"]["test_accuracy"])
    assert result["agent"]["kept_patches"] == pytest.approx(summary["agent"]["kept_patches"])
    # refuses to overwrite a run without --force
    assert main(["agentvit", *TINY, "--out", str(out)]) == 2


@pytest.mark.parametrize(("algo", "mode"), [("dqn", "ratio"), ("ppo", "ratio"), ("ddqn", "mask")])
def test_other_agents_and_mask_mode(tmp_path, algo, mode):
    out = tmp_path / f"{algo}-{mode}"
    assert main(["agentvit", *TINY, "--algo", algo, "--action-mode", mode, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == algo and summary["action_mode"] == mode
    assert 1 <= summary["agent"]["kept_patches"] <= summary["num_patches"]
    assert agent_class(algo).load(str(out / "agent.zip"), device="cpu").action_space is not None
    if mode == "mask":
        assert torch.load(out / "vit.pt", weights_only=True)["extra"]["agentvit"]["action_mode"] == "mask"


_FULL_RUNS: dict = {}


def _uninterrupted(tmp_path_factory, mode):
    if mode not in _FULL_RUNS:
        out = tmp_path_factory.mktemp(f"full-{mode}")
        _FULL_RUNS[mode] = (av.train_agentvit(_tiny_config(out, epochs=4, action_mode=mode)), out)
    return _FULL_RUNS[mode]


@pytest.mark.parametrize(
    ("mode", "kill"),
    [
        ("ratio", dict(_stop_after_steps=12)),  # mid-epoch, 2 steps after checkpoint 3 (5 steps an epoch)
        ("patches", dict(_stop_after_epoch=2)),  # right after a checkpoint
        ("patches", dict(_stop_in_checkpoint=3)),  # while checkpoint 3 is written: resume from 2
        ("patches", dict(_stop_after_steps=12)),
    ],
    ids=["ratio-mid-epoch", "patches-after-checkpoint", "patches-in-checkpoint", "patches-mid-epoch"],
)
def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, tmp_path_factory, mode, kill):
    full, full_out = _uninterrupted(tmp_path_factory, mode)
    cut = tmp_path / "cut"
    assert av.train_agentvit(_tiny_config(cut, epochs=4, action_mode=mode, **kill)) is None
    assert not (cut / "summary.json").exists()
    # What a SIGKILL mid-write leaves: a hidden temporary folder; resume removes it and never reads it.
    (cut / "checkpoint" / ".0004.partial").mkdir(parents=True, exist_ok=True)
    resumed = av.train_agentvit(_tiny_config(cut, epochs=4, action_mode=mode, resume=True))
    assert not (cut / "checkpoint" / ".0004.partial").exists()
    for block in ("agent", "topk", "random", "joint_full"):
        assert resumed[block]["test_accuracy"] == full[block]["test_accuracy"], block
        assert resumed[block]["kept_patches"] == full[block]["kept_patches"], block
    a = torch.load(full_out / "vit.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / "vit.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(p.name for p in (cut / "checkpoint").iterdir())
    assert kept == ["0003", "0004"]  # the newest --keep-checkpoints (2), all complete


@pytest.mark.parametrize(
    "extra",
    [
        ["--algo", "dqn", "--action-mode", "mask"],
        ["--epochs", "0"],
        ["--epochs", "2", "--warmup-epochs", "2"],
        ["--patch-size", "5"],
        ["--target-keep", "64"],
        ["--keep-ratios", "0.5", "1.5"],
        ["--state-layer", "7"],
        ["--batch-size", "1"],
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, extra):
    out = tmp_path / "bad"
    assert main(["agentvit", *TINY, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keepgym agentvit: error:")
    assert not out.exists()


def test_bad_choice_and_resume_without_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["agentvit", *TINY, "--algo", "sac"])
    assert exc.value.code == 2
    assert main(["agentvit", *TINY, "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no run to resume" in capsys.readouterr().err


def test_evaluate_vit_errors(tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")
    assert main(["evaluate", "--vit", missing, "--agent", missing, "--dataset", "digits"]) == 2
    assert main(["evaluate", "--vit", missing, "--dataset", "digits"]) == 2
    not_vit = tmp_path / "x.pt"
    not_vit.write_bytes(b"not a model")
    assert main(["evaluate", "--vit", str(not_vit), "--agent", str(not_vit), "--dataset", "digits"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("keepgym evaluate: error:") for line in lines)


@pytest.mark.parametrize("action_mode", ["ratio", "patches"])
def test_benchmark_agentvit_quick(action_mode):
    result = av.benchmark_agentvit(device="cpu", quick=True, steps=2, action_mode=action_mode)
    assert result["full_step_seconds"] > 0 and result["joint_step_seconds"] > 0
    assert result["speedup"] == pytest.approx(result["full_step_seconds"] / result["joint_step_seconds"])
    assert 1 <= result["kept"] < result["num_patches"] and result["action_mode"] == action_mode
    assert result["joint_vit_step_seconds"] < result["joint_step_seconds"]


def test_eval_scalars_are_written_for_every_epoch_the_last_one_included(tmp_path):
    from keepgym.agents.callbacks import read_tensorboard

    out = tmp_path / "tb-run"
    summary = av.train_agentvit(_tiny_config(out, epochs=3, warmup_epochs=1))
    (run_dir,) = [p for p in (out / "tb").iterdir() if p.name.startswith("agentvit_") and p.name != "agentvit_final"]
    acc = read_tensorboard(run_dir)
    epochs = [e.value for e in acc.Scalars("eval/epoch")]
    assert epochs == [2.0, 3.0]  # the two agent epochs after one warm-up epoch; 3 is the last
    for tag in ("eval/val_accuracy_full", "eval/val_accuracy_agent", "eval/val_kept_patches"):
        assert len(acc.Scalars(tag)) == 2, tag
    # the final checkpoint is the last epoch's, marked finished, and loads without unpickling
    state = torch.load(out / "checkpoint" / "0003" / "state.pt", weights_only=True)
    assert state["finished"] and state["epoch"] == 3 and state["num_timesteps"] == 2 * summary["steps_per_epoch"]
