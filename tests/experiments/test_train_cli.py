"""`keepgym train`: outputs, resume equivalence, clear errors, NaN guard."""

import json

import pytest
import torch

from keepgym.envs.data import load_dataset
from keepgym.envs.trainer import Trainer
from keepgym.experiments.cli import main
from keepgym.models import create_model, load_model

TINY = [
    "--model",
    "vgg11",
    "--dataset",
    "digits",
    "--width-mult",
    "0.125",
    "--epochs",
    "2",
    "--train-size",
    "300",
    "--batch-size",
    "64",
    "--no-progress",
]


def _summary(path):
    s = json.loads((path / "summary.json").read_text())
    for k in ("train_seconds", "finished"):
        s.pop(k)
    return s


def test_train_writes_outputs(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    for name in ("model.pt", "summary.json", "config.json", "checkpoints/002/state.pt", "checkpoints/002/best.pt"):
        assert (out / name).exists(), name
    assert any((out / "tb" / "train").glob("events.out.tfevents*"))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_accuracy", "test_accuracy", "macs", "params", "train_seconds"):
        assert key in summary
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["macs"] > 0
    raw = torch.load(out / "model.pt", weights_only=True)
    assert raw["format"] == "keepgym-model"
    # refuses to overwrite without --force
    assert main(["train", *TINY, "--out", str(out)]) == 2
    assert main(["train", *TINY, "--out", str(out), "--force"]) == 0


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *TINY, "--out", str(full)]) == 0

    calls = {"n": 0}
    original = Trainer.train_epoch

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    assert main(["train", *TINY, "--out", str(cut)]) == 130
    assert (cut / "checkpoints/001/state.pt").exists() and not (cut / "summary.json").exists()
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert main(["train", *TINY, "--out", str(cut), "--resume"]) == 0
    a, b = load_model(full / "model.pt").state_dict(), load_model(cut / "model.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _summary(full) == _summary(cut)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "vgg99"], "valid models"),
        (["--epochs", "0"], "--epochs"),
        (["--dataset", "mnist"], None),  # argparse choices: exit status 2
    ],
)
def test_bad_arguments(tmp_path, capsys, extra, message):
    args = ["train", *TINY, *extra, "--out", str(tmp_path / "x")]
    if message is None:
        with pytest.raises(SystemExit) as err:
            main(args)
        assert err.value.code == 2
        return
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()  # validated before any work


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert (
        main(["train", *TINY[:-3], "--batch-size", "32", "--no-progress", "--out", str(out), "--resume"]) == 2
    )
    assert "batch_size" in capsys.readouterr().err


def test_nan_guard_restores_and_lowers_lr(monkeypatch):
    data = load_dataset("digits", train_size=200)
    model = create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1)
    trainer = Trainer(model, data, epochs=2, batch_size=50)
    lr0 = trainer.scheduler.base_lrs[0]
    real_forward = model.forward
    calls = {"n": 0}

    def poisoned(x):
        calls["n"] += 1
        out = real_forward(x)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(model, "forward", poisoned)
    stats = trainer.train_epoch()
    assert stats.diverged and trainer.divergence_events
    assert trainer.scheduler.base_lrs[0] == pytest.approx(lr0 * 0.1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    stats = trainer.train_epoch()  # training goes on
    assert not stats.diverged and trainer.epoch == 2
    assert len(trainer.divergence_events) == 1
