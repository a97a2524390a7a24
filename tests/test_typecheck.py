"""mypy on the lower layers: decoding, inference and protocol (issue 22).

The files and settings are pyproject.toml's [tool.mypy] (its `files` list is the one place that names
them); this runs mypy on them and fails on any error.  A canary module with one deliberate type error is
checked in the same run: the configuration must report it, so a setting that silences errors
(ignore_errors, a follow_imports that skips the files) fails this test too.

mypy finds modules by their import names in folders; an editable install that maps the folders into the
`scanside` namespace (setuptools package-dir: scanside.agent <- agent/) does so with an import hook that mypy
cannot see.  So the check runs in a tree of links that lays each folder out under its import name, from
pyproject's package mapping (without one, each folder under its own name)."""
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


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fp:
        return tomllib.load(fp)


def _mypy_files() -> list[str]:
    return list(_project()["tool"]["mypy"]["files"])


def _import_roots() -> dict[str, str]:
    """Import name -> folder: setuptools' package-dir when the project maps its folders into a namespace,
    else each packages.find folder under its own name."""
    setuptools = _project()["tool"]["setuptools"]
    if "package-dir" in setuptools:
        return {name: folder for name, folder in setuptools["package-dir"].items() if name}
    return {p.rstrip("*"): p.rstrip("*") for p in setuptools["packages"]["find"]["include"]}


def _import_tree(tree: Path) -> dict[str, str]:
    """Links tree/<import path> -> each folder; returns folder -> its path in the tree."""
    where = {}
    for name, folder in _import_roots().items():
        link = tree.joinpath(*name.split("."))
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT / folder, target_is_directory=True)
        where[folder] = link.relative_to(tree).as_posix()
    return where


def _in_tree(path: str, where: dict[str, str]) -> str:
    """A listed path (agent/x.py, or scanside/agent/x.py through the checkout's scanside/ links) in the tree."""
    parts = path.split("/")
    if parts[0] not in where and len(parts) > 2:  # scanside/agent/...: the namespace folder of links
        parts = parts[1:]
    return f"{where[parts[0]]}/{'/'.join(parts[1:])}"


def test_the_listed_files_exist():
    missing = [f for f in _mypy_files() if not (ROOT / f).is_file()]
    assert not missing, f"[tool.mypy] files names files that do not exist: {missing}"


def test_lower_layers_type_check(tmp_path):
    tree = tmp_path / "tree"
    where = _import_tree(tree)
    canary = tree / "typecheck_canary.py"
    canary.write_text(CANARY)
    files = [_in_tree(f, where) for f in _mypy_files()]
    # files on the command line replace `files` from the configuration; module names are taken from the
    # tree's root (explicit_package_bases: `scanside` is a namespace package, no __init__.py); a fresh cache
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--explicit-package-bases",
         "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", *files, canary.name],
        cwd=tree, capture_output=True, text=True, timeout=600,
    )
    lines = [ln for ln in r.stdout.splitlines() if ": error:" in ln]
    canary_errors = [ln for ln in lines if ln.startswith(canary.name)]
    others = [ln for ln in lines if not ln.startswith(canary.name)]
    assert not r.stderr.strip(), r.stderr
    assert len(canary_errors) == 1 and "[return-value]" in canary_errors[0], \
        f"mypy did not report the canary's error; is the configuration silencing errors?\n{r.stdout}"
    assert not others, "mypy errors in the decoding, inference or protocol layers:\n" + "\n".join(others)
