"""`keepgym bench`: JSON with the machine, the command and side-by-side ratios."""

import json

import pytest

from keepgym.experiments.cli import main


def test_bench_data_and_prune_step_write_json(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "data", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    assert main(["bench", "prune-step", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads((out / "data.json").read_text())
    assert data["machine"]["cpu_count"] >= 1 and "bench" in data["command"]
    ratio = data["loader_seconds_per_batch"] / data["train_step_seconds_per_batch"]
    assert data["loader_fraction_of_step"] == pytest.approx(ratio) and ratio > 0
    step = json.loads((out / "prune-step.json").read_text())
    for key in ("importance_s", "surgery_s", "eval_s", "forward_s", "masking_fraction_of_forward"):
        assert step[key] >= 0, key
    assert "loader =" in capsys.readouterr().out


def test_bench_rejects_unknown_benchmark(tmp_path):
    try:
        main(["bench", "gpu-magic", "--out", str(tmp_path)])
    except SystemExit as err:
        assert err.code == 2
    else:
        raise AssertionError("argparse should reject an unknown benchmark")
