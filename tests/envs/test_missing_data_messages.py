"""A missing dataset or checkpoint names the fix in the caller's language: keyword from Python, flag from the CLI."""

import gymnasium as gym
import pytest
import torch

import keepgym  # noqa: F401 - registers the env ids
from keepgym.envs.data import DatasetNotFoundError
from keepgym.experiments.cli import main
from keepgym.models import create_model, save_model


@pytest.fixture
def cifar_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vgg.pt"
    save_model(create_model("vgg11", num_classes=10, width_mult=0.125), path)
    return path


def test_python_caller_is_told_the_keyword(tmp_path, cifar_checkpoint):
    with pytest.raises(DatasetNotFoundError) as err:
        gym.make("RLPrune-VGG19-v0", model_name="vgg11", dataset="cifar10", data_root=str(tmp_path / "none"),
                 checkpoint=str(cifar_checkpoint), width_mult=0.125)  # fmt: skip
    assert "download=True" in str(err.value) and "data_root=" in str(err.value)


def test_python_caller_is_told_the_checkpoint_keyword(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEPGYM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint=PATH \(CLI: --checkpoint PATH\)"):
        gym.make("RLPrune-VGG19-v0", data_root=str(tmp_path / "none"))


def test_cli_caller_is_told_the_flag(tmp_path, cifar_checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["prune", "--model", "vgg11", "--dataset", "cifar10", "--data-root", str(tmp_path / "empty"),
            "--checkpoint", str(cifar_checkpoint), "--width-mult", "0.125", "--sparsity", "0.5",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--download" in err and "Traceback" not in err
