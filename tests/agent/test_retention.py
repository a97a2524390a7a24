"""Retention (scanside.agent.state.retention): a simulated year of exams on a fake clock stays within every limit,
and nothing an output has not delivered, nor any image of an open exam, is deleted."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from scanside.agent.runtime.config import load_config
from scanside.agent.service.metrics import retention_metrics
from scanside.agent.state.retention import DAY_S, HORIZON_MARGIN_S, Retention
from scanside.agent.state.database import StateStore

T0 = 1_700_000_000.0
EXAMS_PER_DAY = 2
FILES_PER_EXAM = 4
LIMITS = {
    "received": (30, 150_000),
    "outputs": (90, 60_000),
    "maps": (30, 40_000),
    "quarantine": (60, 20_000),
}
WEBHOOK_DOWN_DAY = 330  # the webhook receiver stops answering on this day and stays down


def _write(path: Path, size: int, t: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    os.utime(path, (t, t))


def _config(tmp: Path):
    overrides = {"state.dir": str(tmp / "state"), "dicom_output.folder": str(tmp / "out"),
                 "retention.events": {"max_age_days": 180, "max_rows": 1000},
                 "retention.files": {"max_age_days": 90}}
    for name, (age, size) in LIMITS.items():
        overrides[f"retention.{name}"] = {"max_age_days": age, "max_bytes": size}
    return load_config(**overrides)


def _exam(db: sqlite3.Connection, config, day: int, k: int, t: float, open_: bool) -> list[Path]:
    """One exam's rows (as the pipeline writes them) and files, all at simulated time t."""
    study, series = f"1.2.{day}.{k}", f"1.2.{day}.{k}.1"
    received = []
    for i in range(FILES_PER_EXAM):
        path = config.cstore_path / study / f"{i}.dcm"
        _write(path, 2000, t)
        received.append(path)
        db.execute("INSERT INTO files VALUES (?,?,?,?,?,?,?)", (str(path), 2000, t, "ingested", f"{series}.{i}", None, t))
        db.execute("INSERT INTO instances VALUES (?,?,?,?,?,?,?)", (f"{series}.{i}", series, study, str(path), 1, "{}", t))
    state = "open" if open_ else "complete"
    db.execute("INSERT INTO series VALUES (?,?,?,?,?,?,?,?,?)", (series, study, state, 1, FILES_PER_EXAM, FILES_PER_EXAM, t, t, t))
    db.execute("INSERT INTO exams VALUES (?,?,?,?)", (study, "open" if open_ else "ended", t, t))
    for j, kind in enumerate(("series_completed", "exam_completed", "triage_result")):
        db.execute("INSERT INTO events(key, type, study_uid, payload, created) VALUES (?,?,?,?,?)",
                   (f"{kind}:{study}:{j}", kind, study, "{}", t))
    _write(Path(config.dicom_output.folder) / study / "SR.dcm", 1500, t)
    _write(config.state.dir / "maps" / f"{study}.npz", 1200, t)
    return received


