"""Real-data regression: `scanside scan --json` over every real data set here, held to dcm2niix's
conversion of the same files (its sidecars' ImageType, its .bval) and to the header labels that
../shared/realdata/README.md lists; and every real series completes exactly once when streamed.

dcm_qa_nih ships dcm2niix's reference (Ref/); for the prostate sets the test runs dcm2niix (a test
dependency) itself.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from scanside.agent.cli import main as cli_main
from scanside.agent.dicom.vendor import vendor_of

from .realdata import DCM_QA_NIH, PROSTATEX, QIN_ADC, REALDATA, dicom_files, need, stream

DWI = {"DWI_Low", "DWI_High"}

# The header labels ../shared/realdata/README.md states, by (vendor, series number).
README_LABELS = {
    "dcm_qa_nih": {("ge", n): "other" for n in (4, 5, 6, 7)},  # GE fMRI EPI: not diffusion
    "ProstateX-0218": {("siemens", 4): "T2WI_nan", ("siemens", 5): "T2WI_nan", ("siemens", 6): "T2WI_nan"},
    "QIN-PROSTATE-01-0001-ADC": {("ge", 701): "ADC"},  # GE writes (0043,1039) = 500 on the map
}
DATASETS = {"dcm_qa_nih": DCM_QA_NIH, "ProstateX-0218": PROSTATEX, "QIN-PROSTATE-01-0001-ADC": QIN_ADC}


def _dcm2niix() -> list[str]:
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).with_name("dcm2niix"))
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "dcm2niix"]


def _reference(name: str, folder: Path, tmp_path: Path) -> dict[tuple[str, int], dict]:
    """{(vendor, series number): {"image_type": tokens, "bvals": set or None}} from dcm2niix's sidecars."""
    ref = folder / "Ref"
    if not ref.is_dir():
        ref = tmp_path / f"ref-{name}"
        ref.mkdir()
        cmd = _dcm2niix() + ["-b", "y", "-z", "n", "-f", "%s_%p_%t", "-o", str(ref), str(folder)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out: dict[tuple[str, int], dict] = defaultdict(lambda: {"image_type": set(), "bvals": None})
    for sidecar in ref.glob("*.json"):
        meta = json.loads(sidecar.read_text())
        entry = out[(vendor_of(meta["Manufacturer"]), int(meta["SeriesNumber"]))]
        entry["image_type"] |= {t.upper() for t in meta.get("ImageType", [])}
        bval = sidecar.with_suffix(".bval")
        if bval.exists():
            values = {round(float(v) / 10) * 10.0 for v in bval.read_text().split()}
            entry["bvals"] = (entry["bvals"] or set()) | values
    assert out, f"no dcm2niix sidecars for {name}"
    return dict(out)


def _scan(folder: Path, capsys) -> dict:
    # 5: a critical deviation from the prostate protocol, as a brain fMRI set has; the decoding ran
    assert cli_main(["scan", "--json", str(folder)]) in (0, 5)
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", list(DATASETS))
def test_scan_json_matches_dcm2niix_and_readme(name, tmp_path, capsys):
    folder = need(DATASETS[name])
    ref = _reference(name, folder, tmp_path)
    report = _scan(folder / "In" if (folder / "In").is_dir() else folder, capsys)
    assert report["quarantined"] == []
    ours: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for s in report["series"]:
        ours[(s["vendor"], s["series_number"])].append(s)
    assert set(ref) <= set(ours), f"series dcm2niix converted that scan did not report: {set(ref) - set(ours)}"
    readme = README_LABELS[name]
    for key, r in sorted(ref.items()):
        parts = ours[key]
        labels = {s["label"] for s in parts}
        b_values = {b for s in parts for b in s["b_values"]}
        where = f"{name} series {key}: ours {[(s['label'], s['b_values'], s['reason']) for s in parts]}, dcm2niix {r}"
        if key in readme:
            assert labels == {readme[key]}, where
        if "ADC" in r["image_type"] or readme.get(key) == "ADC":
            # dcm2niix keeps the source b-value of a map in a .bval; a map is no DWI and lists none
            assert labels == {"ADC"} and b_values == set(), where
        elif "FA" in r["image_type"]:
            assert labels == {"other"} and b_values == set(), where
        elif r["bvals"] is not None:  # diffusion (a TRACEW among it): every part a DWI at dcm2niix's b-values
            assert labels <= DWI and b_values == r["bvals"], where
            assert all((s["label"] == "DWI_High") == (max(s["b_values"]) >= 500) for s in parts), where
        else:
            assert not labels & DWI and b_values == set(), where


@pytest.mark.parametrize("order", ["scanner", "interleaved"])
def test_every_real_series_completes_exactly_once(tmp_path, order):
    if not REALDATA.is_dir():
        pytest.skip(f"real DICOM not here: {REALDATA}")
    files = [f for folder in DATASETS.values() if folder.is_dir() for f in dicom_files(folder)]
    if order == "interleaved":  # every series sending at once (parallel C-STORE associations), in random turns
        queues = defaultdict(list)
        for f in files:
            queues[f.parent].append(f)
        rng, files = random.Random(19), []
        while queues:
            folder = rng.choice(sorted(queues))
            files.append(queues[folder].pop(0))
            if not queues[folder]:
                del queues[folder]
    events = stream(files, tmp_path / "state")
    assert [e for e in events if e.type == "series_reopened"] == []
    done = [e for e in events if e.type == "series_completed"]
    per_part = Counter((e.series.series_id, e.series.revision) for e in done)
    assert set(per_part.values()) == {1}
    assert all(e.series.revision == 1 and e.series.complete for e in done)
    # every file's images are in exactly one completed part
    images = Counter()
    for e in done:
        images[e.series.series_uid] += e.series.n_images
    assert sum(images.values()) >= len(files)
