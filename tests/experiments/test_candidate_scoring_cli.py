"""`keepgym prune --candidate-scoring adaptive_bn`: recorded in config.json, used by the env, bad values one line."""

from __future__ import annotations

import json

import torch

from keepgym.experiments.cli import main
from keepgym.models import create_model, save_model


def _args(checkpoint, out, *extra):
    return [
        "prune", "--model", "vgg11", "--dataset", "digits", "--checkpoint", str(checkpoint),
        "--sparsity", "0.3", "--stage-sparsity", "0.3", "--sample-num", "2", "--rounds-per-stage", "1",
        "--finetune-epochs", "0", "--final-finetune-epochs", "0", "--calibration-size", "32",
        "--latency-repeats", "0", "--device", "cpu", "--no-progress", "--seed", "1", "--out", str(out), *extra,
    ]  # fmt: skip


def test_prune_with_adaptive_bn_scoring(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "base.pt"
    save_model(create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1), path)
    out = tmp_path / "run"
    assert main(_args(path, out, "--candidate-scoring", "adaptive_bn", "--bn-calibration-size", "64")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["candidate_scoring"] == "adaptive_bn" and config["bn_calibration_size"] == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["macs"] < summary["baseline"]["macs"]
    capsys.readouterr()
    assert main(_args(path, tmp_path / "bad", "--bn-calibration-size", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bn-calibration-size" in err[0]
    try:
        main(_args(path, tmp_path / "bad2", "--candidate-scoring", "eagle"))
    except SystemExit as exc:  # argparse's choices
        assert exc.code == 2
    else:
        raise AssertionError("an unknown --candidate-scoring must be refused")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
