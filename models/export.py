"""Export a (pruned) model to files that run without keepgym: TorchScript, ExportedProgram, ONNX.

Each exporter traces the model in eval mode on an example batch, with a dynamic batch dimension, and
writes one file; :func:`load_exported` runs any of them again and :func:`max_logit_diff` checks an
exported file against the PyTorch model on a batch::

    model = load_model("runs/prune/compressed.pt")
    x = torch.randn(8, 3, 32, 32)
    results = export_model(model, x, "runs/prune/export")   # {"torchscript": {...}, "exported": ..., "onnx": ...}
    results["onnx"]["max_abs_diff"]                           # < 1e-4

* ``torchscript``: ``torch.jit.trace`` + ``torch.jit.save`` (``model.torchscript.pt``; ``torch.jit.load``;
  deprecated by torch since 2.10 but still what many C++ and mobile runtimes read);
* ``exported``: ``torch.export.export`` + ``torch.export.save`` (``model.pt2``; ``torch.export.load``);
* ``onnx``: ``torch.onnx.export(dynamo=True)`` (``model.onnx``, weights inside the file; needs the
  ``export`` extra: ``onnx`` and ``onnxscript``; ONNX Runtime runs it).

The files hold a graph and weights only, no Python class of this project: the reader needs torch (or
ONNX Runtime), never keepgym.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportedModel",
    "export_model",
    "export_onnx",
    "export_program",
    "export_torchscript",
    "load_exported",
    "max_logit_diff",
]

logger = logging.getLogger(__name__)

#: Format name -> file name suffix.
EXPORT_FORMATS: dict[str, str] = {"torchscript": ".torchscript.pt", "exported": ".pt2", "onnx": ".onnx"}
_MAX_BATCH = 4096


class ExportError(RuntimeError):
    """A model could not be exported or its export does not match the PyTorch model."""


def _prepare(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    if example.dim() < 2 or example.shape[0] < 2:
        # a batch of 1 lets the tracers specialise the batch dimension to 1
        raise ValueError(f"example must be a batch of at least 2 inputs, got shape {tuple(example.shape)}")
    return model.eval(), example.detach()


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=_MAX_BATCH)


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Trace ``model`` on ``example`` and save it as TorchScript (``torch.jit.load`` reads it)."""
    model, example = _prepare(model, example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # torch >= 2.10 marks TorchScript deprecated; it is still the format most C++/mobile runtimes read
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
    return path


def export_program(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """``torch.export`` ``model`` (dynamic batch) and save the ExportedProgram (``torch.export.load``)."""
    model, example = _prepare(model, example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, str(path))
    return path


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Export ``model`` to one ONNX file (dynamic batch, weights inside); needs ``onnx`` and ``onnxscript``.

    Raises:
        ImportError: If ``onnx`` or ``onnxscript`` is missing (``pip install 'keepgym[export]'``).
    """
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise ImportError(f"ONNX export needs {name}: pip install 'keepgym[export]'") from None
    model, example = _prepare(model, example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: _batch_dim()},),
            external_data=False,
            verbose=False,
        )
    return path


class ExportedModel(nn.Module):
    """An exported file behind an ``nn.Module`` face (``images -> logits``), for timing and scoring.

    ``train()`` / ``eval()`` only flip the flag: an exported graph has its mode baked in.
    """

    def __init__(self, path: Path, fmt: str, run: Callable[[torch.Tensor], torch.Tensor], inner: Any = None):
        super().__init__()
        self.path, self.format = path, fmt
        self._run = run
        self.inner = inner if isinstance(inner, nn.Module) else None  # registered so .to() reaches it

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._run(x)


def load_exported(path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> ExportedModel:
    """Load an exported file (format from the file name) as a module ``images -> logits``.

    ``.onnx`` runs in ONNX Runtime (CPU provider) with torch tensors in and out, the others in torch.
    ``threads``: ONNX Runtime's intra-op threads (default: its own choice, all cores); give torch's
    ``torch.get_num_threads()`` for a fair latency comparison.
    """
    path = Path(path)
    name = path.name
    if name.endswith(EXPORT_FORMATS["onnx"]):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("running an ONNX file needs onnxruntime: pip install 'keepgym[export]'") from None
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            logits = session.run(None, {input_name: x.detach().cpu().float().numpy()})[0]
            return torch.from_numpy(logits).to(x.device)

        return ExportedModel(path, "onnx", run_onnx)
    if name.endswith(EXPORT_FORMATS["exported"]):
        module, fmt = torch.export.load(str(path)).module(), "exported"
    elif name.endswith(EXPORT_FORMATS["torchscript"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module, fmt = torch.jit.load(str(path), map_location=device), "torchscript"
    else:
        raise ValueError(f"{path}: unknown export format (expected {', '.join(EXPORT_FORMATS.values())})")
    module.to(device)
    return ExportedModel(path, fmt, module, module)


def max_logit_diff(model: nn.Module, runner: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> float:
    """Largest absolute difference between ``model``'s logits and ``runner``'s on ``batch``."""
    return logit_diff_and_scale(model, runner, batch)[0]


def logit_diff_and_scale(
    model: nn.Module, runner: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor
) -> tuple[float, float]:
    """``(max |logit diff|, max(1, max |logit|))`` of ``runner`` against ``model`` on ``batch``: the second is
    the scale a parity tolerance is relative to (float32 rounding grows with the logits' size)."""
    model.eval()
    with torch.no_grad():
        expected = model(batch)
        got = runner(batch)
    if tuple(got.shape) != tuple(expected.shape):
        raise ExportError(f"exported logits have shape {tuple(got.shape)}, the model's {tuple(expected.shape)}")
    diff = float((got.to(expected.device).float() - expected.float()).abs().max())
    return diff, max(1.0, float(expected.float().abs().max()))


_EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, str | os.PathLike], Path]] = {
    "torchscript": export_torchscript,
    "exported": export_program,
    "onnx": export_onnx,
}


