"""The demo pipeline in its quick configuration: report structure and figure provenance."""

import json
import re

from PIL import Image

from keepgym.experiments.cli import main


def test_quick_demo_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "RL-Pruner on digits" in printed and "AgentViT on digits" in printed

    report = (out / "report.md").read_text()
    run_id = re.search(r"Run id: `([^`]+)`", report).group(1)
    assert json.loads((out / "summary.json").read_text())["run_id"] == run_id
    assert "## RL-Pruner" in report and "## AgentViT" in report
    # one table per method, with every compared method as a row
    for row in (
        "| baseline (unpruned) |",
        "| rlpruner |",
        "| uniform |",
        "| global |",
        "| full-patch ViT",
        "| AgentViT: agent's patches |",
        "random-k",
        "attention top-k",
    ):
        assert row in report, row
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(figures) == 3
    for rel in figures:
        path = out / rel
        assert path.exists(), rel
        with Image.open(path) as img:
            assert img.text.get("keepgym-run") == run_id, f"{rel} was not made by this run"
            assert img.size[0] > 300 and img.size[1] > 200
    # TensorBoard events of every part are in the run folder
    assert list(out.rglob("events.out.tfevents*"))
    # a second run without --force is refused, the first report stays
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert (out / "report.md").read_text() == report
