"""`keepgym evaluate`: figures of a saved tiny model, clear one-line errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch

from keepgym.envs.metrics import count_macs_params
from keepgym.experiments.cli import main
from keepgym.models import create_model, save_model


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1)
    path = tmp_path_factory.mktemp("eval") / "model.pt"
    save_model(model, path)
    macs, params = count_macs_params(model.eval(), (1, 1, 32, 32))
    return path, macs, params


def test_evaluate_prints_table_and_writes_json(tiny_model_file, tmp_path, capsys):
    path, macs, params = tiny_model_file
    out = tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(path),
            "--dataset",
            "digits",
            "--latency-repeats",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "test_accuracy" in printed and "macs" in printed and "latency_ms_b64" in printed
    result = json.loads(out.read_text())
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["macs"] == macs and result["params"] == params
    assert result["latency_ms_b1"] > 0 and result["latency_ms_b64"] > 0


def test_evaluate_val_split_without_latency(tiny_model_file, capsys):
    path, _, _ = tiny_model_file
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(path),
                "--dataset",
                "digits",
                "--split",
                "val",
                "--latency-repeats",
                "0",
            ]
        )
        == 0
    )
    assert "val_accuracy" in capsys.readouterr().out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_truncated_file_is_a_clear_error(tiny_model_file, tmp_path, capsys):
    path, _, _ = tiny_model_file
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["evaluate", "--checkpoint", str(broken), "--dataset", "digits"]) == 2
    assert "broken.pt" in _one_error_line(capsys)


def test_foreign_and_missing_files_and_bad_names(tiny_model_file, tmp_path, capsys):
    path, _, _ = tiny_model_file
    foreign = tmp_path / "state_dict.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    assert main(["evaluate", "--checkpoint", str(foreign), "--dataset", "digits"]) == 2
    assert "not a keepgym model file" in _one_error_line(capsys)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--dataset", "digits"]) == 2
    assert "no such file" in _one_error_line(capsys)
    assert main(["evaluate", "--checkpoint", str(path), "--dataset", "mnist"]) == 2
    assert "valid datasets" in _one_error_line(capsys)
    assert main(["evaluate", "--checkpoint", str(path), "--dataset", "digits", "--split", "dev"]) == 2
    assert "valid splits" in _one_error_line(capsys)
    # a grey-image model on 3-channel images
    assert (
        main(["evaluate", "--checkpoint", str(path), "--dataset", "synthetic", "--latency-repeats", "0"]) == 2
    )
    assert "channel" in _one_error_line(capsys)


def test_val_split_is_the_one_the_model_file_records(tmp_path, capsys):
    """A model trained with seed 1 and val_size 0.2 is scored on its own validation images, not a re-drawn split."""
    from keepgym.envs.data import load_dataset
    from keepgym.envs.splits import split_record

    data = load_dataset("digits", val_size=0.2, seed=1)
    model = create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1)
    save_model(model, tmp_path / "m.pt", split=split_record(data, seed=1, val_size=0.2, train_size=None))
    args = ["evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--dataset", "digits", "--split", "val",
            "--latency-repeats", "0", "--out", str(tmp_path / "e.json")]  # fmt: skip
    assert main(args) == 0
    figures = json.loads((tmp_path / "e.json").read_text())
    assert figures["images"] == len(data.val_y) != len(load_dataset("digits").val_y)  # 0.2 of train, not 0.1
    expected = load_dataset("digits", val_size=0.2, seed=1)
    from keepgym.envs.metrics import evaluate_accuracy

    acc = evaluate_accuracy(model.eval(), expected.val_x, expected.val_y, expected.normalize)
    assert figures["val_accuracy"] == pytest.approx(acc)
    capsys.readouterr()
    # A file whose record does not match the data (another split's fingerprint) is refused in one line.
    record = split_record(data, seed=1, val_size=0.2, train_size=None) | {"val_sha256": "0" * 64}
    save_model(model, tmp_path / "bad.pt", split=record)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "bad.pt"), "--dataset", "digits", "--split", "val",
                 "--latency-repeats", "0"]) == 2  # fmt: skip
    assert "validation split differs" in _one_error_line(capsys)
