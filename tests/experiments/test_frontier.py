"""``keepgym frontier``: every method at every MACs target and seed from one baseline, resumable."""

import json

import pytest

from keepgym.experiments.cli import main
from keepgym.experiments.common import CliError
from keepgym.experiments.frontier import FrontierConfig, resolve, run

TINY = dict(
    model="vgg11",
    width_mult=0.125,
    dataset="digits",
    train_size=300,
    baseline_epochs=1,
    targets=(0.6,),
    seeds=(0,),
    stage_sparsity=0.2,
    sample_num=2,
    rounds_per_stage=1,
    finetune_epochs=0,
    final_finetune_epochs=1,
    threads=1,
    progress=False,
)


def test_frontier_runs_every_method_writes_json_table_plot_and_resumes(tmp_path):
    out = tmp_path / "fr"
    result = run(FrontierConfig(out=str(out), methods=("uniform", "global", "tp", "rlpruner"), **TINY))
    assert result["expected_runs"] == 4 and len(result["runs"]) == 4 and not result["errors"]
    for r in result["runs"]:  # every method met the MACs target, within one stage
        assert 0.6 - 0.2 < r["macs_ratio"] <= 0.6 + 1e-9
        assert 0 < r["channel_sparsity"] < 1
    rows = {row["method"]: row for row in result["table"]}
    assert set(rows) == {"rlpruner", "uniform", "global", "tp"}
    assert all(row["n"] == 1 and row["test_accuracy_std"] == 0 for row in rows.values())
    assert rows["rlpruner"]["evaluations_mean"] > 0 and rows["uniform"]["evaluations_mean"] == 0
    saved = json.loads((out / "frontier.json").read_text())
    assert saved["table"] == json.loads(json.dumps(result["table"]))
    assert "| 0.6 | RL-Pruner" in (out / "frontier.md").read_text()
    assert (out / "frontier.png").stat().st_size > 1000
    # the same command again reuses the baseline and every finished run: nothing is recomputed
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    stamps[out / "baseline" / "model.pt"] = (out / "baseline" / "model.pt").stat().st_mtime_ns
    again = run(FrontierConfig(out=str(out), methods=("uniform", "global", "tp", "rlpruner"), **TINY))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["table"] == result["table"]


def test_frontier_settings_are_checked(tmp_path):
    with pytest.raises(CliError, match="unknown method"):
        resolve(FrontierConfig(out=str(tmp_path), methods=("magic",), **TINY))
    with pytest.raises(CliError, match="stage-sparsity"):
        resolve(FrontierConfig(out=str(tmp_path), **{**TINY, "stage_sparsity": 0.5}))
    with pytest.raises(CliError, match="needs --data-root"):
        resolve(FrontierConfig(out=str(tmp_path), **{**TINY, "dataset": "folder"}))
    quick = resolve(FrontierConfig(out=str(tmp_path), quick=True, data_root=str(tmp_path)))
    assert quick.model == "vgg11" and quick.targets == (0.7, 0.5, 0.35) and quick.seeds == (0, 1, 2)
    # a frontier folder refuses runs of other settings
    out = tmp_path / "fr"
    run(FrontierConfig(out=str(out), methods=("uniform",), **TINY))
    assert main(["frontier", "--out", str(out), "--model", "vgg11", "--width-mult", "0.25", "--dataset", "digits",
                 "--targets", "0.6", "--seeds", "0", "--stage-sparsity", "0.2", "--no-progress"]) == 2


def test_frontier_table_mean_and_sample_std_over_seeds():
    from keepgym.experiments.frontier_report import frontier_table

    records = [
        {"method": "uniform", "target_macs": 0.5, "seed": s, "test_accuracy": a, "macs_ratio": 0.5,
         "channel_sparsity": 0.3, "params_ratio": 0.4, "evaluations": 0, "wall_seconds": 1.0}
        for s, a in ((0, 0.80), (1, 0.82), (2, 0.84))
    ]
    (row,) = frontier_table(records, ("uniform",), (0.5,))
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["test_accuracy_mean"] == pytest.approx(0.82)
    assert row["test_accuracy_std"] == pytest.approx(0.02)  # sample std (ddof=1)


def test_frontier_table_header_names_a_given_checkpoint_instead_of_nan():
    from keepgym.experiments.frontier_report import frontier_markdown

    trained = frontier_markdown([], {"test_accuracy": 0.6848, "macs": 11.2e6, "params": 1.77e6}, "vgg11", 0.25)
    assert trained.startswith("Baseline vgg11 (width 0.25): test accuracy 68.48 %, 11.20M MACs, 1.770M params.")
    given = frontier_markdown([], {"checkpoint": "base/model.pt"}, "vgg11", 0.25)
    assert "`base/model.pt` (given, not re-measured)" in given and "nan" not in given
