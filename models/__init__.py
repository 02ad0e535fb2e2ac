"""keepgym model zoo: CIFAR CNNs matching the RL-Pruner release, a small ViT, and model files.

Build a model by name or by reference::

    model = create_model("resnet56", num_classes=100)          # 127.93M MACs / 0.86M params
    model = create_model("vgg11", num_classes=10, width_mult=0.25, in_chans=1)
    model = create_model("torchvision:resnet18", num_classes=10)     # any torchvision classifier, weights=None
    model = create_model("timm:resnet18", num_classes=10)            # any timm model (optional extra)
    model = create_model("my_pkg.nets:small_cnn", num_classes=10)    # a user's own factory or nn.Module class

A reference ``torchvision:NAME`` calls ``torchvision.models.get_model(NAME, weights=None,
num_classes=...)`` (with ``in_chans != 3`` the first 3-channel conv is replaced by one taking
``in_chans`` channels); ``timm:NAME`` calls ``timm.create_model(NAME, pretrained=False,
num_classes=..., in_chans=...)``; ``pkg.module:factory`` imports ``pkg.module`` and calls ``factory``
with those of ``num_classes`` / ``in_chans`` / ``width_mult`` its signature accepts. Weights always
come from keepgym's own model files, never from a download.

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
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from keepgym.models.densenet import densenet121
from keepgym.models.googlenet import googlenet
from keepgym.models.mobilenetv3 import mobilenetv3_large, mobilenetv3_small
from keepgym.models.resnet import resnet20, resnet32, resnet56, resnet110
from keepgym.models.serialization import (
    ModelLoadError,
    add_trusted_factories,
    load_model,
    load_model_with_extra,
    save_model,
)
from keepgym.models.vgg import vgg11, vgg13, vgg16, vgg19

__all__ = [
    "ModelLoadError",
    "add_trusted_factories",
    "create_model",
    "get_classifier",
    "list_models",
    "load_model",
    "resolve_model",
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
_VIT_NAMES = ("vit_cifar", "vit_medium", "vit_small", "vit_tiny")


#: Builder keywords that would fetch weights from elsewhere than a keepgym model file.
_FORBIDDEN_KWARGS = {
    "torchvision": ("weights", "progress"),
    "timm": ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"),
}
_REF_HELP = "a zoo name (see --list-models), torchvision:NAME, timm:NAME or pkg.module:factory"


def list_models() -> list[str]:
    """Return the zoo names accepted by :func:`create_model`, sorted.

    :func:`create_model` also accepts references ``torchvision:NAME``, ``timm:NAME`` and
    ``pkg.module:factory`` (see the module docstring).
    """
    return sorted([*_CNN_FACTORIES, *_VIT_NAMES])


def _zoo_factory(name: str) -> Callable[..., nn.Module]:
    if name in _CNN_FACTORIES:
        return _CNN_FACTORIES[name]
    if name in _VIT_NAMES:
        vit = importlib.import_module("keepgym.models.vit")
        factory = getattr(vit, name, None)
        if factory is None:
            raise ValueError(f"models/vit.py defines no factory named {name!r}")
        return factory
    raise ValueError(
        f"unknown model {name!r}; valid models: {', '.join(list_models())}, or torchvision:NAME, timm:NAME, "
        "pkg.module:factory"
    )


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    try:
        import torchvision.models as tvm
    except ImportError:
        raise ValueError(f"model 'torchvision:{name}' needs torchvision, which is not installed") from None
    names = tvm.list_models(module=tvm)  # the image classifiers only (not detection/segmentation/video)
    if name not in names:
        raise ValueError(f"torchvision has no classification model {name!r}; e.g. {', '.join(names[:8])}, ...")
    return tvm.get_model_builder(name)


def _timm_builder(name: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError:
        raise ValueError(f"model 'timm:{name}' needs timm: pip install 'keepgym[timm]'") from None
    if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r} (see timm.list_models())")
    return timm.create_model


def _import_factory(ref: str) -> Callable[..., nn.Module]:
    module_name, _, attr_path = ref.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"model reference {ref!r} must look like pkg.module:factory")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # The console script does not put the working folder on sys.path (``python -m`` does); look there
        # too, as uvicorn and gunicorn do for "module:app", so `keepgym train --model my_nets:cnn` works.
        cwd = os.getcwd()
        top = module_name.split(".")[0]
        if err.name != top or cwd in sys.path or not any(Path(cwd, p).exists() for p in (top, f"{top}.py")):
            raise ValueError(f"model {ref!r}: cannot import {module_name!r} ({err})") from None
        sys.path.append(cwd)
        try:
            obj = importlib.import_module(module_name)
        except ImportError as err2:
            raise ValueError(f"model {ref!r}: cannot import {module_name!r} ({err2})") from None
    except ImportError as err:
        raise ValueError(f"model {ref!r}: cannot import {module_name!r} ({err})") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {ref!r}: {module_name} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {ref!r}: {attr_path} is not callable")
    return obj


def resolve_model(name: str) -> Callable[..., nn.Module]:
    """The builder behind a model name or reference, without building anything.

    Args:
        name: A zoo name (:func:`list_models`), ``torchvision:NAME``, ``timm:NAME`` or
            ``pkg.module:factory`` (a function or ``nn.Module`` class; ``factory`` may be dotted).

    Returns:
        The callable that :func:`create_model` will call.

    Raises:
        ValueError: One line saying why the name does not resolve (unknown name, missing library,
            module that does not import, attribute that does not exist).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be {_REF_HELP}, got {name!r}")
    prefix, sep, rest = name.partition(":")
    if not sep:
        return _zoo_factory(name)
    if prefix == "torchvision":
        return _torchvision_builder(rest)
    if prefix == "timm":
        return _timm_builder(rest)
    return _import_factory(name)


