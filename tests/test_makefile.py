"""Issue 21 (1, 2, 4): what `make run` and `make test` would do, read from `make -n -B` (nothing is
run): `make run` installs the runtime only into the one .venv, says how to put `scanside` on PATH, and
imports the TAPS gland model as an announced, non-fatal step; `make test` says what it installs."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def dry_run(target: str) -> str:
    out = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_run_installs_the_runtime_only_and_says_how_to_reach_scanside():
    text = dry_run("run")
    installs = [ln for ln in text.splitlines() if "pip install" in ln and "upgrade pip" not in ln]
    assert installs and all(re.search(r"-e \.$", ln.strip()) for ln in installs), installs
    assert "[test" not in text and "train]" not in text and "mlserver" not in text.lower()
    assert "-m venv .venv" in text and ".venv-" not in text  # one venv
    assert 'export PATH=' in text and ".venv/bin" in text
    # the TAPS import: announced, and a failure only warns
    taps = text[text.index("import-taps") - 400:text.index("import-taps") + 400]
    assert "optional step" in taps and "|| echo" in taps and "SCANSIDE_OFFLINE" in taps
    assert text.index("import-taps") < text.index("scanside demo")


def test_make_test_says_what_it_installs_and_installs_orthanc():
    text = dry_run("test")
    said = text[:text.index("pip install")]
    for what in ("Debian packages", "orthanc", ".venv-mlserver", "lavlab-taps", "wheels"):
        assert what in said, what
    assert "Orthanc:orthanc" in text and "'.[test,train]'" in text
