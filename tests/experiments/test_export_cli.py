"""Bring your own model through the CLI: torchvision ResNet-18 / MobileNetV3 and a user's factory module are
trained or loaded, pruned, saved, reloaded with identical logits, exported (parity checked) and evaluated with
the exported ONNX file and the unpruned baseline beside them, on a tiny image folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from keepgym.experiments.cli import main
from keepgym.models import create_model, load_model, save_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FACTORY_SOURCE = Path(__file__).parents[1] / "models" / "factory_nets.py"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes of 16x16 RGB PNGs (a coloured square per class on noise): train 12, test 4 per class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
                img[4:12, 4:12, c] = 230
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def _prune_args(model, checkpoint, data_root, out):
    return [
        "prune", "--model", model, "--dataset", "folder", "--data-root", str(data_root),
        "--checkpoint", str(checkpoint), "--sparsity", "0.4", "--stage-sparsity", "0.2",
        "--sample-num", "2", "--rounds-per-stage", "1", "--finetune-epochs", "0", "--final-finetune-epochs", "1",
        "--calibration-size", "8", "--kd-batch-size", "16", "--latency-repeats", "1", "--device", "cpu",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "model, kwargs",
    [("torchvision:resnet18", {}), ("torchvision:mobilenet_v3_small", {"width_mult": 0.25})],
)
def test_torchvision_model_pruned_exported_and_evaluated(model, kwargs, image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    base = save_model(create_model(model, num_classes=3, **kwargs), tmp_path / "base.pt")
    run = tmp_path / "run"
    assert main(_prune_args(model, base, image_folder, run)) == 0
    compressed = run / "compressed.pt"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == model and summary["final"]["macs"] < summary["baseline"]["macs"]
    raw = torch.load(compressed, weights_only=True)
    assert raw["spec"]["name"] == model

    pruned = load_model(compressed).eval()  # every saved tensor comes back bit for bit, in the pruned shapes
    assert all(torch.equal(v, raw["state_dict"][k]) for k, v in pruned.state_dict().items())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(pruned(x), load_model(compressed).eval()(x))  # reload gives identical logits

    export = ["export", "--checkpoint", str(compressed), "--dataset", "folder", "--data-root", str(image_folder)]
    assert main(export) == 0
    report = json.loads((run / "export" / "export.json").read_text())
    assert set(report["exports"]) == {"torchscript", "exported", "onnx"}
    assert all(r["max_abs_diff"] <= 1e-4 * r["logit_scale"] for r in report["exports"].values())
    assert report["input_shape"] == [None, 3, 16, 16]

    out = tmp_path / "eval.json"
    argv = [
        "evaluate", "--checkpoint", str(compressed), "--dataset", "folder", "--data-root", str(image_folder),
        "--exported", str(run / "export" / "model.onnx"), str(run / "export" / "model.pt2"),
        "--baseline", str(base), "--latency-repeats", "1", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(out.read_text())["comparison"]
    rows = figures["rows"]
    assert rows["onnx (model.onnx)"]["accuracy"] == rows["model"]["accuracy"]
    assert rows["onnx (model.onnx)"]["max_abs_diff"] < 1e-4
    assert rows["baseline"]["macs"] > rows["model"]["macs"]
    assert set(figures["exported_speedup"]) == {"onnx (model.onnx)", "exported (model.pt2)"}
    assert figures["pruning_speedup"]["b1"] > 0 and figures["exported_speedup"]["onnx (model.onnx)"]["b64"] > 0
    assert "speed-up of pruning" in capsys.readouterr().out


def test_user_factory_trained_pruned_and_exported_from_the_working_folder(image_folder, tmp_path, monkeypatch):
    shutil.copy(FACTORY_SOURCE, tmp_path / "kg_cli_nets.py")
    monkeypatch.chdir(tmp_path)  # the console script finds pkg.module:factory in the working folder
    monkeypatch.delitem(__import__("sys").modules, "kg_cli_nets", raising=False)
    ref = "kg_cli_nets:small_net"
    base = tmp_path / "base"
    train = ["train", "--model", ref, "--dataset", "folder", "--data-root", str(image_folder), "--epochs", "1",
             "--batch-size", "16", "--device", "cpu", "--no-progress", "--out", str(base)]  # fmt: skip
    assert main(train) == 0
    run = tmp_path / "run"
    assert main(_prune_args(ref, base / "model.pt", image_folder, run)) == 0
    assert main(["export", "--checkpoint", str(run / "compressed.pt"), "--image-size", "16", "--out", "deploy"]) == 0
    report = json.loads((tmp_path / "deploy" / "export.json").read_text())
    assert report["model"] == ref and all(r["max_abs_diff"] < 1e-4 for r in report["exports"].values())


def test_a_factory_model_file_loads_in_a_new_process_only_when_named(tmp_path):
    """Rebuilding a user factory's model runs that code: a fresh ``keepgym export`` refuses the file in one
    line until ``--model`` names the factory."""
    import subprocess
    import sys

    shutil.copy(FACTORY_SOURCE, tmp_path / "kg_trust_nets.py")
    sys.path.insert(0, str(tmp_path))
    try:
        save_model(create_model("kg_trust_nets:small_net", num_classes=3), tmp_path / "m.pt")
    finally:
        sys.path.remove(str(tmp_path))
    cmd = [sys.executable, "-m", "keepgym", "export", "--checkpoint", "m.pt", "--image-size", "16",
           "--formats", "torchscript", "--out", "deploy"]  # fmt: skip
    refused = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "only when you name it: --model kg_trust_nets:small_net" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "deploy").exists()
    named = subprocess.run([*cmd, "--model", "kg_trust_nets:small_net"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert named.returncode == 0, named.stderr[-2000:]
    assert (tmp_path / "deploy" / "model.torchscript.pt").is_file()


def test_user_mistakes_end_in_one_line(image_folder, tmp_path, capsys, monkeypatch):
    shutil.copy(FACTORY_SOURCE, tmp_path / "kg_cli_bad_nets.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, "kg_cli_bad_nets", raising=False)
    cases = []
    cases.append((["train", "--model", "torchvision:resnet999", "--dataset", "digits", "--out", "x"],
                  "torchvision has no classification model 'resnet999'"))  # fmt: skip
    grouped = save_model(create_model("kg_cli_bad_nets:grouped_net", num_classes=3), tmp_path / "g.pt")
    cases.append((_prune_args("kg_cli_bad_nets:grouped_net", grouped, image_folder, tmp_path / "g"),
                  "cannot be pruned: grouped conv 'blocks."))  # fmt: skip
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    cases.append((["export", "--checkpoint", str(tmp_path / "whole.pt")], "holds a pickled Python object"))
    cases.append((["export", "--checkpoint", str(grouped), "--formats", "tflite"], "unknown format(s) tflite"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_list_models_names_the_reference_forms(capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", "--list-models"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "resnet56" in out and "torchvision:NAME" in out and "pkg.module:factory" in out
