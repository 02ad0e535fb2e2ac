"""The README's quick start, run as written: it must end with a smaller model that is still accurate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
LINE = re.compile(
    r"before: test acc (?P<acc0>[\d.]+), (?P<macs0>[\d.]+)M MACs, (?P<params0>\d+)k params \| "
    r"after: test acc (?P<acc1>[\d.]+), (?P<macs1>[\d.]+)M MACs, (?P<params1>\d+)k params"
)


def quickstart_code() -> str:
    """The first ``python`` code block after the README's "## Quick start" heading."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Quick start") :]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match is not None, "no python block in the Quick start section"
    return match.group(1)


def test_quickstart_block_is_found_and_compiles():
    code = quickstart_code()
    compile(code, "README quick start", "exec")
    assert "progress_bar=True" in code and "finetune_steps=" in code  # it shows progress and recovers
    assert 'print(\n    f"before: test acc' in code


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path):
    # A fresh cache: the run includes the first-use baseline training, as for a new user.
    env = {**os.environ, "KEEPGYM_CACHE": str(tmp_path / "cache")}
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart_code(), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline epoch 5/5" in proc.stderr  # the first-use training says what it does
    match = LINE.search(proc.stdout)
    assert match is not None, proc.stdout
    fig = {k: float(v) for k, v in match.groupdict().items()}
    assert fig["acc0"] > 0.9
    assert fig["acc1"] > fig["acc0"] - 0.05  # still accurate
    assert fig["macs1"] < 0.6 * fig["macs0"] and fig["params1"] < 0.6 * fig["params0"]  # visibly smaller
    assert list((tmp_path / "runs" / "quickstart" / "tb" / "RLPruner_1").glob("events.out.tfevents*"))
