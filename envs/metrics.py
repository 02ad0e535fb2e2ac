"""Model metrics used everywhere in keepgym: MACs and parameters, accuracy, latency.

``count_macs_params`` is the one cost counter of the project. It counts multiply-accumulates the way
``thop`` (pytorch-OpCounter, the counter of the RL-Pruner release) does, so the five RL-Pruner
baselines reproduce the published figures at 1x3x32x32:

* convolutions, linear layers and every other matrix product (attention ``q @ k^T`` and
  ``attn @ v``, ``scaled_dot_product_attention``, einsum, bmm) are counted from the dispatched aten
  ops by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2 = MACs, biases not counted, like
  thop), so models that take extra forward arguments such as a ViT's ``keep=...`` are counted too;
* normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) count ``2 * numel`` of their
  input, doubled when affine; ``AvgPool`` counts one op per output element and ``AdaptiveAvgPool``
  ``(kernel + 1)`` per output element; activations, max-pooling and dropout count zero.

Parameters are all ``model.parameters()`` elements.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "count_macs_params",
    "evaluate_accuracy",
    "latency_side_by_side",
    "measure_latency",
    "measure_model",
    "synchronize",
]

logger = logging.getLogger(__name__)

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_AVGPOOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVGPOOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_MATMULS = {"matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "linear"}
_CONVS = {"conv1d", "conv2d", "conv3d"}


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _einsum_macs(args: tuple[Any, ...], out: torch.Tensor) -> int:
    """MACs of a two-operand einsum: the product of the sizes of all distinct indices."""
    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = list(operands[0])
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    if len(operands) != 2 or "..." in equation:
        logger.warning("count_macs_params: einsum %r not counted (only explicit two-operand forms)", equation)
        return 0
    sizes: dict[str, int] = {}
    for letters, tensor in zip(inputs, operands, strict=True):
        sizes.update(zip(letters, tensor.shape, strict=True))
    return math.prod(sizes.values())


def _function_macs(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """MACs of one torch function call (convolutions and matrix products; everything else is 0)."""
    if not isinstance(out, torch.Tensor):
        return 0
    if name in _CONVS:
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        # thop: output elements x (C_in / groups) x kernel volume, bias not counted.
        return out.numel() * math.prod(weight.shape[1:])
    if name in _MATMULS:
        operands = [a for a in args if isinstance(a, torch.Tensor)]
        if name in {"addmm", "baddbmm", "addbmm"}:
            operands = operands[1:]
        # Every output element is a dot product over the first operand's last dimension.
        inner = operands[0].shape[-1] if operands and operands[0].dim() > 0 else 1
        return out.numel() * inner if name != "addbmm" else out.numel() * inner * operands[0].shape[0]
    if name == "einsum":
        return _einsum_macs(args, out)
    if name == "scaled_dot_product_attention":
        q, k, v = (args + tuple(kwargs.get(n) for n in ("query", "key", "value")))[:3]
        # q @ k^T then attn @ v.
        batch = math.prod(q.shape[:-2])
        return batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


class _MacCounter(TorchFunctionMode):
    """Counts MACs of convolutions and matrix products at the torch-function level (cheap: no
    re-dispatch, no decompositions). Calls made inside a counted call are not seen again."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _MATMULS or name in _CONVS or name in {"einsum", "scaled_dot_product_attention"}:
            self.macs += _function_macs(name, args, kwargs, out)
        return out


