"""Model files: weights-only round trips, pruned models, clear errors on bad files."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from keepgym.envs.metrics import count_macs_params
from keepgym.models import ModelLoadError, create_model, load_model, load_model_with_extra, save_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: avoid OpenMP spin-wait slowdowns on busy machines.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _assert_same_model(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    assert torch.equal(_logits(a, x), _logits(b, x))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert count_macs_params(a, tuple(x[:1].shape)) == count_macs_params(b, tuple(x[:1].shape))


def test_round_trip_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1)
    # Non-default BN statistics must survive too.
    model.train()
    model(torch.randn(8, 1, 32, 32))
    path = save_model(model, tmp_path / "sub" / "model.pt", accuracy=0.5, stage=3, history=[1.0, 2.0])
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "keepgym-model" and raw["version"] == 1
    assert raw["spec"] == {"name": "vgg11", "kwargs": model.keepgym_spec["kwargs"]}
    assert raw["widths"]["features.0"]["attrs"]["out_channels"] == 8
    loaded, extra = load_model_with_extra(path)
    assert extra == {"accuracy": 0.5, "stage": 3, "history": [1.0, 2.0]}
    assert loaded.keepgym_spec == model.keepgym_spec
    _assert_same_model(model, loaded, torch.randn(3, 1, 32, 32))
    # Atomic write: no temporary file left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_round_trip_resnet20_pruned_by_metapruner(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, width_mult=0.25)
    model.eval()
    example = torch.randn(2, 3, 32, 32)
    before = count_macs_params(model)
    # Torch-Pruning < 1.3 calls the ratio ch_sparsity (the lowest supported release is tested too)
    params = inspect.signature(tp.pruner.MetaPruner.__init__).parameters
    ratio = {"pruning_ratio": 0.5} if "pruning_ratio" in params else {"ch_sparsity": 0.5}
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        ignored_layers=[model.get_classifier()],
        **ratio,
    )
    pruner.step()
    after = count_macs_params(model)
    assert after[0] < before[0] and after[1] < before[1]
    path = save_model(model, tmp_path / "pruned.pt")
    loaded = load_model(path)
    assert loaded.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels < 4
    _assert_same_model(model, loaded, torch.randn(3, 3, 32, 32))


def test_round_trip_mobilenetv3_small_pruned_depthwise(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small", num_classes=10, width_mult=0.5)
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 3, 32, 32))
    block = model.bneck[3]
    expand = block.conv1.out_channels
    group = graph.get_pruning_group(block.conv1, tp.prune_conv_out_channels, idxs=[0, 2, 5])
    assert graph.check_pruning_group(group)
    group.prune()
    # The depthwise conv follows the expansion: fewer channels *and* fewer groups.
    assert block.conv2.groups == block.conv2.out_channels == expand - 3
    path = save_model(model, tmp_path / "pruned.pt", note="dw")
    loaded = load_model(path)
    assert loaded.bneck[3].conv2.groups == expand - 3
    _assert_same_model(model, loaded, torch.randn(3, 3, 32, 32))


def test_round_trip_vit_if_available(tmp_path: Path) -> None:
    pytest.importorskip("keepgym.models.vit")
    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=4)
    loaded = load_model(save_model(model, tmp_path / "vit.pt"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(model, x), _logits(loaded, x))


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    return save_model(create_model("resnet20", width_mult=0.125), tmp_path / "good.pt")


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    # No chained torch/pickle traceback under the one-line message.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    return message


def test_truncated_file(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    _one_line_error(saved, "truncated or corrupt")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    _one_line_error(path, "truncated or corrupt")


def test_plain_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(create_model("resnet20", width_mult=0.125).state_dict(), path)
    _one_line_error(path, "not a keepgym model file.*plain state_dict")


def test_spec_widths_mismatch(saved: Path, tmp_path: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    payload["spec"]["name"] = "resnet32"  # more blocks than the weights have
    bad = tmp_path / "mismatch.pt"
    torch.save(payload, bad)
    _one_line_error(bad, "do not match")

    payload = torch.load(saved, weights_only=True)
    payload["widths"]["nonexistent.layer"] = {"type": "Conv2d", "attrs": {}}
    torch.save(payload, bad)
    _one_line_error(bad, "does not exist")

    payload = torch.load(saved, weights_only=True)
    payload["spec"]["name"] = "no_such_net"
    torch.save(payload, bad)
    _one_line_error(bad, "cannot rebuild architecture 'no_such_net'")


def test_missing_file_and_unsaveable_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="keepgym_spec"):
        save_model(nn.Linear(2, 2), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="plain data"):
        save_model(create_model("resnet20", width_mult=0.125), tmp_path / "x.pt", bad=object())
    assert not list(tmp_path.iterdir())
