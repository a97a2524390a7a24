"""Protocol profiles and checks: loading and overriding profiles, the geometry and completeness
checks, exam end (quiet period, explicit 'exam done', restart), idempotent keys, one real-time run."""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from scanside.agent.runtime.config import ConfigError, load_config
from scanside.agent.service.daemon import Agent
from scanside.agent.intake.pipeline import Pipeline
from scanside.agent.protocol.profiles import ProfileError, Range, load_profile
from scanside.agent.protocol.checker import ProtocolChecker, description_family
from scanside.agent.state.database import StateStore
from scanside.simulator.scanner import simulate_exam, stream_exam
from tests.agent.protocol_helpers import codes, deviations, reduced_exam, scan

# ---------------------------------------------------------------------------- profiles


def test_shipped_profiles_and_extension():
    mp, bp = load_profile("pirads-2.1-mpmri"), load_profile("pirads-2.1-bpmri")
    assert mp.required["dce"].enabled and not bp.required["dce"].enabled
    assert bp.extends == "pirads-2.1-mpmri" and bp.parameters == mp.parameters  # inherited, not copied by hand
    assert mp.parameters["dwi"].repetition_time_ms == Range(gt=3000)
    assert mp.b_values.high.contains(1400) and not mp.b_values.high.contains(1000)
    assert mp.parameters["t2w_axial"].in_plane_fine_mm is None  # see the TOML: frequency limit off by default


