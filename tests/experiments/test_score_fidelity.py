"""`keepgym bench score-fidelity`: vanilla vs adaptive-BN scores against accuracy after the same KD."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from keepgym.envs.data import load_dataset
from keepgym.experiments.cli import main
from keepgym.experiments.score_fidelity import rank_correlations, score_fidelity

CIFAR10 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"
BASELINE = Path(__file__).resolve().parents[2] / "runs" / "frontier-quick" / "baseline" / "model.pt"


def test_rank_correlations_match_scipy_and_handle_constant_scores():
    rng = np.random.default_rng(0)
    a, b = rng.random(12), rng.random(12)
    out = rank_correlations(a, b)
    assert out["spearman"] == pytest.approx(stats.spearmanr(a, b).statistic)
    assert out["kendall"] == pytest.approx(stats.kendalltau(a, b).statistic)
    assert rank_correlations(a, a)["spearman"] == pytest.approx(1.0)
    assert math.isnan(rank_correlations(np.ones(12), b)["kendall"])  # a constant score ranks nothing


def test_score_fidelity_tiny_recovers_every_candidate_from_the_same_state():
    data = load_dataset("synthetic", train_size=160, val_size=48, test_size=32, num_classes=4, image_size=16)
    result = score_fidelity(
        "vgg11",
        "synthetic",
        data=data,
        pretrained=False,
        width_mult=0.125,
        candidates=4,
        kd_steps=2,
        bn_calibration_size=32,
        batch_size=32,
        test_images=None,
    )
    rows = result["rows"]
    assert len(rows) == 4 and result["test_images"] == 32 and result["eval_images"] == 48
    for row in rows:
        # the committed candidate before KD is what vanilla scoring measured on the masked model
        assert row["physical_before_kd"] == row["vanilla"]
        assert row["macs_ratio"] <= 0.7 + 1e-6  # every candidate meets the stage's MACs goal
        assert 0.0 <= row["adaptive_bn"] <= 1.0 and 0.0 <= row["recovered_test"] <= 1.0
    assert len({tuple(r["widths"]) for r in rows}) == 4  # four different allocations
    assert set(result["correlations"]) == {"vanilla", "adaptive_bn"}
    assert set(result["top_pick"]["vanilla"]["val"]) == {"recovered", "best_recovered", "rank"}


def test_bench_score_fidelity_quick_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "score-fidelity", "--quick", "--out", str(out)]) == 0
    result = json.loads((out / "score-fidelity.json").read_text())
    assert result["candidates"] == 4 and (out / "score-fidelity.png").stat().st_size > 1000
    assert "score-fidelity" in result["command"] and "Spearman" in capsys.readouterr().out


def test_bench_score_fidelity_without_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["bench", "score-fidelity", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.is_file(), reason=f"needs the CIFAR-10 archive at {CIFAR10}")
@pytest.mark.skipif(not BASELINE.is_file(), reason=f"needs the frontier-quick baseline at {BASELINE}")
def test_score_fidelity_on_cifar10_adaptive_bn_scores_closer_to_recovered(tmp_path):
    result = score_fidelity(
        checkpoint=BASELINE, data_root=str(CIFAR10), image_size=32, candidates=6, kd_steps=10, test_images=1000
    )
    rows = result["rows"]
    # re-estimated statistics recover much of the accuracy that stale ones lose right after masking
    assert np.mean([r["adaptive_bn"] for r in rows]) > np.mean([r["vanilla"] for r in rows])
    assert all(0.2 < r["recovered_val"] <= 1.0 for r in rows)
