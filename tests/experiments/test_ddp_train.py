"""`keepgym train` under torchrun (2 gloo processes) matches the single-process run; sharding helpers."""

import json
import os
import subprocess
import sys

import pytest
import torch

from keepgym.envs.data import BatchLoader, load_dataset
from keepgym.envs.distributed import ShardedLoader, all_reduce_sum, init_distributed, is_main_process, main_first
from keepgym.envs.trainer import Trainer
from keepgym.experiments.cli import main
from keepgym.models import create_model

ARGS = [
    "train",
    "--model",
    "vgg11",
    "--dataset",
    "digits",
    "--width-mult",
    "0.25",
    "--epochs",
    "3",
    "--train-size",
    "480",
    "--batch-size",
    "32",
    "--device",
    "cpu",
    "--no-progress",
]


def test_sharded_loader_partitions_every_global_batch():
    data = load_dataset("digits", train_size=100)

    def loader():
        gen = torch.Generator().manual_seed(3)
        return BatchLoader(data.train_x, data.train_y, data, 16, drop_last=True, generator=gen)

    global_loader = loader()
    shards = [ShardedLoader(loader(), rank, 3) for rank in range(3)]
    assert all(len(s) == len(global_loader) for s in shards)
    for (xg, yg), *parts in zip(global_loader, *shards, strict=True):
        assert [len(y) for _, y in parts] == [6, 5, 5]
        assert torch.equal(torch.cat([x for x, _ in parts]), xg)
        assert torch.equal(torch.cat([y for _, y in parts]), yg)
    with pytest.raises(ValueError, match="world size"):
        ShardedLoader(global_loader, 0, 32)


def test_helpers_are_no_ops_outside_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert not info.enabled and info.is_main and info.backend is None
    assert is_main_process()
    assert all_reduce_sum(torch.tensor([2.0])).item() == 2.0
    assert main_first(lambda: 7) == 7


def test_deferred_nan_check_restores_like_the_cuda_path(monkeypatch):
    # On CUDA the guard reads the loss every 10 steps (no per-batch host sync); emulate it on CPU.
    data = load_dataset("digits", train_size=400)
    model = create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1)
    trainer = Trainer(model, data, epochs=2, batch_size=16, amp=True)  # amp is ignored on CPU
    assert not trainer.amp and not trainer.channels_last
    trainer._check_every = 10
    real_forward = model.forward
    calls = {"n": 0}

    def poisoned(x):
        calls["n"] += 1
        out = real_forward(x)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(model, "forward", poisoned)
    stats = trainer.train_epoch()
    assert stats.diverged and trainer.divergence_events[0]["step"] == 9
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(torch.tensor(stats.train_loss))
    assert not trainer.train_epoch().diverged


def test_torchrun_two_gloo_ranks_match_single_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*ARGS, "--out", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "keepgym", *ARGS, "--out", str(ddp)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((ddp / "summary.json").read_text())
    assert s2["world_size"] == 2 and "world_size" not in s1
    assert s1["test_accuracy"] > 0.3  # it learned, so the comparison means something
    assert abs(s2["test_accuracy"] - s1["test_accuracy"]) < 0.1
    assert abs(s2["val_accuracy"] - s1["val_accuracy"]) < 0.1
    # rank 0 alone wrote: one TensorBoard file, one model
    assert len(list((ddp / "tb" / "train").glob("events.out.tfevents*"))) == 1
    assert {"model.pt", "checkpoints", "config.json", "summary.json"} <= {p.name for p in ddp.iterdir()}
