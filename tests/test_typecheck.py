"""mypy on the lower layers: decoding, inference and protocol (issue 22).

The files and settings are pyproject.toml's [tool.mypy] (its `files` list is the one place that names
them); this runs `python -m mypy` as a developer would and fails on any error.  A canary module with one
deliberate type error is checked in the same run: the configuration must report it, so a setting that
silences errors (ignore_errors, a follow_imports that skips the files) fails this test too."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CANARY = '''def half(n: int) -> int:
    return n / 2
'''


def _mypy_files() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as fp:
        return list(tomllib.load(fp)["tool"]["mypy"]["files"])


def test_the_listed_files_exist():
    missing = [f for f in _mypy_files() if not (ROOT / f).is_file()]
    assert not missing, f"[tool.mypy] files names files that do not exist: {missing}"


def test_lower_layers_type_check(tmp_path):
    canary = tmp_path / "typecheck_canary.py"
    canary.write_text(CANARY)
    # files on the command line replace `files` from the configuration: pass them all, and a fresh cache
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", *_mypy_files(), str(canary)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    lines = [ln for ln in r.stdout.splitlines() if ": error:" in ln]
    canary_errors = [ln for ln in lines if ln.startswith(str(canary))]
    others = [ln for ln in lines if not ln.startswith(str(canary))]
    assert not r.stderr.strip(), r.stderr
    assert len(canary_errors) == 1 and "[return-value]" in canary_errors[0], \
        f"mypy did not report the canary's error; is the configuration silencing errors?\n{r.stdout}"
    assert not others, "mypy errors in the decoding, inference or protocol layers:\n" + "\n".join(others)
