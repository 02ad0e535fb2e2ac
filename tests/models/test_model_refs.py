"""Models from anywhere: torchvision:NAME, timm:NAME and pkg.module:factory references, pruned, saved and
reloaded with ``torch.load(weights_only=True)``; pickled modules and crafted factories refused."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from keepgym.envs.prune_env import PruneEnv
from keepgym.models import ModelLoadError, create_model, load_model, resolve_model, save_model
from keepgym.models.serialization import atomic_save

FACTORY_SOURCE = Path(__file__).with_name("factory_nets.py")


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """``factory_nets.py`` as a user's own module ``kg_user_nets`` in a folder on sys.path."""
    folder = tmp_path_factory.mktemp("user_code")
    shutil.copy(FACTORY_SOURCE, folder / "kg_user_nets.py")
    sys.path.insert(0, str(folder))
    yield "kg_user_nets"
    sys.path.remove(str(folder))
    sys.modules.pop("kg_user_nets", None)


def _prune_one_stage(model_name: str, **env_kwargs) -> nn.Module:
    """Prune a random model on digits (1-channel 32x32) for two stages; return the pruned model."""
    env = PruneEnv(
        model_name=model_name,
        dataset="digits",
        pretrained=False,
        target_sparsity=0.4,
        stage_sparsity=0.2,
        eval_size=32,
        calibration_size=16,
        **env_kwargs,
    )
    env.reset(seed=0)
    for _ in range(2):
        env.step(np.ones(env.num_groups, dtype=np.float32))
    assert env.group_widths.sum() < env.initial_group_widths.sum()
    return env.model.eval()


def test_torchvision_reference_takes_classes_and_grey_images():
    model = create_model("torchvision:resnet18", num_classes=7, in_chans=1).eval()
    assert model.keepgym_spec == {
        "name": "torchvision:resnet18",
        "kwargs": {"num_classes": 7, "width_mult": 1.0, "in_chans": 1},
    }
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_torchvision_mobilenet_takes_width_mult():
    narrow = create_model("torchvision:mobilenet_v3_small", num_classes=3, width_mult=0.25)
    wide = create_model("torchvision:mobilenet_v3_small", num_classes=3)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())