def test_a_year_stays_within_limits_and_keeps_what_is_undelivered(tmp_path: Path) -> None:
    config = _config(tmp_path)
    store = StateStore(config.db_path)
    db = sqlite3.connect(str(config.db_path), isolation_level=None)
    clock = {"now": T0}
    retention = Retention(config, store, ["jsonl", "webhook", "dicom"], clock=lambda: clock["now"])
    webhook_seq = 0
    down_at = None
    last_received: list[Path] = []
    for day in range(365):
        t = T0 + day * DAY_S
        db.execute("BEGIN")
        for k in range(EXAMS_PER_DAY):
            last_received = _exam(db, config, day, k, t + k * 3600, open_=(day == 364 and k == EXAMS_PER_DAY - 1))
        _write(config.quarantine_path / f"q{day}.dcm", 900, t)
        db.execute("COMMIT")
        last = store.last_event_seq()
        store.set_cursor("jsonl", last)
        store.set_cursor("dicom", last)
        if day < WEBHOOK_DOWN_DAY:
            webhook_seq = last
            store.set_cursor("webhook", last)
        elif down_at is None:
            down_at = store.first_event_after(webhook_seq)
        clock["now"] = t + DAY_S - 1
        retention.run_once()

        now = clock["now"]
        horizon = retention.horizon()
        for name, (folder, limits, deliverable) in retention.targets().items():
            entries = [(p, p.stat()) for p in Path(folder).rglob("*") if p.is_file()]
            total = sum(st.st_size for _, st in entries)
            keep_from = horizon if deliverable else now - HORIZON_MARGIN_S
            assert retention.folders[name].bytes == total and retention.folders[name].files == len(entries)
            # within its size, or what is left is all undelivered
            assert total <= limits.max_bytes or all(st.st_mtime >= keep_from for _, st in entries), (name, day, total)
            # nothing past its age unless it is undelivered
            assert all(st.st_mtime >= now - limits.max_age_days * DAY_S or st.st_mtime >= keep_from for _, st in entries), (name, day)
        if down_at is not None:  # everything the webhook has not had yet is still there
            undelivered = db.execute("SELECT COUNT(*) FROM events WHERE seq > ?", (webhook_seq,)).fetchone()[0]
            assert undelivered == store.last_event_seq() - webhook_seq
        oldest = db.execute("SELECT MIN(created) FROM events WHERE seq <= ?", (retention.slowest_cursor(),)).fetchone()[0]
        assert oldest is None or oldest >= now - 180 * DAY_S
        # within its row limit, or the excess is undelivered
        assert store.count_events() <= 1000 or store.count_events() - 1000 <= store.last_event_seq() - retention.slowest_cursor()

    # after a year: the folders were pruned (far more was written than they hold) ...
    written = {"received": 365 * EXAMS_PER_DAY * FILES_PER_EXAM * 2000, "quarantine": 365 * 900}
    assert retention.folders["received"].bytes < written["received"] / 4
    assert retention.folders["quarantine"].bytes <= LIMITS["quarantine"][1]
    assert retention.folders["received"].deleted_files > 0 and retention.tables["events"].deleted_rows > 0
    # ... every file written since the webhook went down is there (35 days: past received/maps' age limit)
    assert down_at is not None
    for folder in (config.cstore_path, Path(config.dicom_output.folder), config.state.dir / "maps"):
        for day in range(WEBHOOK_DOWN_DAY, 365):
            study = f"1.2.{day}.0"
            assert any(study in p.name or study in p.parts for p in folder.rglob("*")), (folder, day)
    assert all(p.exists() for p in last_received)  # the open exam's images
    # the files table: rows past its age whose file retention deleted are gone
    rows = db.execute("SELECT path, updated FROM files").fetchall()
    assert all(Path(p).exists() or updated >= clock["now"] - 90 * DAY_S for p, updated in rows)
    assert len(rows) < 365 * EXAMS_PER_DAY * FILES_PER_EXAM
    assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] < 365 * EXAMS_PER_DAY * FILES_PER_EXAM

    # one metric per folder and table, with what the last pass left
    samples = {(m.name, s.labels.get("folder") or s.labels.get("table")): s.value
               for m in retention_metrics(retention) for s in m.samples}
    for name, usage in retention.folders.items():
        assert samples[("scanside_retention_bytes", name)] == usage.bytes
        assert samples[("scanside_retention_deleted_files", name)] == usage.deleted_files
    assert samples[("scanside_retention_rows", "events")] == store.count_events()
    store.close()


def test_files_row_of_a_file_still_in_the_export_folder_is_kept(tmp_path: Path) -> None:
    """A restart's catch-up must not ingest an old export file again as new: its row stays."""
    config = _config(tmp_path)
    store = StateStore(config.db_path)
    kept, gone = tmp_path / "export" / "a.dcm", tmp_path / "export" / "b.dcm"
    _write(kept, 10, T0)
    with store.transaction():
        store.record_file(str(kept), 10, T0, "ingested")
        store.record_file(str(gone), 10, T0, "ingested")
    old = 400 * DAY_S
    retention = Retention(config, store, [], clock=lambda: T0 + old + 1e6)
    sqlite3.connect(str(config.db_path), isolation_level=None).execute("UPDATE files SET updated = ?", (T0,))
    retention.run_once()
    assert store.file_status(str(kept)) is not None
    assert store.file_status(str(gone)) is None
    store.close()