def _elementwise_ops(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    """thop's count for the non-matmul layers it counts (norms and average pools)."""
    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
        return 0
    if isinstance(module, _NORMS):
        affine = bool(getattr(module, "affine", False) or getattr(module, "elementwise_affine", False))
        return 2 * x.numel() * (2 if affine else 1)
    if isinstance(module, _AVGPOOLS):
        return output.numel()
    if isinstance(module, _ADAPTIVE_AVGPOOLS):
        kernel = math.prod(i / o for i, o in zip(x.shape[2:], output.shape[2:], strict=False))
        return int((kernel + 1) * output.numel())
    return 0


@torch.no_grad()
def count_macs_params(
    model: nn.Module,
    input_size: Sequence[int] = (1, 3, 32, 32),
    device: str | torch.device | None = None,
    **forward_kwargs: Any,
) -> tuple[int, int]:
    """Count multiply-accumulates of one forward pass and the number of parameters.

    One forward pass in eval mode under ``no_grad``; the model's train/eval mode is restored.

    Args:
        model: Any ``nn.Module`` taking an image batch as first argument.
        input_size: Shape of the dummy input, ``(N, C, H, W)``; MACs are for the whole batch
            (use ``N = 1`` for per-image figures).
        device: Where to run the pass; defaults to the device of the model's parameters. The model
            is not moved.
        **forward_kwargs: Extra keyword arguments for ``model(x, ...)`` (e.g. ``keep=indices``).

    Returns:
        ``(macs, params)`` as ints.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    x = torch.zeros(tuple(input_size), device=device)
    extra_ops = 0

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal extra_ops
        extra_ops += _elementwise_ops(module, inputs, output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, _NORMS + _AVGPOOLS + _ADAPTIVE_AVGPOOLS)
    ]
    was_training = model.training
    model.eval()
    counter = _MacCounter()
    try:
        with counter:
            model(x, **forward_kwargs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    params = sum(p.numel() for p in model.parameters())
    return int(counter.macs + extra_ops), int(params)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    normalize_fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    forward_kwargs: dict[str, Any] | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on uint8 images.

    Args:
        model: Classifier returning logits ``(N, classes)``; must already be on ``device``.
        x_uint8: Images ``(N, C, H, W)`` as uint8 (any device; batches are moved to ``device``).
        y: Integer labels ``(N,)``.
        normalize_fn: Maps a uint8 batch to the float input the model expects
            (e.g. ``DatasetSplits.normalize``).
        batch_size: Evaluation batch size.
        device: Device to evaluate on.
        forward_kwargs: Extra keyword arguments passed unchanged to every ``model(x, ...)`` call.

    Returns:
        Fraction of correct predictions in ``[0, 1]``. The model's train/eval mode is restored.

    Raises:
        ValueError: If the inputs are empty or their lengths differ.
    """
    if len(x_uint8) != len(y):
        raise ValueError(f"x and y lengths differ: {len(x_uint8)} vs {len(y)}")
    if len(y) == 0:
        raise ValueError("cannot evaluate accuracy on an empty set")
    kwargs = forward_kwargs or {}
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(y), batch_size):
            xb = normalize_fn(x_uint8[start : start + batch_size].to(device, non_blocking=True))
            yb = y[start : start + batch_size].to(device, non_blocking=True)
            correct += int((model(xb, **kwargs).argmax(dim=1) == yb).sum().item())
    finally:
        model.train(was_training)
    return correct / len(y)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so a wall-clock time covers it; a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_size: Sequence[int],
    batch_size: int = 1,
    repeats: int = 20,
    warmup: int = 5,
    device: str | torch.device = "cpu",
    **forward_kwargs: Any,
) -> dict[str, float]:
    """Inference latency and throughput of ``model`` (eval mode, ``no_grad``).

    Args:
        model: The model; must already be on ``device``.
        input_size: Image shape ``(C, H, W)`` or ``(N, C, H, W)`` (the ``N`` is replaced by
            ``batch_size``).
        batch_size: Images per forward pass.
        repeats: Timed forward passes; the median is reported.
        warmup: Untimed forward passes first (allocator, cudnn autotuning, caches).
        device: Device of the dummy input; CUDA is synchronised around every timed pass.
        **forward_kwargs: Extra keyword arguments for ``model(x, ...)``.

    Returns:
        ``{"median_ms": ..., "images_per_second": ..., "batch_size": ...}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    shape = tuple(input_size)[-3:] if len(input_size) >= 3 else tuple(input_size)
    device = torch.device(device)
    x = torch.randn((batch_size, *shape), device=device)
    was_training = model.training
    model.eval()
    times = []
    try:
        for _ in range(warmup):
            model(x, **forward_kwargs)
        synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, **forward_kwargs)
            synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    median = statistics.median(times)
    return {
        "median_ms": median * 1e3,
        "images_per_second": batch_size / median if median > 0 else float("inf"),
        "batch_size": batch_size,
    }


def measure_model(model: nn.Module, data: Any, device: str | torch.device = "cpu") -> dict[str, Any]:
    """``val_accuracy``, ``test_accuracy``, ``macs`` and ``params`` of ``model`` on a ``DatasetSplits``.

    The test split is read here and nowhere in the search: call this once, at the end of a run.
    """
    model = model.to(device).eval()
    macs, params = count_macs_params(model, (1, data.in_chans, data.image_size, data.image_size))
    return {
        "val_accuracy": evaluate_accuracy(model, data.val_x, data.val_y, data.normalize, device=device),
        "test_accuracy": evaluate_accuracy(model, data.test_x, data.test_y, data.normalize, device=device),
        "macs": macs,
        "params": params,
    }


def latency_side_by_side(
    models: dict[str, nn.Module],
    input_size: Sequence[int],
    device: str | torch.device = "cpu",
    repeats: int = 20,
    threads: int | None = None,
) -> dict[str, dict[str, float | None]]:
    """Median latency at batch 1 and 64 of several models, interleaved so they share the machine's state.

    Three interleaved rounds of :func:`measure_latency` per model and batch size; the median of the medians
    is reported as ``latency_ms_b1`` / ``latency_ms_b64`` (None with ``repeats=0``). ``threads`` sets torch's
    CPU threads while timing (restored afterwards).
    """
    out: dict[str, dict[str, float | None]] = {name: {"latency_ms_b1": None, "latency_ms_b64": None} for name in models}
    if repeats <= 0:
        return out
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for batch, key, reps in ((1, "latency_ms_b1", repeats), (64, "latency_ms_b64", max(3, repeats // 4))):
            samples: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(3):
                for name, model in models.items():
                    ms = measure_latency(model, input_size, batch_size=batch, repeats=reps, device=device)
                    samples[name].append(ms["median_ms"])
            for name in models:
                out[name][key] = float(statistics.median(samples[name]))
    finally:
        torch.set_num_threads(saved_threads)
    return out
