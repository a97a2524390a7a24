"""JetPack 6 ships Python 3.10: nothing in the project may need a newer interpreter.
vermin parses every module and reports the minimum version each construct needs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["agent", "engines", "converters", "simulator", "training", "bench"]


def test_every_module_runs_on_python_310():
    pytest.importorskip("vermin")
    vermin = Path(sys.executable).parent / "vermin"
    out = subprocess.run(
        [str(vermin), "--target=3.10-", "--no-tips", "--violations", "--eval-annotations",
         *[str(REPO / p) for p in PACKAGES if (REPO / p).exists()]],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_tomllib_has_a_310_fallback():
    text = (REPO / "agent" / "runtime" / "config.py").read_text()
    assert "import tomli as tomllib" in text
