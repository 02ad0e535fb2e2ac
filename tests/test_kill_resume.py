"""Real SIGKILLs at chosen instants of ``train`` and ``prune`` (``--model`` and ``--env`` forms), then ``--resume``.

A driver process runs the command with ``torch.save`` or ``os.replace`` wrapped so that their N-th call
kills the process with SIGKILL (no cleanup code runs):

* ``mid-write``: half of the file's bytes are written and flushed, then SIGKILL;
* ``before-rename``: SIGKILL just before the N-th ``os.replace`` (a finished temporary file or folder);
* ``after-rename``: SIGKILL just after it (a new checkpoint in place, the next steps not done).

The same command plus ``--resume`` (a fresh start when the kill came before any run existed) must end
with a model bit-identical to the uninterrupted run's and the same summary, timings aside. Slow: each case
starts two Python processes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import keepgym.experiments.prune as prune_cmd
from keepgym.models import create_model, save_model

pytestmark = pytest.mark.slow

DRIVER = r'''
import io, os, signal, sys
import torch
point, n = sys.argv[1], int(sys.argv[2])
count = {"n": 0}
if point == "mid-write":
    real_save = torch.save
    def save(obj, f, *a, **k):
        count["n"] += 1
        if count["n"] == n and hasattr(f, "write"):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = save
else:
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        count["n"] += 1
        if count["n"] == n and point == "before-rename":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real_replace(src, dst, *a, **k)
        if count["n"] == n and point == "after-rename":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    os.replace = replace
from keepgym.experiments.cli import main
sys.exit(main(sys.argv[3:]))
'''

TRAIN = [
    "train", "--model", "vgg11", "--dataset", "digits", "--width-mult", "0.125", "--epochs", "3",
    "--train-size", "300", "--batch-size", "64", "--no-progress", "--seed", "2",
]  # fmt: skip
PRUNE_TAIL = [
    "--sparsity", "0.5", "--stage-sparsity", "0.25", "--sample-num", "2", "--rounds-per-stage", "1",
    "--finetune-epochs", "1", "--final-finetune-epochs", "2", "--calibration-size", "16", "--latency-repeats", "0",
    "--device", "cpu", "--no-progress", "--seed", "3",
]  # fmt: skip
KILLS = [("mid-write", 2), ("mid-write", 4), ("before-rename", 3), ("before-rename", 7), ("after-rename", 4),
         ("after-rename", 9)]


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "kill_driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "model.pt"
    save_model(create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1), path)
    return path


def _commands(kind: str, base: Path) -> tuple[list[str], str]:
    if kind == "train":
        return TRAIN, "model.pt"
    if kind == "prune-model":
        argv = ["prune", "--model", "vgg11", "--dataset", "digits", "--checkpoint", str(base)]
    else:
        argv = ["prune", "--env", "RLPrune-Digits-v0", "--width-mult", "0.125", "--algo", "uniform"]
    return [*argv, *PRUNE_TAIL], "compressed.pt"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def _strip(obj):
    timing = set(prune_cmd.TIMING_KEYS) | {"train_seconds", "finished"}
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in timing}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def references(tmp_path_factory, base_checkpoint):
    refs = {}
    for kind in ("train", "prune-model", "prune-env"):
        argv, _ = _commands(kind, base_checkpoint)
        out = tmp_path_factory.mktemp("ref") / kind
        proc = _run(["-m", "keepgym", *argv, "--out", str(out)])
        assert proc.returncode == 0, proc.stderr[-2000:]
        refs[kind] = out
    return refs


@pytest.mark.parametrize("point,n", KILLS, ids=[f"{p}-{n}" for p, n in KILLS])
@pytest.mark.parametrize("kind", ["train", "prune-model", "prune-env"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, driver, base_checkpoint, references, kind, point, n):
    argv, model_file = _commands(kind, base_checkpoint)
    out = tmp_path / "run"
    killed = _run([str(driver), point, str(n), *argv, "--out", str(out)])
    assert killed.returncode == -signal.SIGKILL, f"not killed (rc {killed.returncode}): {killed.stderr[-1000:]}"
    resumed = _run(["-m", "keepgym", *argv, "--out", str(out), "--resume"])
    if resumed.returncode == 2 and "holds no run to resume" in resumed.stderr:
        resumed = _run(["-m", "keepgym", *argv, "--out", str(out)])  # killed before the run existed
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    ref = references[kind]
    a = torch.load(ref / model_file, weights_only=True)["state_dict"]
    b = torch.load(out / model_file, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summaries = [_strip(json.loads((d / "summary.json").read_text())) for d in (ref, out)]
    assert summaries[0] == summaries[1]
    assert [p for p in out.rglob(".*") if p.name != ".lock"] == []  # no temporary leftovers
