"""Model files: weights plus the architecture spec and per-layer widths, never a pickled module.

A keepgym model file is a ``torch.save``'d dict of plain values and tensors, so it loads with
``torch.load(path, weights_only=True)``::

    {"format": "keepgym-model", "version": 1,
     "spec": {"name": "resnet56", "kwargs": {"num_classes": 100, ...}},   # model.keepgym_spec
     # or "torchvision:resnet18", "timm:NAME", "pkg.module:factory" (keepgym.models.create_model)
     "widths": {module_name: {"type": "Conv2d", "attrs": {"in_channels": 16, "groups": 1, ...}}},
     "state_dict": {...}, "extra": {...}}

``widths`` records the plain attributes (ints, floats, strings, tuples) of every submodule. A model
pruned in place by Torch-Pruning has edited ``in_channels`` / ``out_channels`` / ``groups`` /
``num_features`` / ``in_features`` ... and smaller weights; :func:`load_model` rebuilds the original
architecture from ``spec``, restores those attributes, gives every parameter and buffer the saved
shape and then loads the weights strictly.

A ``pkg.module:factory`` spec is rebuilt by importing ``pkg.module`` and calling ``factory``, as a
Python import would; only a plain function or an ``nn.Module`` class outside the standard library
and the project's own dependencies is accepted, so a crafted file cannot name e.g. ``os:system``. This is a
deny list: a function of some other installed package would still be called, so load factory files only
from sources you would take code from.
A file holding a pickled whole module (``torch.save(model)``) is refused, never unpickled.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

__all__ = [
    "FORMAT",
    "VERSION",
    "ModelLoadError",
    "add_trusted_factories",
    "atomic_save",
    "atomic_write",
    "load_model",
    "load_model_with_extra",
    "save_model",
]

logger = logging.getLogger(__name__)

FORMAT = "keepgym-model"
VERSION = 1
_PLAIN = (int, float, bool, str, type(None))
#: Top-level packages a model file's ``pkg.module:factory`` may not name (beside the standard library):
#: their callables read files, download, unpickle or run code.
_UNTRUSTED_FACTORY_PACKAGES = frozenset(
    {"torch", "torchvision", "timm", "numpy", "scipy", "pandas", "pip", "setuptools", "pkg_resources",
     "keepgym", "gymnasium", "stable_baselines3", "ray", "onnx", "onnxruntime", "onnxscript", "sklearn",
     "joblib", "cloudpickle", "dill", "huggingface_hub", "safetensors", "tensorboard", "pytest", "_pytest",
     "IPython", "yaml", "requests", "urllib3", "builtins"}
)


#: ``pkg.module:factory`` references the user has named in this process (``create_model``, ``--model``,
#: :func:`add_trusted_factories`): only these may be rebuilt from a model file, because rebuilding one
#: imports and runs that code. Like ``torch.serialization.add_safe_globals`` for ``weights_only`` loads.
_TRUSTED_FACTORIES: set[str] = set()


def add_trusted_factories(refs: list[str] | tuple[str, ...]) -> None:
    """Allow model files built by these ``pkg.module:factory`` references to be loaded in this process.

    A model file of a zoo, ``torchvision:`` or ``timm:`` model rebuilds without running any code it
    names. A file of a user factory names code to import and call, so :func:`load_model` refuses it
    unless the user has named that factory: here, through ``create_model(ref)`` (which trusts the
    factory it builds), through ``load_model(path, trust_factory=ref)``, or with ``--model ref`` on
    the command line.
    """
    for ref in refs:
        if not isinstance(ref, str) or ":" not in ref:
            raise ValueError(f"a trusted factory must look like pkg.module:factory, got {ref!r}")
        _TRUSTED_FACTORIES.add(ref)


class ModelLoadError(ValueError):
    """A model file is unreadable, not a keepgym model file, or does not match its architecture."""


def _is_plain(value: Any) -> bool:
    """True for values ``torch.load(weights_only=True)`` can restore (tensors and nested plain values)."""
    if isinstance(value, (*_PLAIN, torch.Tensor)):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, _PLAIN) and _is_plain(v) for k, v in value.items())
    return False


def _module_attrs(module: nn.Module) -> dict[str, Any]:
    """Public scalar / tuple attributes of one module (not its children, parameters or buffers)."""
    attrs = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training" or key == "keepgym_spec":
            continue
        if isinstance(value, _PLAIN):
            attrs[key] = value
        elif isinstance(value, tuple | list) and all(isinstance(v, _PLAIN) for v in value):
            # Plain tuple / list (not e.g. torch.Size) so weights_only loading accepts it.
            attrs[key] = tuple(value) if isinstance(value, tuple) else list(value)
    return attrs


def _widths(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: {"type": type(m).__name__, "attrs": _module_attrs(m)} for name, m in model.named_modules()}


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file atomically: ``write(fh)`` into a temp file in the same folder, fsync, then rename.

    A crash or kill at any moment leaves either the old file or the new one, never half a file, and no
    temp file. The file gets the usual permissions (``0666`` minus the umask; ``mkstemp`` alone would
    make it 0600). The one atomic-write helper of the project (models, agents, buffers, JSON).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def save_model(model: nn.Module, path: str | os.PathLike, **extra_metadata: Any) -> Path:
    """Save ``model`` (possibly pruned) atomically as a keepgym model file.

    Args:
        model: A model built by ``keepgym.models.create_model`` (it must carry ``keepgym_spec``): a zoo
            name, ``torchvision:NAME``, ``timm:NAME`` or ``pkg.module:factory``, pruned or not.
        path: Destination file; parent directories are created. The file is written to a temporary
            name first and moved into place, so an interrupted save never leaves a broken file.
        **extra_metadata: Plain values (numbers, strings, lists, dicts, tensors) stored under
            ``"extra"``, e.g. ``accuracy=0.93, stage=4``.

    Returns:
        The path written.

    Raises:
        ValueError: If the model has no ``keepgym_spec`` or the metadata is not plain data.
    """
    spec = getattr(model, "keepgym_spec", None)
    if not isinstance(spec, dict) or "name" not in spec or "kwargs" not in spec:
        raise ValueError(
            f"save_model cannot tell how to rebuild this {type(model).__name__} (it has no keepgym_spec): "
            "build it with keepgym.models.create_model('torchvision:NAME' | 'timm:NAME' | 'pkg.module:factory' "
            "| a zoo name, num_classes=...), then prune, train or load weights into it"
        )
    if not _is_plain(spec):
        raise ValueError(f"keepgym_spec holds values that cannot be saved as plain data: {spec!r}")
    if not _is_plain(extra_metadata):
        raise ValueError(
            "save_model extra metadata must be plain data (numbers, strings, lists, dicts, tensors)"
        )
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": {"name": spec["name"], "kwargs": dict(spec["kwargs"])},
        "widths": _widths(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": dict(extra_metadata),
    }
    path = atomic_save(payload, path)
    logger.debug("saved %s (%s) to %s", spec["name"], type(model).__name__, path)
    return path


def _read(path: Path, map_location: Any) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        # weights_only refuses every Python object but tensors and plain containers: say so, naming the
        # class the file wanted to rebuild (e.g. torchvision.models.resnet.ResNet).
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if wanted:
            raise ModelLoadError(
                f"{path}: holds a pickled Python object ({wanted.group(1)}), e.g. a whole module saved with "
                "torch.save(model); keepgym never unpickles (it could run code). Re-save it where you trust it: "
                "keepgym.models.save_model(model, path), the model built by keepgym.models.create_model"
            ) from None
        # torch raises a zoo of types here (UnpicklingError, RuntimeError from the zip reader, ...);
        # reduce all of them to one line naming the file.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{path}: not a readable model file (truncated or corrupt?): {reason[:200]}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        kind = (
            "a plain state_dict"
            if isinstance(payload, dict)
            and payload
            and all(isinstance(v, torch.Tensor) for v in payload.values())
            else f"a {type(payload).__name__}"
        )
        hint = (
            "; it has weights but no architecture: build the model with keepgym.models.create_model, "
            "model.load_state_dict(torch.load(path, weights_only=True)), then models.save_model"
            if kind == "a plain state_dict"
            else "; save it with models.save_model"
        )
        raise ModelLoadError(f"{path}: not a keepgym model file (it holds {kind}){hint}")
    if payload.get("version") != VERSION:
        raise ModelLoadError(f"{path}: unsupported keepgym model file version {payload.get('version')!r}")
    for key in ("spec", "widths", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise ModelLoadError(f"{path}: keepgym model file is missing its {key!r} entry")
    return payload


def _resize(
    model: nn.Module, widths: dict[str, Any], state_dict: dict[str, torch.Tensor], path: Path
) -> None:
    """Give ``model`` the saved per-module attributes and parameter / buffer shapes."""
    modules = dict(model.named_modules())
    for name, info in widths.items():
        module = modules.get(name)
        if module is None:
            raise ModelLoadError(f"{path}: saved layer {name!r} does not exist in the rebuilt architecture")
        if type(module).__name__ != info.get("type"):
            raise ModelLoadError(
                f"{path}: layer {name!r} is a {info.get('type')} in the file "
                f"but a {type(module).__name__} when rebuilt"
            )
        for key, value in info.get("attrs", {}).items():
            if hasattr(module, key):
                setattr(module, key, value)
    for key, tensor in state_dict.items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            raise ModelLoadError(
                f"{path}: saved tensor {key!r} has no owning layer in the rebuilt architecture"
            )
        if attr in owner._parameters and owner._parameters[attr] is not None:
            old = owner._parameters[attr]
            if old.shape != tensor.shape:
                new = torch.empty(tensor.shape, dtype=tensor.dtype, device=old.device)
                owner._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            old = owner._buffers[attr]
            if old.shape != tensor.shape:
                owner._buffers[attr] = torch.empty(tensor.shape, dtype=tensor.dtype, device=old.device)


def _expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter / buffer shapes a standard layer's attributes imply (empty for other modules)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        k = tuple(module.kernel_size)
        if module.transposed:
            weight = (module.in_channels, module.out_channels // module.groups, *k)
        else:
            weight = (module.out_channels, module.in_channels // module.groups, *k)
        return {"weight": weight, "bias": (module.out_channels,)}
    if isinstance(module, nn.Linear):
        return {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        n = (module.num_features,)
        return {"weight": n, "bias": n, "running_mean": n, "running_var": n}
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        return {"weight": shape, "bias": shape}
    if isinstance(module, nn.Embedding):
        return {"weight": (module.num_embeddings, module.embedding_dim)}
    return {}


def _check_shapes(model: nn.Module, path: Path) -> None:
    """Refuse weights whose shapes contradict their layer's saved widths (a corrupt or edited file)."""
    for name, module in model.named_modules():
        for attr, shape in _expected_shapes(module).items():
            tensor = getattr(module, attr, None)
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != tuple(shape):
                raise ModelLoadError(
                    f"{path}: {name}.{attr} has shape {tuple(tensor.shape)} "
                    f"but the layer's saved widths imply {tuple(shape)}"
                )


