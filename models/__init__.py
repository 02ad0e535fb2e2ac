"""keepgym model zoo: CIFAR CNNs matching the RL-Pruner release, a small ViT, and model files.

Build a model by name::

    model = create_model("resnet56", num_classes=100)          # 127.93M MACs / 0.86M params
    model = create_model("vgg11", num_classes=10, width_mult=0.25, in_chans=1)

Every model built here carries ``model.keepgym_spec = {"name": ..., "kwargs": {...}}`` (the exact
constructor call), which ``save_model`` stores next to the weights and per-layer widths so that a
model pruned in place (e.g. by Torch-Pruning) can be rebuilt by ``load_model``.

Every model exposes ``model.get_classifier()`` returning the final ``nn.Linear`` (the logits
layer), which pruning code must leave untouched; ``get_classifier(model)`` here does the same for
any module (falling back to the last ``nn.Linear``). CNNs also offer ``forward_features`` /
``forward_head`` in the style of timm.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from keepgym.models.densenet import densenet121
from keepgym.models.googlenet import googlenet
from keepgym.models.mobilenetv3 import mobilenetv3_large, mobilenetv3_small
from keepgym.models.resnet import resnet20, resnet32, resnet56, resnet110
from keepgym.models.serialization import ModelLoadError, load_model, load_model_with_extra, save_model
from keepgym.models.vgg import vgg11, vgg13, vgg16, vgg19

__all__ = [
    "ModelLoadError",
    "create_model",
    "get_classifier",
    "list_models",
    "load_model",
    "load_model_with_extra",
    "save_model",
]

_CNN_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "googlenet": googlenet,
    "mobilenetv3_large": mobilenetv3_large,
    "mobilenetv3_small": mobilenetv3_small,
    "densenet121": densenet121,
}
# Factories with these names live in models/vit.py and are imported on first use, so that the CNNs
# keep working whatever the state of the ViT module.
_VIT_NAMES = ("vit_cifar", "vit_small", "vit_tiny")


def list_models() -> list[str]:
    """Return the names accepted by :func:`create_model`, sorted."""
    return sorted([*_CNN_FACTORIES, *_VIT_NAMES])


def _factory(name: str) -> Callable[..., nn.Module]:
    if name in _CNN_FACTORIES:
        return _CNN_FACTORIES[name]
    if name in _VIT_NAMES:
        vit = importlib.import_module("keepgym.models.vit")
        factory = getattr(vit, name, None)
        if factory is None:
            raise ValueError(f"models/vit.py defines no factory named {name!r}")
        return factory
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")


def create_model(
    name: str, num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, **kwargs: Any
) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: One of :func:`list_models`.
        num_classes: Number of output logits.
        width_mult: Multiplier for every channel count (e.g. 0.25 for CPU-sized runs).
        in_chans: Input image channels (1 for grey datasets such as digits or FashionMNIST).
        **kwargs: Extra constructor arguments of the model (e.g. ``dropout``). Must be plain Python
            values (numbers, strings, bools, tuples/lists of them) so the spec can be saved.

    Returns:
        The model, with ``model.keepgym_spec = {"name": name, "kwargs": {...}}`` set.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the valid names).
    """
    factory = _factory(name)
    all_kwargs = {"num_classes": int(num_classes), "width_mult": float(width_mult), "in_chans": int(in_chans)}
    all_kwargs.update(kwargs)
    model = factory(**all_kwargs)
    model.keepgym_spec = {"name": name, "kwargs": dict(all_kwargs)}
    return model


def get_classifier(model: nn.Module) -> nn.Linear:
    """Return the layer producing the class logits of ``model``.

    Uses ``model.get_classifier()`` when the model defines it, else the last ``nn.Linear``
    registered in the model.

    Raises:
        ValueError: If the model has no ``nn.Linear`` at all.
    """
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        return getter()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]
