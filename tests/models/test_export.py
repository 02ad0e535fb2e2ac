"""``keepgym.models.export``: pruned torchvision / factory models to TorchScript, ExportedProgram and ONNX,
each matching the PyTorch model (max |logit diff| < 1e-4) and running in a Python without keepgym."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from keepgym.envs.prune_env import PruneEnv
from keepgym.models import load_model, save_model
from keepgym.models.export import EXPORT_FORMATS, ExportError, export_model, load_exported, logit_diff_and_scale

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

FACTORY_SOURCE = Path(__file__).with_name("factory_nets.py")
MODELS = {
    "resnet18": ("torchvision:resnet18", {}),
    "mobilenetv3": ("torchvision:mobilenet_v3_small", {"width_mult": 0.25}),
    "factory": ("kg_export_nets:small_net", {}),
}


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_code")
    shutil.copy(FACTORY_SOURCE, folder / "kg_export_nets.py")
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))
    sys.modules.pop("kg_export_nets", None)


def _lively(model: nn.Module) -> nn.Module:
    """Random, non-trivial BatchNorm statistics and weights, so logits are O(1) (a random MobileNetV3's are ~1e-10)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(user_module, tmp_path_factory):
    """Each model of MODELS pruned (two stages on digits), saved, reloaded and exported in all three formats."""
    out = {}
    for key, (name, kwargs) in MODELS.items():
        env = PruneEnv(
            model_name=name, dataset="digits", pretrained=False, target_sparsity=0.4, stage_sparsity=0.2,
            eval_size=32, calibration_size=16, **kwargs,
        )
        env.reset(seed=0)
        for _ in range(2):
            env.step(np.ones(env.num_groups, dtype=np.float32))
        folder = tmp_path_factory.mktemp(f"export_{key}")
        path = save_model(_lively(env.model), folder / "compressed.pt")
        model = load_model(path).eval()
        torch.manual_seed(1)
        example, batch = torch.randn(2, 1, 32, 32), torch.randn(5, 1, 32, 32)
        results = export_model(model, example, folder / "export", check_batch=batch)
        out[key] = (model, results, batch, folder / "export")
    return out


@pytest.mark.parametrize("key", list(MODELS))
def test_every_format_is_written_and_matches_the_model(exported, key):
    model, results, batch, _ = exported[key]
    assert set(results) == set(EXPORT_FORMATS)
    with torch.no_grad():
        assert model(batch).abs().max() > 0.1  # parity on non-trivial logits
    for fmt, r in results.items():
        assert Path(r["path"]).is_file() and r["path"].endswith(EXPORT_FORMATS[fmt])
        assert r["max_abs_diff"] <= 1e-4 * r["logit_scale"], fmt  # float32 rounding grows with the logits
        # independent re-check on a third batch size (a frozen batch dimension would fail here)
        diff, scale = logit_diff_and_scale(model, load_exported(r["path"]), torch.randn(7, 1, 32, 32))
        assert diff <= 1e-4 * scale, fmt


_NO_KEEPGYM_SCRIPT = textwrap.dedent(
    """
    import importlib, json, os, sys
    sys.modules["keepgym"] = None  # keepgym off the path: any import of it fails
    try:
        importlib.import_module("keepgym")
        importable = True
    except ImportError:
        importable = False
    import numpy as np, torch, onnxruntime as ort
    for folder in sys.argv[1:]:
        os.chdir(folder)
        x = torch.from_numpy(np.load("batch.npy", allow_pickle=False))
        out = {}
        out["torchscript"] = torch.jit.load("model.torchscript.pt")(x)
        out["exported"] = torch.export.load("model.pt2").module()(x)
        session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
        out["onnx"] = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        for k, v in out.items():
            np.save(k + ".npy", v.detach().numpy(), allow_pickle=False)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "keepgym")
    print(json.dumps({"keepgym_importable": importable, "modules": loaded}))
    """
)


def test_exported_files_run_without_keepgym(exported, tmp_path):
    folders = []
    for _model, _, batch, folder in exported.values():
        np.save(folder / "batch.npy", batch.numpy(), allow_pickle=False)
        folders.append(str(folder))
    (tmp_path / "run.py").write_text(_NO_KEEPGYM_SCRIPT)
    # -I: isolated mode (no PYTHONPATH, no user site, the script's folder is not on sys.path)
    proc = subprocess.run(
        [sys.executable, "-I", "run.py", *folders], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"keepgym_importable": False, "modules": ["keepgym"]}  # only the blocking None entry
    for key, (model, _, batch, folder) in exported.items():
        with torch.no_grad():
            expected = model(batch).numpy()
        for fmt in EXPORT_FORMATS:
            got = np.load(folder / f"{fmt}.npy", allow_pickle=False)
            assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max()), (key, fmt)


def test_unknown_format_and_bad_example_are_refused(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(model, torch.randn(2, 4), tmp_path, formats=["tflite"])
    with pytest.raises(ExportError, match="at least 2"):
        export_model(model, torch.randn(1, 4), tmp_path, formats=["torchscript"])


def test_parity_failure_is_an_export_error(tmp_path, monkeypatch):
    import keepgym.models.export as export_mod

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    monkeypatch.setattr(export_mod, "logit_diff_and_scale", lambda *a: (0.5, 100.0))
    with pytest.raises(ExportError, match="differs from the model"):
        export_model(model, torch.randn(2, 4), tmp_path, formats=["torchscript"])
    # the tolerance is per unit of the logits' size: 0.5 off logits of 10,000 is float32 rounding
    monkeypatch.setattr(export_mod, "logit_diff_and_scale", lambda *a: (0.5, 1e4))
    result = export_model(model, torch.randn(2, 4), tmp_path, formats=["torchscript"])
    assert result["torchscript"]["logit_scale"] == 1e4


def test_parity_scale_is_the_largest_logit_but_at_least_one():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.fill_(0.0)
        model[1].bias.copy_(torch.tensor([-300.0, 2.0]))
    diff, scale = logit_diff_and_scale(model, lambda x: model(x) + 0.01, torch.randn(3, 4))
    assert scale == 300.0 and diff == pytest.approx(0.01, abs=1e-5)
    model[1].bias.data.fill_(0.5)
    assert logit_diff_and_scale(model, model, torch.randn(3, 4)) == (0.0, 1.0)