def _check_factory(name: Any, path: Path) -> None:
    """Refuse a ``pkg.module:factory`` spec unless the user named it (see :func:`add_trusted_factories`)
    and it is a model builder of the user's own code."""
    from keepgym.models import resolve_model  # late import: models/__init__.py imports this module

    if not isinstance(name, str):
        raise ModelLoadError(f"{path}: the architecture name is a {type(name).__name__}, not a string")
    prefix, sep, _ = name.partition(":")
    if not sep or prefix in ("torchvision", "timm"):
        return  # zoo names and library registries: only models can be built from them
    top = prefix.split(".")[0]
    if top in sys.stdlib_module_names or top in _UNTRUSTED_FACTORY_PACKAGES:
        raise ModelLoadError(f"{path}: refusing model factory {name!r} (not a model builder of your own code)")
    if name not in _TRUSTED_FACTORIES:
        raise ModelLoadError(
            f"{path}: built by the factory {name!r}; rebuilding it imports and runs that code, so it is loaded "
            f"only when you name it: --model {name} (CLI), or load_model(path, trust_factory={name!r})"
        )
    try:
        factory = resolve_model(name)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: cannot rebuild architecture {name!r}: {exc}") from None
    owner = (getattr(factory, "__module__", "") or "").split(".")[0]  # where it is defined, not re-exported
    is_module_class = inspect.isclass(factory) and issubclass(factory, nn.Module)
    foreign = owner in _UNTRUSTED_FACTORY_PACKAGES or owner in sys.stdlib_module_names
    if not (inspect.isfunction(factory) or is_module_class) or foreign:
        raise ModelLoadError(
            f"{path}: refusing model factory {name!r}: it must be a Python function or nn.Module class "
            "of your own code"
        )