def export_model(
    model: nn.Module,
    example: torch.Tensor,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = tuple(EXPORT_FORMATS),
    stem: str = "model",
    check_batch: torch.Tensor | None = None,
    tolerance: float = 1e-4,
) -> dict[str, dict[str, Any]]:
    """Export ``model`` in each of ``formats`` and check each file against the PyTorch model.

    Args:
        model: The model to export (put in eval mode, on the CPU).
        example: Example input batch (at least 2 images) used for tracing.
        out_dir: Folder for ``<stem><suffix>`` files (:data:`EXPORT_FORMATS`).
        formats: Any of ``torchscript``, ``exported``, ``onnx``.
        stem: File name stem.
        check_batch: Batch for the parity check (default: ``example``); it should differ in batch size
            from ``example`` so a batch dimension frozen by the tracer is caught.
        tolerance: Largest accepted ``max |logit diff|`` per unit of ``max(1, max |logit|)`` of the model on the
            check batch (absolute for logits up to 1, relative above: float32 rounding grows with the logits).

    Returns:
        ``{format: {"path": str, "max_abs_diff": float, "logit_scale": float, "bytes": int}}``.

    Raises:
        ValueError: An unknown format.
        ExportError: An export failed or its logits differ from the model's by more than ``tolerance``.
    """
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {', '.join(unknown)}; valid: {', '.join(EXPORT_FORMATS)}")
    model = model.cpu().eval()
    example = example.cpu()
    batch = example if check_batch is None else check_batch.cpu()
    out_dir = Path(out_dir)
    results: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        path = out_dir / f"{stem}{EXPORT_FORMATS[fmt]}"
        try:
            _EXPORTERS[fmt](model, example, path)
        except ImportError:
            raise
        except Exception as err:
            line = " ".join(str(err).split())[:300] or type(err).__name__
            raise ExportError(f"{fmt} export of {type(model).__name__} failed: {line}") from err
        diff, scale = logit_diff_and_scale(model, load_exported(path), batch)
        logger.info("exported %s to %s (max |logit diff| %.2e, logits up to %.3g)", fmt, path, diff, scale)
        if not diff <= tolerance * scale:
            raise ExportError(
                f"{fmt} export {path} differs from the model: max |logit diff| {diff:.3e} > {tolerance} x "
                f"max(1, max |logit|) = {tolerance * scale:.3e}"
            )
        results[fmt] = {"path": str(path), "max_abs_diff": diff, "logit_scale": scale, "bytes": path.stat().st_size}
    return results
