from __future__ import annotations

import gzip
import importlib
import os
import shutil
import sys
from pathlib import Path

import nibabel
import pytest

NIBABEL_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"

# every `scanside run` a test starts listens on a free port unless the test names one: a running demo
# or agent on the default 8686 must not fail the suite (a command-line --api-port still wins)
os.environ.setdefault("SCANSIDE_API__PORT", "0")


@pytest.fixture(scope="session")
def nibabel_dicom(tmp_path_factory) -> dict[str, Path]:
    """nibabel's real Siemens/Philips test DICOM, decompressed."""
    out = tmp_path_factory.mktemp("nibabel")
    files = {}
    for name in ("siemens_dwi_1000.dcm.gz", "siemens_dwi_0.dcm.gz", "philips_mprage.dcm.gz"):
        target = out / name[:-3]
        with gzip.open(NIBABEL_DATA / name) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        files[name[:-7]] = target
    return files


@pytest.fixture(scope="session")
def bench_modules():
    """bench/bench_cpu.py and bench/roofline.py as modules (bench/ is scripts, not a package)."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        yield importlib.import_module("bench_cpu"), importlib.import_module("roofline")
    finally:
        sys.path.remove(str(bench))


NOBODY_UID = 65534


@pytest.fixture(scope="session")
def nobody_can_run_the_agent() -> None:
    """Tests that run the agent as an unprivileged user (root may write anywhere) need that user to read this
    checkout: a clone inside a private folder (mktemp -d makes it 0700) cannot be imported by it. Probed once;
    skips with the reason where the user cannot."""
    import subprocess

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("runs the agent as another user (needs root and setpriv)")
    repo = Path(__file__).resolve().parents[1]
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups", sys.executable,
                            "-c", "import scanside.agent.cli"], capture_output=True, text=True, timeout=60, cwd="/",
                           env={**os.environ, "PYTHONPATH": str(repo), "HOME": "/nonexistent"})
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user (uid {NOBODY_UID}) cannot import the agent from {repo} (a folder above it is "
                    f"private?): {probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.returncode}")