def check_finite_weights(state_dict: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a model file whose weights are not all tensors of finite numbers (NaN/inf: a diverged run).

    Raises:
        ModelLoadError: one line naming the file and the first bad tensor.
    """
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelLoadError(f"{path}: state_dict entry {key!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ModelLoadError(
                    f"{path}: tensor {key!r} holds {bad} NaN/inf values of {tensor.numel()}; refused"
                )


def load_model_with_extra(
    path: str | os.PathLike, map_location: Any = "cpu", trust_factory: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a keepgym model file and its extra metadata.

    Args:
        path: File written by :func:`save_model`.
        map_location: Passed to ``torch.load`` (the model's tensors end up there).
        trust_factory: The ``pkg.module:factory`` the file was built with, if it is a user factory's
            model: naming it allows the code to be imported and run (:func:`add_trusted_factories`).

    Returns:
        ``(model, extra)``: the rebuilt model (with ``keepgym_spec`` set, in training mode, like a
        freshly created model) and the ``extra_metadata`` given to :func:`save_model`.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ModelLoadError: If the file is truncated or corrupt, is not a keepgym model file, or its
            spec / widths / weights do not fit together. The message is one line naming the file.
    """
    from keepgym.models import create_model  # late import: models/__init__.py imports this module

    path = Path(path)
    if trust_factory is not None and ":" in trust_factory:
        add_trusted_factories([trust_factory])
    payload = _read(path, map_location)
    check_finite_weights(payload["state_dict"], path)
    spec = payload["spec"]
    _check_factory(spec.get("name"), path)
    try:
        model = create_model(spec["name"], **spec["kwargs"])
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot rebuild architecture {spec.get('name')!r}: {exc}") from None
    state_dict = payload["state_dict"]
    _resize(model, payload["widths"], state_dict, path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())
        raise ModelLoadError(
            f"{path}: weights do not match the rebuilt architecture: {first[:300]}"
        ) from None
    _check_shapes(model, path)
    if state_dict:
        model.to(next(iter(state_dict.values())).device)
    return model, dict(payload.get("extra") or {})


def load_model(path: str | os.PathLike, map_location: Any = "cpu", trust_factory: str | None = None) -> nn.Module:
    """Load a model saved by :func:`save_model` (see :func:`load_model_with_extra`)."""
    return load_model_with_extra(path, map_location, trust_factory)[0]