def _accepted(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    """Keyword names ``fn`` accepts and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return set(), True
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}, var_kw


def _replace_input_conv(model: nn.Module, in_chans: int, name: str) -> None:
    """Swap the first conv that reads 3-channel images for one reading ``in_chans`` channels."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            conv = nn.Conv2d(
                in_chans,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups if module.groups == 1 else in_chans,
                module.bias is not None,
                module.padding_mode,
            )
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, conv)
            return
    raise ValueError(f"{name}: found no 3-channel input conv to adapt to in_chans={in_chans}")


def _build(name: str, builder: Callable[..., nn.Module], all_kwargs: dict[str, Any]) -> nn.Module:
    prefix, sep, rest = name.partition(":")
    kwargs = dict(all_kwargs)
    if sep and prefix in _FORBIDDEN_KWARGS:
        bad = sorted(set(kwargs) & set(_FORBIDDEN_KWARGS[prefix]))
        if bad:
            raise ValueError(f"{name}: {', '.join(bad)} not accepted (keepgym loads weights from its own model files)")
    if not sep:
        return builder(**kwargs)
    width_mult, in_chans = kwargs.pop("width_mult"), kwargs.pop("in_chans")
    if prefix == "torchvision":
        if width_mult != 1.0:
            kwargs["width_mult"] = width_mult
        try:
            model = builder(weights=None, **kwargs)
        except TypeError as err:
            raise ValueError(f"{name}: {err}") from None
        if in_chans != 3:
            _replace_input_conv(model, in_chans, name)
        return model
    if prefix == "timm":
        if width_mult != 1.0:
            raise ValueError(f"{name}: timm models take no width_mult; pick a smaller timm variant instead")
        try:
            return builder(rest, pretrained=False, in_chans=in_chans, **kwargs)
        except TypeError as err:
            raise ValueError(f"{name}: {err}") from None
    accepted, var_kw = _accepted(builder)
    for key, value, default in (("in_chans", in_chans, 3), ("width_mult", width_mult, 1.0)):
        if key in accepted or var_kw:
            kwargs[key] = value
        elif value != default:
            raise ValueError(f"{name} takes no {key} argument, but {key}={value} is needed")
    if "num_classes" not in accepted and not var_kw:
        kwargs.pop("num_classes")  # checked against the data by whoever uses the model
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def create_model(
    name: str, num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, **kwargs: Any
) -> nn.Module:
    """Build a freshly initialised model by name or reference.

    Args:
        name: One of :func:`list_models`, or ``torchvision:NAME``, ``timm:NAME``, ``pkg.module:factory``
            (see the module docstring).
        num_classes: Number of output logits.
        width_mult: Multiplier for every channel count (e.g. 0.25 for CPU-sized runs). Zoo models and
            builders that take it (torchvision MobileNets, a factory with a ``width_mult`` argument).
        in_chans: Input image channels (1 for grey datasets such as digits or FashionMNIST).
        **kwargs: Extra constructor arguments of the model (e.g. ``dropout``). Must be plain Python
            values (numbers, strings, bools, tuples/lists of them) so the spec can be saved.

    Returns:
        The model, with ``model.keepgym_spec = {"name": name, "kwargs": {...}}`` set.

    Raises:
        ValueError: If ``name`` does not resolve or the builder refuses the arguments (one line).
    """
    builder = resolve_model(name)
    prefix, sep, _ = name.partition(":")
    if sep and prefix not in ("torchvision", "timm"):
        add_trusted_factories([name])  # the user named this factory: its model files may be rebuilt
    all_kwargs = {"num_classes": int(num_classes), "width_mult": float(width_mult), "in_chans": int(in_chans)}
    all_kwargs.update(kwargs)
    model = _build(name, builder, all_kwargs)
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
