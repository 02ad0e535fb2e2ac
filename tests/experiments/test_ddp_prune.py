"""`keepgym prune` under torchrun (2 gloo processes): data-parallel KD, one set of outputs, same result."""

import json
import os
import subprocess
import sys

import pytest
import torch

from keepgym.envs.data import load_dataset
from keepgym.envs.trainer import Trainer
from keepgym.experiments.cli import main
from keepgym.models import create_model, save_model


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    # a briefly trained baseline, so that "the accuracies agree" means something
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_dataset("digits", train_size=600)
        torch.manual_seed(0)
        model = create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1)
        trainer = Trainer(model, data, epochs=3, batch_size=32, augment=False)
        for _ in range(3):
            trainer.train_epoch()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("base") / "model.pt"
    save_model(trainer.model, path)
    return path


def _args(checkpoint, out):
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
        "1",
        "--calibration-size",
        "32",
        "--kd-batch-size",
        "64",
        "--latency-repeats",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--seed",
        "3",
        "--out",
        str(out),
    ]


def test_torchrun_two_gloo_ranks_prune_like_one_process(base_checkpoint, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank below (OMP_NUM_THREADS=1)
    try:
        assert main(_args(base_checkpoint, single)) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "keepgym", *_args(base_checkpoint, ddp)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rlpruner: sparsity") == 1  # rank 0 alone reports
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((ddp / "summary.json").read_text())
    assert s2["world_size"] == 2 and "world_size" not in s1
    assert s1["baseline"] == s2["baseline"]
    assert s2["sparsity"] == pytest.approx(s1["sparsity"])
    assert s2["stages"][0]["accuracy_before_kd"] == s1["stages"][0]["accuracy_before_kd"]  # same first decision
    assert s1["final"]["val_accuracy"] > 0.3  # the KD recovered something, so the comparison means something
    for key in ("val_accuracy", "test_accuracy"):
        assert abs(s2["final"][key] - s1["final"][key]) < 0.1, key
    # rank 0 alone wrote: one agent log, one final log, one compressed model, no temporary folders
    assert sorted(p.name for p in (ddp / "tb").iterdir()) == ["rlpruner_1", "rlpruner_final"]
    assert len(list((ddp / "tb" / "rlpruner_final").iterdir())) == 1
    assert {"compressed.pt", "config.json", "summary.json", "policy.png"} <= {p.name for p in ddp.iterdir()}
    assert not [p for p in ddp.rglob(".*") if p.name != ".lock"]  # .lock: the run folder's lock file (flock)
