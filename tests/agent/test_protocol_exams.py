"""End to end on simulated exams of every vendor style: each injected protocol fault yields exactly
its deviation code (and nothing else), a clean exam yields none, under both shipped profiles.

The fault matrix runs on reduced exams (a third of the slices per series, same protocol parameters)
to fit the CI budget; the clean exams are the simulator's full-size ones. Exams are simulated once
per session and checked through the one-shot path (`scanside scan`'s Pipeline on the folder).
"""
from __future__ import annotations

import pytest

from scanside.agent.protocol.profiles import Range, load_profile
from scanside.agent.protocol.checker import ProtocolChecker
from scanside.simulator.scanner import simulate_exam
from tests.agent.protocol_helpers import VENDORS, codes, deviations, reduced_exam, scan

# fault -> (exam profile, checked against, the codes it must yield, events)
FAULTS = {
    "b1000_high": ("prostate-bpmri", {"DWI_HIGH_B_TOO_LOW"}, 1),
    "thick_slices": ("prostate-bpmri", {"SLICE_TOO_THICK"}, 1),
    "missing_adc": ("prostate-bpmri", {"SERIES_MISSING"}, 1),
    "missing_high_b": ("prostate-bpmri", {"SERIES_MISSING"}, 1),
    "wrong_fov": ("prostate-bpmri", {"FOV_OUT_OF_RANGE"}, 1),
    "gap": ("prostate-bpmri", {"SLICE_GAP"}, 1),
    "swapped_descriptions": ("prostate-bpmri", {"DESCRIPTION_MISMATCH"}, 2),
    "truncated_file": ("prostate-bpmri", set(), 0),
    "slow_dce": ("prostate-mpmri", {"DCE_TEMPORAL_RESOLUTION"}, 1),
    "coarse_matrix": ("prostate-bpmri", {"IN_PLANE_RESOLUTION"}, 1),
}
CHECKED = {"prostate-bpmri": "pirads-2.1-bpmri", "prostate-mpmri": "pirads-2.1-mpmri"}


@pytest.fixture(scope="session")
def scanned(tmp_path_factory):
    """(vendor, fault or 'clean', exam profile, reduced) -> (exam folder, store after the scan)."""
    cache = {}

    def get(vendor, fault="clean", profile="prostate-bpmri", reduced=True):
        key = (vendor, fault, profile, reduced)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"proto-{vendor}-{fault}")
            faults = [] if fault == "clean" else [fault]
            exam = reduced_exam(profile, vendor, faults) if reduced else None
            simulate_exam(vendor, out / "exam", 23, faults=faults, profile=profile, exam=exam)
            _, store = scan(out / "exam", out / "state", profile=CHECKED[profile])
            cache[key] = (out / "exam", store)
        return cache[key]

    return get


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_yields_exactly_its_code(scanned, vendor, fault):
    profile, expected, n_events = FAULTS[fault]
    _, store = scanned(vendor, fault, profile)
    found = deviations(store)
    assert {d.code for d in found} == expected, [(d.code, d.message) for d in found]
    assert len(found) == n_events, [(d.code, d.series_number, d.message) for d in found]
    for d in found:
        assert d.profile == CHECKED[profile] and d.message.endswith(".") and d.measured and d.required
    if fault == "missing_adc":
        assert found[0].required == "ADC map"
    if fault == "missing_high_b":
        assert "1400" in (found[0].required or "")
    if fault == "b1000_high":
        assert found[0].measured == "b=1000 s/mm²" and found[0].label == "DWI_High"
    if fault in ("thick_slices", "wrong_fov", "gap"):
        assert found[0].label in ("T2WI_nan", "T2WI_fs") and found[0].series_number is not None
    if fault == "swapped_descriptions":
        assert {d.label for d in found} & {"T2WI_nan", "T2WI_fs"} and {d.label for d in found} & {"DWI_Low", "DWI_High"}
    if fault == "truncated_file":
        assert store.quarantined(), "the truncated file is a quarantine, not a deviation"
    ended = [e for e in store.events_after(0, limit=100000) if e.type == "exam_completed"]
    assert len(ended) == 1 and ended[0].n_deviations == n_events


@pytest.mark.parametrize("vendor", VENDORS)
def test_clean_full_size_exam_has_no_deviation_under_either_profile(scanned, vendor):
    _, store = scanned(vendor, "clean", "prostate-mpmri", reduced=False)
    assert codes(store) == set()
    # the same series checked against the bpMRI profile (a DCE series is allowed there)
    checker = ProtocolChecker(load_profile("pirads-2.1-bpmri"), store)
    completed = [e for e in store.events_after(0, limit=100000) if e.type == "series_completed"]
    study = completed[0].study_uid
    assert checker.after(completed) == []
    assert checker.exam_end(study, 2) == []
    # and it really is checked: a profile one notch stricter flags the axial T2W's 3 mm slices
    base = load_profile("pirads-2.1-mpmri")
    t2 = base.parameters["t2w_axial"].model_copy(update={"slice_thickness_mm": Range(le=2.5)})
    strict = base.model_copy(update={"parameters": {**base.parameters, "t2w_axial": t2}})
    found = ProtocolChecker(strict, store).after(completed)
    assert [d.code for d in found] == ["SLICE_TOO_THICK"]


@pytest.mark.parametrize("vendor", VENDORS)
def test_clean_bpmri_exam_has_no_deviation(scanned, vendor):
    _, store = scanned(vendor, "clean", "prostate-bpmri")
    assert codes(store) == set()
    completed = [e for e in store.events_after(0, limit=100000) if e.type == "series_completed"]
    # the bpMRI exam has no DCE: the mpMRI profile says so, and only that
    checker = ProtocolChecker(load_profile("pirads-2.1-mpmri"), store)
    assert checker.after(completed) == []
    missing = checker.exam_end(completed[0].study_uid, 2)
    assert [(d.code, d.required) for d in missing] == [("SERIES_MISSING", "DCE series")]
