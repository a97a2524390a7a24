"""Lint contracts run by `make test` with the project's own ruff configuration (pyproject [tool.ruff]):
no module of agent/, engines/ or converters/ reaches into another object's private members (SLF001)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "engines", "converters")


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install 'scanside[test]')")
    return [found]


def _check(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def test_no_private_access_across_modules():
    proc = _check("--config", str(ROOT / "pyproject.toml"), *PACKAGES)
    assert proc.returncode == 0, "private members used across modules (add a public method instead):\n" + proc.stdout + proc.stderr


def test_the_lint_catches_a_private_reach(tmp_path):
    """The contract can fail: the same configuration flags a module that reaches into another's private member."""
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "reach.py").write_text("def f(tracker):\n    tracker._ended.clear()\n")
    proc = _check("--config", str(ROOT / "pyproject.toml"), "agent", cwd=tmp_path)
    assert proc.returncode == 1 and "SLF001" in proc.stdout, proc.stdout + proc.stderr