def test_timm_reference():
    pytest.importorskip("timm")
    model = create_model("timm:mobilenetv3_small_050", num_classes=5, in_chans=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_factory_function_and_module_class(user_module):
    net = create_model(f"{user_module}:small_net", num_classes=4, in_chans=1, width_mult=0.5)
    assert net.head.out_features == 4 and net.stem[0].in_channels == 1 and net.head.in_features == 4
    cls = create_model(f"{user_module}:SmallNet", num_classes=6, width=4)
    assert type(cls).__name__ == "SmallNet" and cls.head.out_features == 6
    assert cls.keepgym_spec["kwargs"]["width"] == 4


def test_factory_is_found_in_the_working_folder(tmp_path, monkeypatch):
    shutil.copy(FACTORY_SOURCE, tmp_path / "kg_cwd_nets.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "kg_cwd_nets", raising=False)
    model = create_model("kg_cwd_nets:small_net", num_classes=3)
    assert model.head.out_features == 3


@pytest.mark.parametrize(
    "name, message",
    [
        ("torchvision:resnet999", "torchvision has no classification model 'resnet999'"),
        ("torchvision:fasterrcnn_resnet50_fpn", "no classification model"),
        ("kg_no_such_package_xyz:f", "cannot import 'kg_no_such_package_xyz'"),
        ("keepgym.models:no_such_factory", "has no attribute 'no_such_factory'"),
        ("resnet999", "valid models: densenet121, googlenet, mobilenetv3_large"),
        ("resnet999", "or torchvision:NAME, timm:NAME, pkg.module:factory"),
        ("just_a_module:", "pkg.module:factory"),
    ],
)
def test_unresolvable_references_say_why_in_one_line(name, message):
    with pytest.raises(ValueError) as info:
        resolve_model(name)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_download_keywords_are_refused():
    with pytest.raises(ValueError, match="weights"):
        create_model("torchvision:resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="width_mult"):
        create_model("torchvision:resnet18", width_mult=0.5)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("torchvision:resnet18", {}),
        ("torchvision:mobilenet_v3_small", {"width_mult": 0.25}),
        ("factory", {}),
        ("timm:mobilenetv3_small_050", {}),
    ],
)
def test_pruned_model_saves_and_reloads_weights_only_with_identical_logits(name, kwargs, user_module, tmp_path):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    if name == "factory":
        name = f"{user_module}:small_net"
    pruned = _prune_one_stage(name, **kwargs)
    path = save_model(pruned, tmp_path / "pruned.pt", stage=2)
    raw = torch.load(path, weights_only=True)  # no pickled module inside
    assert raw["spec"]["name"] == name
    loaded = load_model(path).eval()
    assert type(loaded) is type(pruned)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    widths = {n: m.out_channels for n, m in loaded.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths == {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}


def test_grouped_conv_is_refused_naming_the_layer(user_module):
    with pytest.raises(NotImplementedError, match=r"grouped conv 'blocks\.\d\.mix\.0'"):
        PruneEnv(model_name=f"{user_module}:grouped_net", dataset="digits", pretrained=False)


def test_pickled_whole_module_is_refused_as_such_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "whole.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(ModelLoadError, match="pickled Python object") as info:
        load_model(path)
    assert "truncated" not in str(info.value)
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "seq.pt")
    with pytest.raises(ModelLoadError, match=r"pickled Python object \(torch\.nn\.modules\.container\.Sequential\)"):
        load_model(tmp_path / "seq.pt")
    assert not marker.exists()


def test_plain_state_dict_message_says_how_to_convert(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(create_model("torchvision:resnet18").state_dict(), path)
    with pytest.raises(ModelLoadError, match="plain state_dict.*no architecture.*create_model"):
        load_model(path)


@pytest.mark.parametrize("name", ["subprocess:getoutput", "os:system", "torch.hub:load", "builtins:eval"])
def test_crafted_factory_in_a_model_file_is_refused(name, tmp_path):
    marker = tmp_path / "ran"
    payload = {
        "format": "keepgym-model",
        "version": 1,
        "spec": {"name": name, "kwargs": {"cmd": f"touch {marker}"}},
        "widths": {},
        "state_dict": {},
        "extra": {},
    }
    atomic_save(payload, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="refusing model factory"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


def test_factory_reexported_from_the_standard_library_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "kg_sneaky.py").write_text("from subprocess import getoutput as make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    payload = {
        "format": "keepgym-model",
        "version": 1,
        "spec": {"name": "kg_sneaky:make", "kwargs": {"cmd": f"touch {marker}"}},
        "widths": {},
        "state_dict": {},
        "extra": {},
    }
    atomic_save(payload, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="refusing model factory 'kg_sneaky:make'"):
        load_model(tmp_path / "evil.pt", trust_factory="kg_sneaky:make")  # even when named
    assert not marker.exists()


def test_a_factory_the_user_did_not_name_is_never_imported(tmp_path, monkeypatch):
    """A model file naming code of some module on the path: nothing is imported or run until the user names it."""
    marker = tmp_path / "imported"
    (tmp_path / "kg_planted.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from torch import nn\n"
        "def make(num_classes=10, in_chans=3):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 4 * 4, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kg_planted", raising=False)
    payload = {
        "format": "keepgym-model",
        "version": 1,
        "spec": {"name": "kg_planted:make", "kwargs": {"num_classes": 3, "in_chans": 1}},
        "widths": {},
        "state_dict": {},
        "extra": {},
    }
    atomic_save(payload, tmp_path / "planted.pt")
    with pytest.raises(ModelLoadError, match=r"only when you name it: --model kg_planted:make"):
        load_model(tmp_path / "planted.pt")
    assert not marker.exists() and "kg_planted" not in sys.modules


def test_save_model_without_spec_says_how_to_build_one(tmp_path):
    with pytest.raises(ValueError, match=r"create_model\('torchvision:NAME'"):
        save_model(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m.pt")
