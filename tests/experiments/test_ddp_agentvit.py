"""`keepgym agentvit` under torchrun (2 gloo processes): data-parallel ViT steps, one set of outputs."""

import json
import os
import subprocess
import sys

import torch

from keepgym.experiments.cli import main
from keepgym.models import load_model

TINY = [
    "agentvit", "--dataset", "digits", "--preset", "vit_tiny", "--train-size", "320", "--test-size", "100",
    "--batch-size", "32", "--epochs", "3", "--warmup-epochs", "1", "--speed-rounds", "1", "--examples", "4",
    "--device", "cpu", "--no-progress",
]  # fmt: skip


def test_torchrun_two_gloo_ranks_train_the_vit_like_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank below (OMP_NUM_THREADS=1)
    try:
        assert main([*TINY, "--out", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "keepgym", *TINY, "--out", str(ddp)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # rank 0 alone reports
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((ddp / "summary.json").read_text())
    assert s2["world_size"] == 2 and "world_size" not in s1
    assert s2["steps_per_epoch"] == s1["steps_per_epoch"]  # the global batch is the single-process batch
    assert abs(s2["joint_full"]["test_accuracy"] - s1["joint_full"]["test_accuracy"]) < 0.15
    # equal shards: the averaged gradient is the global-batch gradient, so the ViTs agree up to rounding
    v1, v2 = load_model(single / "vit.pt"), load_model(ddp / "vit.pt")
    pairs = zip(v1.state_dict().values(), v2.state_dict().values(), strict=True)
    assert max((a - b).abs().max().item() for a, b in pairs) < 1e-4
    assert s2["agent"]["kept_patches"] == s1["agent"]["kept_patches"]  # the agent decided the same
    # rank 0 alone wrote: one agent log folder, one final log, one checkpoint
    tb = ddp / "tb"
    assert len([p for p in tb.iterdir() if p.name.startswith("agentvit_") and p.name != "agentvit_final"]) == 1
    assert {"vit.pt", "agent.zip", "summary.json", "config.json"} <= {p.name for p in ddp.iterdir()}
    assert (ddp / "checkpoint" / "0003" / "state.pt").is_file()  # one atomic folder per epoch
