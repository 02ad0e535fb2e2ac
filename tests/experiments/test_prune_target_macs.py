"""`keepgym prune --target-macs/--target-params`: prune to a compute budget, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from keepgym.experiments.cli import main
from keepgym.models import create_model, save_model


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "model.pt"
    save_model(create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1), path)
    return path


def _args(checkpoint, out, *target):
    return [
        "prune", "--model", "vgg11", "--dataset", "digits", "--checkpoint", str(checkpoint), *target,
        "--stage-sparsity", "0.25", "--algo", "global", "--finetune-epochs", "0", "--final-finetune-epochs", "0",
        "--calibration-size", "32", "--latency-repeats", "0", "--device", "cpu", "--no-progress", "--out", str(out),
    ]  # fmt: skip


@pytest.mark.parametrize("flag,key", [("--target-macs", "macs"), ("--target-params", "params")])
def test_prune_to_a_compute_target(base_checkpoint, tmp_path, flag, key):
    out = tmp_path / "run"
    assert main(_args(base_checkpoint, out, flag, "0.6")) == 0
    summary = json.loads((out / "summary.json").read_text())
    kept = summary["final"][key] / summary["baseline"][key]
    assert 0.6 - 0.25 < kept <= 0.6  # met within one stage's granularity
    assert summary["num_stages"] == 2 and len(summary["stages"]) == 2
    assert summary[f"target_{key}"] == 0.6 and summary["target_sparsity"] is None
    assert 0 < summary["sparsity"] < 1  # channel sparsity beside it


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ((), "give one target"),
        (("--sparsity", "0.5", "--target-macs", "0.5"), "give one target"),
        (("--target-macs", "1.2"), "--target-macs must be in (0, 1)"),
        (("--target-macs", "0.9"), "must not exceed 1 - --target-macs"),
    ],
)
def test_compute_target_errors_are_one_line(base_checkpoint, tmp_path, capsys, target, expected):
    assert main(_args(base_checkpoint, tmp_path / "bad", *target)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "bad").exists()


def test_folder_dataset_needs_a_data_root(base_checkpoint, tmp_path, capsys):
    args = _args(base_checkpoint, tmp_path / "bad", "--target-macs", "0.5")
    args[args.index("--dataset") + 1] = "folder"
    assert main(args) == 2
    assert "--dataset folder needs --data-root" in capsys.readouterr().err
