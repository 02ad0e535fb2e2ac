"""CIFAR CNN zoo: shapes, gradients, published sizes, the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keepgym.envs.metrics import count_macs_params
from keepgym.models import create_model, get_classifier, list_models

CNN_NAMES = [
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "googlenet",
    "mobilenetv3_large",
    "mobilenetv3_small",
    "densenet121",
]

# RL-Pruner README / DESIGN.md: (MACs, params) in millions, CIFAR-100 head, 1x3x32x32, thop counting.
PUBLISHED = {
    "vgg19": (418.63, 39.33),
    "resnet56": (127.93, 0.86),
    "densenet121": (907.93, 7.05),
    "googlenet": (535.66, 6.40),
    "mobilenetv3_large": (7.47, 4.03),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waiting
    # makes them up to 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", CNN_NAMES)
def test_rgb_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, width_mult=0.125)
    # Dropout off so that no weight column can be zeroed by chance; BN stays in training mode.
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout2d):
            m.p = 0.0
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/invalid gradient for {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"all-zero gradient for {zero}"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


@pytest.mark.parametrize("name", CNN_NAMES)
def test_grey_inputs_32_and_28(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, width_mult=0.125, in_chans=1)
    for size in (32, 28):
        out = model(torch.randn(2, 1, size, size))
        assert out.shape == (2, 5)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_macs_and_params(name: str) -> None:
    macs_m, params_m = PUBLISHED[name]
    model = create_model(name, num_classes=100)
    macs, params = count_macs_params(model, (1, 3, 32, 32))
    assert macs / 1e6 == pytest.approx(macs_m, rel=0.005)
    assert params / 1e6 == pytest.approx(params_m, rel=0.005)


@pytest.mark.parametrize("name", CNN_NAMES)
def test_classifier_and_spec(name: str) -> None:
    extra = {"dropout": 0.1} if name.startswith(("vgg", "googlenet", "mobilenet")) else {}
    model = create_model(name, num_classes=13, width_mult=0.125, in_chans=1, **extra)
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == 13
    assert get_classifier(model) is head
    assert model.keepgym_spec["name"] == name
    assert model.keepgym_spec["kwargs"]["num_classes"] == 13
    assert model.keepgym_spec["kwargs"]["width_mult"] == 0.125
    assert model.keepgym_spec["kwargs"]["in_chans"] == 1
    assert all(model.keepgym_spec["kwargs"][k] == v for k, v in extra.items())
    # The spec rebuilds the same architecture.
    twin = create_model(name, **model.keepgym_spec["kwargs"])
    assert [p.shape for p in twin.parameters()] == [p.shape for p in model.parameters()]


def test_width_mult_shrinks_models() -> None:
    small = sum(p.numel() for p in create_model("resnet20", width_mult=0.5).parameters())
    full = sum(p.numel() for p in create_model("resnet20").parameters())
    assert small < full / 3


def test_no_shared_activation_modules() -> None:
    # Torch-Pruning and per-layer hooks need one module per use.
    model = create_model("mobilenetv3_small", width_mult=0.25)
    calls: dict[int, int] = {}
    handles = [
        m.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
        for m in model.modules()
        if isinstance(m, nn.ReLU | nn.Hardswish | nn.Hardsigmoid)
    ]
    model.eval()
    model(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    assert calls and max(calls.values()) == 1


def test_list_models_and_unknown_name() -> None:
    names = list_models()
    assert set(CNN_NAMES) <= set(names)
    assert {"vit_cifar", "vit_small", "vit_tiny"} <= set(names)
    with pytest.raises(ValueError, match="unknown model 'resnet57'.*resnet56"):
        create_model("resnet57")
