"""What `make run` and `make test` put in .venv: the installed size of scanside's runtime dependency
closure (`pip install -e .`, what `make run` installs) against the closure with the test and training
extras (`pip install -e '.[test,train]'`, what `make test` adds), read from the installed distributions'
RECORD files. No download, no timing: run it in a venv where `make test` has installed everything.

    python bench/bench_install.py        -> prints the figures, writes bench/results/install.json
"""
from __future__ import annotations

import json
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str], dists: dict) -> set[str]:
    """Installed distributions that *requirements* pull in (markers evaluated, extras followed)."""
    seen: set[str] = set()
    todo = [(Requirement(r), ("",)) for r in requirements]
    while todo:
        req, extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = _norm(req.name)
        if name in seen or name not in dists:
            continue
        seen.add(name)
        for sub in dists[name].requires or []:
            todo.append((Requirement(sub), ("", *req.extras)))
    return seen


def size_bytes(names: set[str], dists: dict) -> int:
    total = 0
    for n in names:
        for f in dists[n].files or []:
            try:
                total += f.locate().stat().st_size
            except OSError:
                pass
    return total


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dists = {_norm(d.metadata["Name"]): d for d in metadata.distributions()}
    runtime = list(project["dependencies"])
    full = runtime + [r for extra in ("test", "train") for r in project["optional-dependencies"][extra]]
    res = {"python": platform.python_version(), "machine": platform.machine(), "stages": {}}
    for stage, reqs in (("make run (runtime)", runtime), ("make test (+ test, train extras)", full)):
        names = closure(reqs, dists)
        wanted = [Requirement(r) for r in reqs]
        missing = sorted({_norm(r.name) for r in wanted if not r.marker or r.marker.evaluate({"extra": ""})} - set(dists))
        mb = size_bytes(names, dists) / 1e6
        largest = sorted(((round(size_bytes({n}, dists) / 1e6, 1), n) for n in names), reverse=True)[:5]
        res["stages"][stage] = {"distributions": len(names), "installed_mb": round(mb), "largest_mb": largest,
                                "not_installed_here": missing}
        print(f"{stage:34} {len(names):3d} distributions  {mb:6.0f} MB  largest: "
              + ", ".join(f"{n} {m:g}" for m, n in largest) + (f"  (not installed here: {missing})" if missing else ""))
    out = ROOT / "bench" / "results" / "install.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
