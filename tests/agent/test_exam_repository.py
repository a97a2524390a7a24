"""The exam read model (scanside.agent.state.exam_repository): kept row by row with every event, equal to a replay
of the event log, equal to what the log says when read the old way (a full scan), unchanged by a
restart, rebuilt on the upgrade of a database that predates it, and rolled back with its event."""
from __future__ import annotations

import sqlite3

import pytest

from scanside.agent.schema.events import AlertAcknowledged, SeriesClassified, TriageResult
from scanside.agent.state.database import StateStore
from scanside.simulator.scanner import simulate_exam
from tests.agent.protocol_helpers import reduced_exam, scan
from tests.agent.realdata import PROSTATEX, need


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """Two simulated exams (one with a protocol fault) through the real one-shot pipeline into one
    state, then the image-side events the analysis sink would add (a label, a mismatch verdict, a
    triage result, an acknowledgement), so that every projection has rows to write."""
    root = tmp_path_factory.mktemp("rm")
    for i, (vendor, faults) in enumerate((("siemens", ["b1000_high"]), ("philips", []))):
        simulate_exam(vendor, root / "exams" / vendor, 31 + i, faults=faults, profile="prostate-bpmri",
                      exam=reduced_exam("prostate-bpmri", vendor, faults))
    _, store = scan(root / "exams", root / "state", profile="pirads-2.1-bpmri")
    study, series = _first_exam(store)
    with store.transaction():
        store.append_event(SeriesClassified(
            key=f"classified:{series.series_id}", study_uid=study, series_id=series.series_id,
            series_number=series.series_number, header_label=series.label, image_label="ADC", image_confidence=0.97,
            probabilities={"ADC": 0.97}, model="sequence-classifier/1.0", backend="onnxruntime", agree=False))
        store.append_event(TriageResult(
            key=f"triage:{study}:x", study_uid=study, alert_id="tr-1", probability=0.7, recommendation="DCE_ADVISED",
            thresholds={"dce": 0.5}, inputs={"T2W": series.series_id}, model="cspca/1.0", backend="onnxruntime"))
        store.append_event(AlertAcknowledged(key="alert_acknowledged:tr-1", study_uid=study, alert_id="tr-1", by="tech"))
    yield root, store
    store.close()


def _first_exam(store: StateStore):  # type: ignore[no-untyped-def]
    rows = store.read_model.exams()
    assert len(rows) == 2
    study = min(rows, key=lambda r: r.first_seq).study_uid
    return study, store.read_model.latest_series(study)[0]


def _from_log(store: StateStore, study: str) -> dict:
    """The exam as the six readers used to rebuild it: one pass over all of its events."""
    latest, first_order, deviations, ends = {}, [], [], 0
    for ev in store.events_after(0, limit=1_000_000, study_uid=study):
        if ev.type == "series_completed":
            if ev.series.series_id not in latest:
                first_order.append(ev.series.series_id)
            latest.pop(ev.series.series_id, None)
            latest[ev.series.series_id] = ev.series
        elif ev.type == "protocol_deviation":
            deviations.append(ev.key)
        elif ev.type == "exam_completed":
            ends += 1
    return {"latest_order": list(latest), "first_order": first_order, "latest": latest, "deviations": deviations,
            "rounds": ends}


def test_read_model_equals_a_full_scan_of_the_log(scanned):
    _, store = scanned
    rm = store.read_model
    for exam in rm.exams():
        old = _from_log(store, exam.study_uid)
        assert [s.series_id for s in rm.latest_series(exam.study_uid, "last_completed")] == old["latest_order"]
        assert [s.series_id for s in rm.latest_series(exam.study_uid)] == old["first_order"]
        assert {s.series_id: s for s in rm.latest_series(exam.study_uid)} == old["latest"]
        assert [e.key for e in rm.findings(exam.study_uid, ("protocol_deviation",))] == old["deviations"]
        assert exam.rounds == old["rounds"] == 1 and exam.state == "completed"
        assert exam.n_series == len(old["latest"]) > 3
        assert exam.n_deviations == len(old["deviations"])
    faulty = [e for e in rm.exams() if e.n_deviations]
    assert len(faulty) == 1 and [d.code for d in rm.findings(faulty[0].study_uid, ("protocol_deviation",))] == ["DWI_HIGH_B_TOO_LOW"]


def test_image_side_events_are_projected(scanned):
    _, store = scanned
    study, series = _first_exam(store)
    row = store.read_model.series_row(series.series_id)
    assert row is not None and row.classification is not None
    assert row.classification.image_label == "ADC" and row.classification.agree is False
    exam = store.read_model.exam(study)
    assert exam is not None and exam.triage == "DCE_ADVISED" and exam.triage_result["alert_id"] == "tr-1"
    assert exam.n_image_results == 2 and store.read_model.exams_with_image_results() == 1
    alert = store.read_model.alert_row("tr-1")
    assert alert is not None and alert.acknowledged and alert.acknowledged_by == "tech"
    assert exam.n_alerts == exam.n_deviations + 1 and exam.n_open_alerts == exam.n_alerts - 1


def test_rebuild_from_the_log_equals_the_incremental_tables_row_by_row(scanned):
    _, store = scanned
    kept = store.read_model.dump()
    assert all(kept[t] for t in kept), {t: len(v) for t, v in kept.items()}
    replayed = store.rebuild_read_model()
    assert replayed == store.count_events()
    rebuilt = store.read_model.dump()
    for table in kept:
        assert len(rebuilt[table]) == len(kept[table]), table
        for a, b in zip(kept[table], rebuilt[table]):
            assert a == b, table