def test_agent_holds_back_for_its_durable_outputs_and_exports_the_metrics(tmp_path: Path) -> None:
    from scanside.agent.service.daemon import Agent

    config = load_config(**{"state.dir": str(tmp_path / "state"), "watch.folder": str(tmp_path / "export"),
                            "api.enabled": False, "output.stdout": False, "webhook.url": "http://127.0.0.1:9/hook"})
    agent = Agent(config)
    try:
        # every output that keeps a cursor in the store holds events back; in-process callbacks do not
        assert {"jsonl", "analysis", agent.webhook.name} <= set(agent.retention.sinks)
        agent.subscribe(lambda ev: None)
        assert not any(s.startswith("callback") for s in agent.retention.sinks)
        _write(config.cstore_path / "x" / "1.dcm", 1234, T0)  # far past the 30-day default
        _write(config.cstore_path / "x" / "2.dcm", 100, agent.retention.clock())
        agent.retention.run_once()
        text = agent.metrics.exposition().decode()
        assert 'scanside_retention_bytes{folder="received"} 100.0' in text
        assert 'scanside_retention_deleted_files_total{folder="received"} 1.0' in text
        assert 'scanside_retention_rows{table="events"}' in text
    finally:
        agent.store.close()


def test_a_partial_retention_table_keeps_the_other_defaults(tmp_path):
    """A site that sets one limit of a folder keeps the other's default (a bare `[retention.received]`
    table once reset both to "no limit")."""
    from scanside.agent.runtime.config import load_config

    cfg = tmp_path / "site.toml"
    cfg.write_text("[retention.received]\nmax_age_days = 10\n\n[retention.files]\n")
    c = load_config(cfg)
    assert c.retention.received.max_age_days == 10 and c.retention.received.max_bytes == 20 * 1024**3
    assert c.retention.files.max_rows == 5_000_000 and c.retention.outputs.max_age_days == 90


def test_the_exam_read_model_is_pruned_only_for_exams_the_log_no_longer_holds(tmp_path: Path) -> None:
    """[retention] exams: rows of exams whose events retention has deleted go, oldest first past max_rows and
    past max_age_days; an exam still in the log keeps its rows whatever the limits."""
    import datetime as dt

    from scanside.agent.schema.events import AlertAcknowledged, ExamCompleted

    config = load_config(**{"state.dir": str(tmp_path / "state"), "retention.exams": {"max_age_days": 30, "max_rows": 3}})
    store = StateStore(config.db_path)
    day = lambda d: dt.datetime.fromtimestamp(T0 + d * DAY_S, dt.timezone.utc).isoformat()  # noqa: E731
    for k in range(8):  # exam k last seen on day 10 * k
        study = f"1.2.9.{k}"
        store.append_event(ExamCompleted(key=f"exam_completed:{study}", study_uid=study, time=day(10 * k),
                                         reason="quiet_period", n_series=1, n_deviations=0))
        store.append_event(AlertAcknowledged(key=f"ack:{study}", study_uid=study, alert_id=f"a{k}", time=day(10 * k)))
    assert store.read_model.count_exams() == 8
    retention = Retention(config, store, [], clock=lambda: T0 + 75 * DAY_S)

    retention.run_once()  # every exam is still in the log: nothing goes
    assert store.read_model.count_exams() == 8 and retention.tables["exams"].deleted_rows == 0

    store.delete_events(store.last_event_seq() - 4)  # the log keeps only the newest two exams (6 and 7)
    retention.run_once()
    left = {r["study_uid"] for r in store._q("SELECT study_uid FROM rm_exams")}
    # exams 0-4 are older than 30 days (day 75 - 30 = 45); exam 5 (day 50) is within age and within 3 rows
    assert left == {"1.2.9.5", "1.2.9.6", "1.2.9.7"}
    assert retention.tables["exams"].deleted_rows == 5 and retention.tables["exams"].rows == 3
    for table in ("rm_series", "rm_alerts", "rm_findings"):
        assert store._q(f"SELECT COUNT(*) AS n FROM {table} WHERE study_uid NOT IN ('1.2.9.5', '1.2.9.6', '1.2.9.7')")[0]["n"] == 0
    samples = {(m.name, s.labels.get("table")): s.value for m in retention_metrics(retention) for s in m.samples}
    assert samples[("scanside_retention_rows", "exams")] == 3
    store.close()
