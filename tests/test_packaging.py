"""Packaging: one import name (``keepgym.*``), env ids registered by ``import keepgym``, a wheel that
installs only ``keepgym/`` and works from a folder holding a user's own ``models.py`` and ``agents/``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium as gym
import pytest

import keepgym

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("keepgym", "envs", "agents", "models", "experiments", "tests")


def test_version_and_registration():
    assert keepgym.__version__.count(".") == 2
    for env_id in ("RLPrune-VGG19-v0", "RLPrune-Digits-v0", "PatchSelect-Digits-v0", "PatchSelect-CIFAR10-v0"):
        assert env_id in gym.registry
        assert gym.registry[env_id].entry_point.startswith("keepgym.envs.")


def test_cli_version():
    from keepgym.experiments.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0


def test_no_bare_imports_of_the_package_folders():
    offenders = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    if name.split(".")[0] in {"envs", "agents", "models", "experiments"}:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not offenders, offenders


def _user_folder(tmp_path: Path) -> Path:
    """A folder like a user's project: its own ``models.py`` and ``agents/`` that would shadow bare names."""
    work = tmp_path / "user"
    (work / "agents").mkdir(parents=True)
    (work / "agents" / "__init__.py").write_text("raise ImportError('the user agents package was imported')\n")
    (work / "models.py").write_text("raise ImportError('the user models.py was imported')\n")
    (work / "envs.py").write_text("raise ImportError('the user envs.py was imported')\n")
    return work


def test_gym_make_with_prefix_in_a_fresh_process_beside_user_files(tmp_path):
    code = (
        "import gymnasium as gym, sys; "
        "env = gym.make('keepgym:RLPrune-Digits-v0', pretrained=False, disable_env_checker=True); "
        "obs, _ = env.reset(seed=0); print(type(env.unwrapped).__module__, obs.shape[0] > 4, "
        "'keepgym' in sys.modules)"
    )
    env = {**os.environ, "KEEPGYM_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=_user_folder(tmp_path), env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["keepgym.envs.prune_env", "True", "True"]


def test_wheel_holds_only_keepgym_and_runs_beside_user_files(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("keepgym-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"keepgym", f"keepgym-{keepgym.__version__}.dist-info"}, tops
    for sub in ("envs", "agents", "models", "experiments"):
        assert f"keepgym/{sub}/__init__.py" in names
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    # The wheel's keepgym comes first on the path; its dependencies come from this environment.
    env = {**os.environ, "PYTHONPATH": str(target), "KEEPGYM_CACHE": str(tmp_path / "cache")}
    work = _user_folder(tmp_path)
    code = (
        "import gymnasium as gym, keepgym; "
        "env = gym.make('RLPrune-Digits-v0', pretrained=False, disable_env_checker=True); "
        "print(keepgym.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(target))
    help_out = subprocess.run(
        [sys.executable, "-m", "keepgym", "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert help_out.returncode == 0, help_out.stderr[-2000:]
    assert "prune" in help_out.stdout and "agentvit" in help_out.stdout