def test_a_restart_sees_the_same_read_model(scanned):
    root, store = scanned
    kept = store.read_model.dump()
    again = StateStore(root / "state" / "state.sqlite")
    try:
        assert again.read_model.dump() == kept
    finally:
        again.close()


def test_a_database_from_before_the_read_model_is_rebuilt_on_open(scanned, tmp_path, caplog):
    root, store = scanned
    kept = store.read_model.dump()
    old = tmp_path / "state.sqlite"
    src = sqlite3.connect(str(root / "state" / "state.sqlite"))
    src.execute("VACUUM INTO ?", (str(old),))
    src.close()
    db = sqlite3.connect(str(old))
    for table in kept:
        db.execute(f"DROP TABLE {table}")  # as schema version 1 left it
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    upgraded = StateStore(old)
    try:
        assert upgraded.read_model.dump() == kept
    finally:
        upgraded.close()
    assert f"exam read model rebuilt from {store.count_events()} events" in caplog.text
    db = sqlite3.connect(str(old))
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
    db.close()


def test_an_event_rolled_back_leaves_no_read_model_row(tmp_path):
    store = StateStore(tmp_path / "s.sqlite")
    try:
        with pytest.raises(RuntimeError), store.transaction():
            store.append_event(TriageResult(
                key="triage:9.9:x", study_uid="9.9", alert_id="tr-9", probability=0.2, recommendation="BPMRI_SUFFICIENT",
                thresholds={}, inputs={}, model="m", backend="b"))
            assert store.read_model.exam("9.9") is not None  # visible inside its own transaction
            raise RuntimeError("crash before the commit")
        assert store.read_model.exam("9.9") is None and store.read_model.alert_row("tr-9") is None
        assert store.count_events() == 0
    finally:
        store.close()


def test_real_prostatex_exam_rebuilds_to_the_same_rows(tmp_path):
    folder = need(PROSTATEX)
    _, store = scan(folder, tmp_path / "state", profile="pirads-2.1-mpmri")
    try:
        kept = store.read_model.dump()
        study = store.read_model.exams()[0].study_uid
        assert len(store.read_model.latest_series(study)) >= 20  # 26 acquisitions, some split by b-value
        assert [s.series_id for s in store.read_model.latest_series(study)] == _from_log(store, study)["first_order"]
        store.rebuild_read_model()
        assert store.read_model.dump() == kept
    finally:
        store.close()


def test_scan_report_reads_the_read_model(scanned):
    from scanside.agent.cli import scan_report

    _, store = scanned
    report = scan_report(store)
    n = sum(len(store.read_model.latest_series(e.study_uid)) for e in store.read_model.exams())
    assert len(report["series"]) == n
    assert [d["code"] for d in report["deviations"]] == ["DWI_HIGH_B_TOO_LOW"]



def test_state_rebuild_command_repairs_the_read_model(scanned, tmp_path, capsys):
    from scanside.agent.cli import main

    root, store = scanned
    kept = store.read_model.dump()
    src = sqlite3.connect(str(root / "state" / "state.sqlite"))
    src.execute("VACUUM INTO ?", (str(tmp_path / "state.sqlite"),))
    src.close()
    db = sqlite3.connect(str(tmp_path / "state.sqlite"))
    db.execute("DELETE FROM rm_series")
    db.execute("UPDATE rm_exams SET data = json_set(data, '$.rounds', 7)")  # damaged rows, as a bad restore might leave
    db.commit()
    db.close()
    assert main(["state", "rebuild", "--state-dir", str(tmp_path)]) == 0
    assert f"from {store.count_events()} event(s): 2 exam(s)" in capsys.readouterr().out
    repaired = StateStore(tmp_path / "state.sqlite")
    try:
        assert repaired.read_model.dump() == kept
    finally:
        repaired.close()
    assert main(["state", "rebuild", "--state-dir", str(tmp_path / "none")]) == 2


def test_rebuild_keeps_the_exams_retention_has_pruned_from_the_log(scanned, tmp_path):
    root, store = scanned
    kept = store.read_model.dump()
    study, _ = _first_exam(store)
    src = sqlite3.connect(str(root / "state" / "state.sqlite"))
    src.execute("VACUUM INTO ?", (str(tmp_path / "state.sqlite"),))
    src.close()
    db = sqlite3.connect(str(tmp_path / "state.sqlite"))
    db.execute("DELETE FROM events WHERE study_uid = ?", (study,))  # as retention leaves an old exam
    db.commit()
    db.close()
    pruned = StateStore(tmp_path / "state.sqlite")
    try:
        assert pruned.rebuild_read_model() < store.count_events()
        assert pruned.read_model.dump() == kept
    finally:
        pruned.close()


def test_analysis_reads_label_disagreements_from_the_read_model(scanned, tmp_path):
    import threading

    from scanside.agent.analysis.analysis import Analyzer
    from scanside.agent.runtime.config import load_config

    _, store = scanned
    study, series = _first_exam(store)
    analyzer = Analyzer(load_config(**{"state.dir": str(tmp_path)}), store, threading.Condition())
    other = store.read_model.latest_series(study)[1]
    found = analyzer._disagreements(study, {"T2W": series, "ADC": other})  # noqa: SLF001
    assert found == [{"channel": "T2W", "series_number": series.series_number, "header_label": series.label,
                      "image_label": "ADC", "image_confidence": 0.97, "agree": False}]
