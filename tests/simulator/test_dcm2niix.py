"""dcm2niix as an external validator of the vendor writers: the b-values it reads must be the
ones written (GE trace-only DWI reproduces dcm2niix issue #690, see below)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scanside.simulator.model import SeriesSpec
from scanside.simulator.vendors import get_writer, make_study_context
from tests.simulator.fakes import fake_series


def _dcm2niix() -> list[str]:
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).with_name("dcm2niix"))
    if Path(exe).exists():
        return [exe]
    return [sys.executable, "-m", "dcm2niix"]


def _convert(src: Path, out: Path, verbose: bool = False) -> tuple[str, dict[str, list[float]]]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = _dcm2niix() + (["-v", "2"] if verbose else []) + ["-b", "y", "-z", "n", "-f", "%s_%p", "-o", str(out), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    bvals = {p.stem: [float(v) for v in p.read_text().split()] for p in out.glob("*.bval")}
    return r.stdout, bvals


def _write(vendor, spec, dirpath, **kw):
    ctx = make_study_context(vendor, 3)
    directions = kw.pop("directions", False)
    adc = kw.pop("adc", False)
    get_writer(vendor).write_series(fake_series(spec, adc=adc, directions=directions), ctx, dirpath, series_number=5,
                                    series_uid=ctx.uid("s", 5), **kw)


DWI = dict(kind="dwi", n_slices=8, matrix=(64, 64), fov_mm=(200.0, 200.0), fat_sat=True, te_ms=70.0)


@pytest.mark.parametrize("vendor,bvals,kw", [
    ("siemens", [50.0, 800.0], {}),
    ("siemens", [50.0, 800.0], {"mosaic": True}),
    ("siemens-xa", [50.0, 800.0], {}),
    ("philips", [50.0, 1000.0, 1400.0], {"adc": True}),
    ("ge", [0.0, 1000.0, 1400.0], {"directions": True}),
])
def test_dcm2niix_reads_written_bvalues(vendor, bvals, kw, tmp_path):
    spec = SeriesSpec(description=f"dwi_{vendor}", b_values=bvals, **DWI)
    directional = kw.get("directions", False)
    _write(vendor, spec, tmp_path / "dcm", **kw)
    log, found = _convert(tmp_path / "dcm", tmp_path / "nii")
    main = [v for k, v in found.items()]
    assert len(main) == 1, (found, log)
    expect = [b for b in bvals for _ in ([0] if (b == 0 or not directional) else range(3))]
    assert main[0] == expect, log
    # volume count in the NIfTI matches the number of b-values (x directions)
    assert f"x{spec.n_slices}x{len(expect)})" in log, log
    if vendor == "philips":  # dcm2niix splits the appended isotropic ADC off the DWI
        assert len(list((tmp_path / "nii").glob("*.nii"))) == 2


def test_dcm2niix_ge_trace_only_reproduces_issue_690(tmp_path):
    """GE trace (isotropic) images: b>0 with a zero gradient vector. dcm2niix reads each file's
    b-value from (0043,1039) correctly (verbose 'DWI bxyz') and stacks three volumes, but then
    reports b=0 for trace volumes, as with real GE prostate data (dcm2niix issue #690)."""
    spec = SeriesSpec(description="Ax DWI", b_values=[0.0, 1000.0, 1400.0], **DWI)
    _write("ge", spec, tmp_path / "dcm")
    log, found = _convert(tmp_path / "dcm", tmp_path / "nii", verbose=True)
    per_file = sorted({float(line.split()[2]) for line in log.splitlines() if line.strip().startswith("DWI bxyz")})
    assert per_file == [1000.0, 1400.0], log[-3000:]  # b=0 files print no DWI line
    assert f"x{spec.n_slices}x3)" in log
