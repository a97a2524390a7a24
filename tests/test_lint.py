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


def _python_files():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _uses(path: Path, owner: str, names: set[str]) -> list[int]:
    """Lines of `owner.name` attribute uses (threading.Thread, os.environ, os.getenv) in one file."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in names
            and isinstance(node.value, ast.Name) and node.value.id == owner]


def test_threads_are_started_only_by_the_lifecycle_helper():
    """One worker-thread helper (scanside.agent.runtime.lifecycle.WorkerThread) instead of thread boilerplate per module."""
    found = {str(p.relative_to(ROOT)): lines for p in _python_files() if (lines := _uses(p, "threading", {"Thread"}))}
    assert set(found) <= {"agent/runtime/lifecycle.py"}, f"threading.Thread outside agent/runtime/lifecycle.py: {found}"


# the environment names read outside agent/runtime/config.py, and why each is not an agent setting
ENV_READERS = {
    "agent/service/systemd.py": "NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID: the service manager's protocol",
    "agent/runtime/malloc.py": "MALLOC_ARENA_MAX: glibc's own variable (set by the operator or not)",
    "agent/runtime/siteconfig.py": "unknown SCANSIDE_* names: the configuration's own check",
    "agent/analysis/adapt_schedule.py": "the child's environment (a copy, plus the configured model store folders)",
    "engines/base.py": "SCANSIDE_CACHE_DIR: the tools' default cache (the agent passes [engines] cache_dir)",
    "engines/store.py": "the tools' store defaults (the agent passes every [engines] key: ModelStore.from_settings)",
}


def test_settings_are_read_by_the_configuration():
    found = {str(p.relative_to(ROOT)) for p in _python_files() if _uses(p, "os", {"environ", "getenv"})}
    assert found - {"agent/runtime/config.py"} <= set(ENV_READERS), \
        f"environment read outside agent/runtime/config.py (route it through the configuration): {sorted(found - set(ENV_READERS))}"