def test_site_profile_overrides_key_by_key(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('extends = "pirads-2.1-bpmri"\nname = "site-x"\n'
                    '[parameters.t2w_axial]\nslice_thickness_mm = { le = 3.5 }\n'
                    '[severity]\nSLICE_GAP = "info"\n')
    p = load_profile(site=site)
    assert p.name == "site-x" and p.extends == "pirads-2.1-bpmri"
    assert p.parameters["t2w_axial"].slice_thickness_mm == Range(le=3.5)
    assert p.parameters["t2w_axial"].fov_mm == Range(ge=120, le=200)  # untouched keys kept
    assert not p.required["dce"].enabled and p.severity_of("SLICE_GAP", "warning") == "info"
    # without extends, the site profile overrides the configured profile
    site2 = tmp_path / "site2.toml"
    site2.write_text('name = "site-y"\n[required.t2w_orthogonal]\nenabled = false\n')
    assert load_profile("pirads-2.1-mpmri", site2).required["dce"].enabled
    assert not load_profile("pirads-2.1-bpmri", site2).required["dce"].enabled


def test_invalid_profiles_are_refused_naming_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "pirads-2.1-mpmri"\n[parameters.dwi]\nslice_thickness_mm = { le = 2, ge = 4 }\n')
    with pytest.raises(ProfileError, match="parameters.dwi.slice_thickness_mm"):
        load_profile(str(bad))
    typo = tmp_path / "typo.toml"
    typo.write_text('extends = "pirads-2.1-mpmri"\n[parameters.dwi]\nslice_thicknes_mm = { le = 4 }\n')
    with pytest.raises(ProfileError, match="slice_thicknes_mm"):
        load_profile(str(typo))
    loop = tmp_path / "loop.toml"
    loop.write_text('name = "loop"\nextends = "loop.toml"\n')
    with pytest.raises(ProfileError, match="extends itself"):
        load_profile(str(loop))
    with pytest.raises(ConfigError, match="protocol"):
        load_config(**{"protocol.site_profile": str(typo)})
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config(**{"protocol.profile": "pirads-9"})


def test_profiles_cli(tmp_path, capsys):
    from scanside.agent.cli import main

    def run(*args):
        code = main(["profiles", *args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    out = run("list")
    assert out.returncode == 0 and "pirads-2.1-mpmri" in out.stdout and "pirads-2.1-bpmri" in out.stdout
    shown = json.loads(run("show", "pirads-2.1-bpmri").stdout)
    assert shown["required"]["dce"]["enabled"] is False and shown["b_values"]["high"] == {"ge": 1400.0}
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "pirads-2.1-mpmri"\n[geometry]\nangle_tolerance_deg = -1\n')
    res = run("check", str(bad))
    assert res.returncode == 2 and "geometry.angle_tolerance_deg" in res.stderr
    good = tmp_path / "good.toml"
    good.write_text('extends = "pirads-2.1-bpmri"\nname = "ok"\n')
    res = run("check", str(good))
    assert res.returncode == 0 and "valid profile 'ok'" in res.stdout


@pytest.mark.parametrize("desc,family", [
    ("t2_tse_tra", "T2"), ("Ax T2 FRFSE", "T2"), ("T2W_TSE_SPAIR_cor", "T2"), ("ep2d_diff_b50_800_1400_tra_TRACEW", "DWI"),
    ("Ax DWI b0_1000_1400", "DWI"), ("DWI_SPAIR_b50_1000_1400", "DWI"), ("ep2d_diff_b50_800_ADC", "ADC"),
    ("Apparent Diffusion Coefficient (mm2/s)", "ADC"), ("ep2d_diff_b1400_CALC_BVAL", "DWI"), ("t1_vibe_fs_tra_dyn", "T1"),
    ("Ax LAVA-Flex DCE", "T1"), ("T1W_TSE_ax", "T1"), ("t1_tse_tra", "T1"), ("localizer", None), ("Survey", None),
])
def test_description_family(desc, family):
    assert description_family(desc) == family


# ---------------------------------------------------------------------------- geometry, completeness


def _shift_diffusion(spec):
    if spec.kind in ("dwi", "adc", "calc_bvalue"):
        return spec.model_copy(update={"center_offset_mm": (0.0, 0.0, 15.0)})
    return spec


@pytest.fixture(scope="module")
def shifted_exam(tmp_path_factory):
    """A GE bpMRI exam whose DWI and ADC slabs sit 15 mm above the axial T2W."""
    out = tmp_path_factory.mktemp("shifted") / "exam"
    truth = simulate_exam("ge", out, 31, profile="prostate-bpmri",
                          exam=reduced_exam("prostate-bpmri", "ge", edit=_shift_diffusion))
    return out, truth


def test_dwi_and_adc_away_from_the_t2w_are_misaligned(shifted_exam, tmp_path):
    folder, truth = shifted_exam
    _, store = scan(folder, tmp_path / "state", profile="pirads-2.1-bpmri")
    found = deviations(store)
    assert {d.code for d in found} == {"DWI_T2_MISALIGNED"}
    dwi_adc = {s.series_number for s in truth.series if s.kind in ("dwi", "adc")}
    assert {d.series_number for d in found} == dwi_adc  # one alert per acquisition, not per b-value
    assert all("+15.0 mm along the slice normal" in (d.measured or "") for d in found)
    # a looser site tolerance accepts it
    site = tmp_path / "site.toml"
    site.write_text("[geometry]\ncenter_tolerance_mm = 20\nedge_tolerance_mm = 20\n")
    _, store2 = scan(folder, tmp_path / "state2", profile="pirads-2.1-bpmri", site=site)
    assert codes(store2) == set()


def test_series_short_of_its_count_is_incomplete_unless_a_file_was_quarantined(shifted_exam, tmp_path):
    folder, truth = shifted_exam
    copy = tmp_path / "exam"
    shutil.copytree(folder, copy)
    t2 = next(s for s in truth.series if s.kind == "t2w" and s.plane == "axial")
    (copy / t2.files[1]).unlink()  # never arrived: a protocol/transfer gap the technologist must fix
    _, store = scan(copy, tmp_path / "state", profile="pirads-2.1-bpmri")
    inc = [d for d in deviations(store) if d.code == "SERIES_INCOMPLETE"]
    assert [(d.series_number, d.measured, d.required) for d in inc] == [(t2.series_number, f"{len(t2.files) - 1} images", f"{len(t2.files)} images")]
    assert codes(store) == {"SERIES_INCOMPLETE", "DWI_T2_MISALIGNED"}


def test_site_can_enforce_the_frequency_limit(shifted_exam, tmp_path):
    folder, _ = shifted_exam
    site = tmp_path / "site.toml"
    site.write_text('[parameters.t2w_axial]\nin_plane_fine_mm = { le = 0.4 }\n[geometry]\nenabled = false\n')
    _, store = scan(folder, tmp_path / "state", profile="pirads-2.1-bpmri", site=site)
    found = deviations(store)
    assert [(d.code, d.measured, d.required) for d in found] == [("IN_PLANE_RESOLUTION", "0.625 mm", "≤ 0.4 mm")]


# ---------------------------------------------------------------------------- exam end, keys, restarts


def _pipeline(state: Path, **kw) -> Pipeline:
    config = load_config(**{"state.dir": str(state), "protocol.profile": "pirads-2.1-bpmri", **kw})
    return Pipeline(config, StateStore(config.db_path))


def _files(folder: Path, truth, kinds=None) -> list[Path]:
    return [folder / f for s in truth.series if kinds is None or s.kind in kinds for f in s.files]


def test_exam_end_by_quiet_period_then_explicit_done_and_restart(shifted_exam, tmp_path):
    folder, truth = shifted_exam
    p = _pipeline(tmp_path / "state", **{"protocol.exam_quiet_period_s": 0.3})
    for f in _files(folder, truth, kinds={"localizer", "t2w", "t2w_fs", "dwi"}):  # no ADC yet
        assert p.process_file(str(f)).status == "ingested"
    p.complete_all()
    before = codes(p.store)
    assert before == {"DWI_T2_MISALIGNED"}  # checked as each series completed, before the exam ends
    time.sleep(0.4)
    p.tick()
    ended = [e for e in p.store.events_after(0, limit=10000) if e.type == "exam_completed"]
    assert len(ended) == 1 and ended[0].reason == "quiet_period"
    missing = [d for d in deviations(p.store) if d.code == "SERIES_MISSING"]
    assert [d.required for d in missing] == ["ADC map"] and missing[0].severity == "critical"
    assert ended[0].n_deviations == len(deviations(p.store))
    n = p.store.last_event_seq()
    p.tick()
    assert p.store.last_event_seq() == n  # ended once
    # a restart: nothing repeats (the event log is the state)
    p.store.close()
    p = _pipeline(tmp_path / "state", **{"protocol.exam_quiet_period_s": 0.3})
    time.sleep(0.4)
    p.tick()
    p.end_exams()
    assert p.store.last_event_seq() == n
    # the ADC arrives late: the exam reopens, its next end is round 2, and the ADC is no longer missing
    for f in _files(folder, truth, kinds={"adc"}):
        p.process_file(str(f))
    assert p.exam_done(truth.study_uid) > 0
    ended = [e for e in p.store.events_after(0, limit=10000) if e.type == "exam_completed"]
    assert [(e.reason, e.key.endswith(":2")) for e in ended] == [("quiet_period", False), ("operator", True)]
    assert [d.required for d in deviations(p.store) if d.code == "SERIES_MISSING"] == ["ADC map"]  # only round 1's


def test_same_fact_same_key(shifted_exam, tmp_path):
    folder, _ = shifted_exam
    pipeline, store = scan(folder, tmp_path / "state", profile="pirads-2.1-bpmri")
    completed = [e for e in store.events_after(0, limit=10000) if e.type == "series_completed"]
    again = ProtocolChecker(load_profile("pirads-2.1-bpmri"), store).after(completed)
    assert again and {d.key for d in again} == {d.key for d in deviations(store)}
    assert {d.alert_id for d in again} == {d.alert_id for d in deviations(store)}
    assert all(store.append_event(d) is None for d in again)


def test_a_failing_check_never_stops_ingestion(shifted_exam, tmp_path, monkeypatch):
    folder, truth = shifted_exam
    p = _pipeline(tmp_path / "state")

    def boom(self, events):
        raise RuntimeError("checker bug")

    monkeypatch.setattr(ProtocolChecker, "after", boom)
    outcomes = [p.process_file(str(f)).status for f in _files(folder, truth)]
    assert set(outcomes) == {"ingested"}
    assert p.store.event_counts().get("series_completed", 0) >= len(truth.series)


# ---------------------------------------------------------------------------- real time


def test_real_time_exam_alerts_as_series_complete_and_at_exam_end(tmp_path):
    src = tmp_path / "src"
    truth = simulate_exam("siemens", src, 41, faults=["b1000_high", "missing_adc"], profile="prostate-bpmri",
                          exam=reduced_exam("prostate-bpmri", "siemens", ["b1000_high", "missing_adc"]))
    config = load_config(**{
        "watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"), "output.stdout": False,
        "watch.settle_s": 0.2, "series.quiet_period_s": 1.0, "ingest.quarantine_after_s": 1.0,
        "ingest.retry_delays_s": [0.2, 0.4], "protocol.profile": "pirads-2.1-bpmri", "protocol.exam_quiet_period_s": 2.0})
    seen: list = []
    done = threading.Event()

    def on_event(ev):
        seen.append(ev)
        if ev.type == "exam_completed":
            done.set()

    with Agent(config) as agent:
        agent.subscribe(on_event, from_now=False)
        stream_exam(src, tmp_path / "export", rate=200.0, ground_truth=truth)
        assert done.wait(90), [e.type for e in seen]
        time.sleep(0.3)
    by_type = [e.type for e in seen]
    devs = [e for e in seen if e.type == "protocol_deviation"]
    assert sorted(d.code for d in devs) == ["DWI_HIGH_B_TOO_LOW", "SERIES_MISSING"]
    high = next(d for d in devs if d.code == "DWI_HIGH_B_TOO_LOW")
    calc = next(s for s in truth.series if s.kind == "calc_bvalue")
    # recorded in the same transaction as the calculated series' completion: the very next event
    i = next(i for i, e in enumerate(seen) if e.type == "series_completed" and e.series.series_uid == calc.series_uid)
    assert seen[i + 1].key == high.key and high.series_number == calc.series_number
    # the missing ADC is only known when the exam ends: recorded in ExamCompleted's transaction, right before it
    # (the image side's labels of the last series may still follow, on a loaded machine)
    end = by_type.index("exam_completed")
    assert by_type.count("exam_completed") == 1 and seen[end - 1].type == "protocol_deviation"
    assert seen[end - 1].code == "SERIES_MISSING"
    assert all(t in ("series_classified", "label_mismatch") for t in by_type[end + 1:]), by_type[end + 1:]
    text = json.dumps([d.model_dump(mode="json") for d in devs])
    for phi in (truth.patient_name, truth.patient_id, truth.accession_number, truth.patient_birth_date):
        assert phi and phi not in text
