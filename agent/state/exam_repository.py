"""The exam read model: the latest state of every series and exam, kept in SQLite tables beside the
event log, so that a reader's cost is that of one exam, not of every event ever recorded.

The tables are written only here, by `ExamRepository.apply`, which `StateStore.append_event` calls
in the transaction that stores the event: a crash leaves both or neither. Each table has one pure
projection function (event + current row -> new row); `rebuild` replays the log through the same
functions into empty tables (the schema migration runs it, and `scanside state rebuild` repairs).

Tables: rm_series (one row per series part: its latest summary and image label), rm_exams (one row
per exam: state, rounds of exam end, counts, latest triage), rm_alerts (one row per alert, with its
acknowledgement), rm_findings (the deviations, label mismatches and triage results of each exam, in
order). Retention may delete old events; these rows stay (a rebuild keeps the rows of exams with no
event left in the log, and is exact while the log is whole).
"""
from __future__ import annotations

import datetime as _dt
import json
import sqlite3
import threading
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel

from scanside.agent.state.alerts import Alert, alert_from_event
from scanside.agent.schema.events import EVENT_ADAPTER, Event, SeriesSummary, parse_event

READ_MODEL_SCHEMA = """
CREATE TABLE IF NOT EXISTS rm_series (
    series_id TEXT PRIMARY KEY, study_uid TEXT NOT NULL, completed_seq INTEGER, last_completed_seq INTEGER,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rm_series_study ON rm_series(study_uid);
CREATE TABLE IF NOT EXISTS rm_exams (
    study_uid TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, image_results INTEGER NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rm_exams_last ON rm_exams(last_seq);
CREATE INDEX IF NOT EXISTS rm_exams_image_results ON rm_exams(image_results) WHERE image_results > 0;
CREATE TABLE IF NOT EXISTS rm_alerts (alert_id TEXT PRIMARY KEY, study_uid TEXT, seq INTEGER, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rm_alerts_study ON rm_alerts(study_uid, seq);
CREATE INDEX IF NOT EXISTS rm_alerts_seq ON rm_alerts(seq);
CREATE TABLE IF NOT EXISTS rm_findings (
    seq INTEGER PRIMARY KEY, study_uid TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rm_findings_study ON rm_findings(study_uid, seq);
"""
READ_MODEL_TABLES = ("rm_series", "rm_exams", "rm_alerts", "rm_findings")
FINDING_TYPES = ("protocol_deviation", "label_mismatch", "triage_result")
IMAGE_RESULT_TYPES = ("series_classified", "triage_result")  # what shadow mode counts as an exam seen by a model
REPLAY_BATCH = 2000


def epoch(iso: str) -> float:
    """Seconds since the epoch of an event time (0 when unreadable)."""
    try:
        return _dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------------- rows
class Classification(BaseModel):
    """The image model's latest label for a series (SeriesClassified)."""

    header_label: str
    image_label: str
    image_confidence: float
    agree: bool
    series_number: Optional[int] = None


class SeriesRow(BaseModel):
    """One series part: its latest completed revision and the image model's latest label."""

    series_id: str
    study_uid: str
    series_uid: str = ""
    completed_seq: Optional[int] = None  # first completion: the order analysis reads the exam in
    last_completed_seq: Optional[int] = None  # latest completion: the order the protocol checker reads it in
    first_label: Optional[str] = None  # the label of its first completion (DICOM SR series labels)
    summary: Optional[SeriesSummary] = None  # None: classified, not (yet) completed
    classification: Optional[Classification] = None
    classified_seq: Optional[int] = None  # first classification


class ExamRow(BaseModel):
    """One exam as of its latest event."""

    study_uid: str
    first_seq: int
    first_time: str
    last_seq: int
    last_time: str
    state: Literal["open", "completed"] = "open"
    rounds: int = 0  # ExamCompleted events: the next end is round rounds + 1
    last_end_epoch: float = 0.0  # the latest ExamCompleted time (epoch s), 0 when none
    first_end_seq: Optional[int] = None
    n_series: int = 0  # series parts completed
    n_deviations: int = 0
    n_alerts: int = 0
    n_open_alerts: int = 0
    n_image_results: int = 0
    triage: Optional[str] = None  # the latest recommendation
    profile: Optional[str] = None
    triage_result: Optional[dict[str, Any]] = None
    completed: Optional[dict[str, Any]] = None


class FindingRow(BaseModel):
    """A deviation, label mismatch or triage result of an exam: the event as recorded."""

    seq: int
    study_uid: str
    type: str
    key: str
    event: dict[str, Any]


def parse_event_dict(data: dict[str, Any]) -> Event:
    return EVENT_ADAPTER.validate_python(data)


# ---------------------------------------------------------------------------------------------- projections
def project_series(ev: Event, seq: int, row: Optional[SeriesRow]) -> Optional[SeriesRow]:
    """The series row after ev (None: ev does not change a series)."""
    if ev.type == "series_completed":
        s = ev.series
        base = row or SeriesRow(series_id=s.series_id, study_uid=s.study_uid)
        return base.model_copy(update={
            "series_uid": s.series_uid, "summary": s, "last_completed_seq": seq,
            "completed_seq": base.completed_seq if base.completed_seq is not None else seq,
            "first_label": base.first_label if base.first_label is not None else s.label})
    if ev.type == "series_classified" and ev.study_uid:
        base = row or SeriesRow(series_id=ev.series_id, study_uid=ev.study_uid)
        return base.model_copy(update={"classified_seq": base.classified_seq or seq, "classification": Classification(
            header_label=ev.header_label, image_label=ev.image_label, image_confidence=ev.image_confidence,
            agree=ev.agree, series_number=ev.series_number)})
    return None


def project_alert(ev: Event, row: Optional[Alert]) -> Optional[Alert]:
    """The alert row after ev: a new alert (an existing id stays as first raised), or its acknowledgement."""
    if ev.type == "alert_acknowledged":
        if row is None or row.acknowledged:
            return None
        return row.model_copy(update={"acknowledged": True, "acknowledged_by": ev.by, "acknowledged_at": ev.time})
    if row is not None:
        return None
    return alert_from_event(ev)


def project_exam(ev: Event, seq: int, row: Optional[ExamRow], *, new_series: bool, raises_alert: bool,
                 acknowledges: bool) -> Optional[ExamRow]:
    """The exam row after ev. For an acknowledgement, ``row`` is the exam of the alert acknowledged
    (the acknowledgement itself is no activity on the exam)."""
    if ev.type == "alert_acknowledged":
        if row is None or not acknowledges:
            return None
        return row.model_copy(update={"n_open_alerts": row.n_open_alerts - 1})
    if not ev.study_uid:
        return None
    r = row or ExamRow(study_uid=ev.study_uid, first_seq=seq, first_time=ev.time, last_seq=seq, last_time=ev.time)
    up: dict[str, Any] = {"last_seq": seq, "last_time": ev.time}
    if ev.type == "series_completed":
        up["state"] = "open"  # images after an exam end reopen it (the next end is another round)
        up["n_series"] = r.n_series + int(new_series)
    elif ev.type == "series_reopened":
        up["state"] = "open"
    elif ev.type == "exam_completed":
        up.update(state="completed", rounds=r.rounds + 1, last_end_epoch=max(r.last_end_epoch, epoch(ev.time)),
                  completed=ev.model_dump(mode="json"),
                  first_end_seq=r.first_end_seq if r.first_end_seq is not None else seq)
    elif ev.type == "triage_result":
        up.update(triage=ev.recommendation, triage_result=ev.model_dump(mode="json"))
    if ev.type == "protocol_deviation":
        up["n_deviations"] = r.n_deviations + 1
    if ev.type in ("protocol_deviation", "label_mismatch"):
        up["profile"] = getattr(ev, "profile", None) or r.profile
    if ev.type in IMAGE_RESULT_TYPES:
        up["n_image_results"] = r.n_image_results + 1
    if raises_alert:
        up.update(n_alerts=r.n_alerts + 1, n_open_alerts=r.n_open_alerts + 1)
    return r.model_copy(update=up)


def project_finding(ev: Event, seq: int) -> Optional[FindingRow]:
    if ev.type not in FINDING_TYPES or not ev.study_uid:
        return None
    return FindingRow(seq=seq, study_uid=ev.study_uid, type=ev.type, key=ev.key, event=ev.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------- repository
class ExamRepository:
    """The only reader and writer of the read-model tables. Shares the StateStore's connection and
    lock: `apply` runs inside the store's transaction; reads see that transaction's own writes."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock):
        self._conn = conn
        self._lock = lock

    @staticmethod
    def create_tables(conn: sqlite3.Connection) -> None:
        conn.executescript(READ_MODEL_SCHEMA)

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _x(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        with self._lock:
            self._conn.execute(sql, args)

    # ------------------------------------------------------------------ writing
    def apply(self, ev: Event, seq: int) -> None:
        """Project one stored event (call in the transaction that stored it)."""
        if ev.seq != seq:
            ev = ev.model_copy(update={"seq": seq})  # alerts carry the event's position in the log
        if ev.type == "alert_acknowledged":
            acked = project_alert(ev, self.alert_row(ev.alert_id))
            if acked is not None:
                self._put_alert(acked)
                if acked.study_uid:
                    exam = project_exam(ev, seq, self.exam(acked.study_uid), new_series=False, raises_alert=False,
                                        acknowledges=True)
                    if exam is not None:
                        self._put_exam(exam)
            return
        raised = alert_from_event(ev)
        if raised is not None:
            alert = project_alert(ev, self.alert_row(raised.alert_id))
            if alert is not None:
                self._put_alert(alert)
        if not ev.study_uid:
            return
        new_series = False
        if ev.type in ("series_completed", "series_classified"):
            sid = ev.series.series_id if ev.type == "series_completed" else ev.series_id
            before = self.series_row(sid)
            new_series = ev.type == "series_completed" and (before is None or before.summary is None)
            after = project_series(ev, seq, before)
            if after is not None:
                self._put_series(after)
        # an alert id raised again (a file quarantined twice) is counted again, as the exam list always did
        exam = project_exam(ev, seq, self.exam(ev.study_uid), new_series=new_series, raises_alert=raised is not None,
                            acknowledges=False)
        if exam is not None:
            self._put_exam(exam)
        finding = project_finding(ev, seq)
        if finding is not None:
            self._x("INSERT OR REPLACE INTO rm_findings VALUES (?,?,?,?,?)",
                    (finding.seq, finding.study_uid, finding.type, finding.key, json.dumps(finding.event)))

    def _put_series(self, row: SeriesRow) -> None:
        self._x("INSERT OR REPLACE INTO rm_series VALUES (?,?,?,?,?)",
                (row.series_id, row.study_uid, row.completed_seq, row.last_completed_seq, row.model_dump_json()))

    def _put_exam(self, row: ExamRow) -> None:
        self._x("INSERT OR REPLACE INTO rm_exams VALUES (?,?,?,?)",
                (row.study_uid, row.last_seq, row.n_image_results, row.model_dump_json()))

    def _put_alert(self, row: Alert) -> None:
        self._x("INSERT OR REPLACE INTO rm_alerts VALUES (?,?,?,?)", (row.alert_id, row.study_uid, row.seq, row.model_dump_json()))

    def prune_exams(self, before: Optional[float] = None, max_rows: Optional[int] = None, batch: int = 5000) -> int:
        """Retention of the read model: delete every row of exams whose events the log no longer holds (so
        none still being reported or delivered), those last seen before ``before`` (epoch s) and, while the
        exam table holds more than ``max_rows``, the oldest; how many exams were deleted."""
        gone = self._q("SELECT study_uid, data FROM rm_exams WHERE study_uid NOT IN "
                       "(SELECT DISTINCT study_uid FROM events WHERE study_uid IS NOT NULL) ORDER BY last_seq")
        doomed: list[str] = []
        if before is not None:
            doomed = [r["study_uid"] for r in gone if epoch(ExamRow.model_validate_json(r["data"]).last_time) < before]
        if max_rows is not None:
            excess = int(self._q("SELECT COUNT(*) AS n FROM rm_exams")[0]["n"]) - len(doomed) - max_rows
            chosen = set(doomed)
            doomed += [r["study_uid"] for r in gone if r["study_uid"] not in chosen][:max(excess, 0)]
        for i in range(0, len(doomed), batch):
            uids = [(u,) for u in doomed[i:i + batch]]
            with self._lock:
                for table in READ_MODEL_TABLES:
                    self._conn.executemany(f"DELETE FROM {table} WHERE study_uid = ?", uids)
        return len(doomed)

    def count_exams(self) -> int:
        return int(self._q("SELECT COUNT(*) AS n FROM rm_exams")[0]["n"])

    def clear(self) -> None:
        """Delete the rows a replay of the log rewrites: those of exams still in the log, and the alerts
        with no exam. Exams whose every event retention has deleted keep their rows."""
        for table in READ_MODEL_TABLES:
            self._x(f"DELETE FROM {table} WHERE study_uid IN (SELECT DISTINCT study_uid FROM events)")
        self._x("DELETE FROM rm_alerts WHERE study_uid IS NULL")

    def rebuild(self) -> int:
        """Replay the whole event log through the projections into cleared tables (call inside a store
        transaction); how many events were replayed. Exact while the log is whole; an exam that
        retention has pruned in part is rebuilt from the events left."""
        self.clear()
        n, seq = 0, 0
        while True:
            rows = self._q("SELECT seq, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, REPLAY_BATCH))
            for r in rows:
                ev = parse_event(r["payload"])
                ev.seq = r["seq"]
                self.apply(ev, r["seq"])
            n += len(rows)
            if len(rows) < REPLAY_BATCH:
                return n
            seq = rows[-1]["seq"]

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every table, in key order (for comparing two read models)."""
        keys = {"rm_series": "series_id", "rm_exams": "study_uid", "rm_alerts": "alert_id", "rm_findings": "seq"}
        return {t: [dict(r) for r in self._q(f"SELECT * FROM {t} ORDER BY {k}")] for t, k in keys.items()}

    # ------------------------------------------------------------------ series
    def series_row(self, series_id: str) -> Optional[SeriesRow]:
        rows = self._q("SELECT data FROM rm_series WHERE series_id = ?", (series_id,))
        return SeriesRow.model_validate_json(rows[0]["data"]) if rows else None

    def series_rows(self, study_uid: Optional[str] = None,
                    order: Literal["first_completed", "last_completed"] = "first_completed") -> list[SeriesRow]:
        """The completed series parts of one exam (every exam: None), in the order of their first or
        latest completion."""
        column = "completed_seq" if order == "first_completed" else "last_completed_seq"
        where, args = ("study_uid = ? AND ", (study_uid,)) if study_uid is not None else ("", ())
        rows = self._q(f"SELECT data FROM rm_series WHERE {where}{column} IS NOT NULL ORDER BY {column}", args)
        return [SeriesRow.model_validate_json(r["data"]) for r in rows]

    def latest_series(self, study_uid: str,
                      order: Literal["first_completed", "last_completed"] = "first_completed") -> list[SeriesSummary]:
        """The latest revision of every series part of the exam."""
        return [r.summary for r in self.series_rows(study_uid, order) if r.summary is not None]

    def n_acquisitions(self, study_uid: str) -> int:
        """Series UIDs completed (the parts of a split diffusion series count once)."""
        rows = self._q("SELECT COUNT(DISTINCT json_extract(data, '$.series_uid')) AS n FROM rm_series "
                       "WHERE study_uid = ? AND completed_seq IS NOT NULL", (study_uid,))
        return int(rows[0]["n"] or 0)

    # ------------------------------------------------------------------ exams
    def exam(self, study_uid: str) -> Optional[ExamRow]:
        rows = self._q("SELECT data FROM rm_exams WHERE study_uid = ?", (study_uid,))
        return ExamRow.model_validate_json(rows[0]["data"]) if rows else None

    def exams(self, limit: Optional[int] = None) -> list[ExamRow]:
        """Exams, latest activity first."""
        rows = self._q("SELECT data FROM rm_exams ORDER BY last_seq DESC LIMIT ?", (-1 if limit is None else limit,))
        return [ExamRow.model_validate_json(r["data"]) for r in rows]

    def exams_with_image_results(self) -> int:
        """Exams an image model has labelled or triaged (shadow mode's 'learning this site (N exams)')."""
        rows = self._q("SELECT COUNT(*) AS n FROM rm_exams WHERE image_results > 0")
        return int(rows[0]["n"] or 0)

    # ------------------------------------------------------------------ findings and alerts
    def findings(self, study_uid: Optional[str], types: tuple[str, ...] = FINDING_TYPES,
                 upto_seq: Optional[int] = None) -> Iterator[Event]:
        """The exam's deviations, label mismatches and triage results (every exam: None), in log order."""
        marks = ",".join("?" * len(types))
        where = f"type IN ({marks})" + (" AND study_uid = ?" if study_uid is not None else "")
        args: tuple[Any, ...] = (*types, *((study_uid,) if study_uid is not None else ()))
        if upto_seq is not None:
            where, args = where + " AND seq <= ?", (*args, upto_seq)
        for r in self._q(f"SELECT seq, data FROM rm_findings WHERE {where} ORDER BY seq", args):
            ev = parse_event_dict(json.loads(r["data"]))
            ev.seq = r["seq"]
            yield ev

    def finding_keys(self, study_uid: str, type_: str) -> set[str]:
        return {r["key"] for r in self._q("SELECT key FROM rm_findings WHERE study_uid = ? AND type = ?", (study_uid, type_))}

    def alert_row(self, alert_id: str) -> Optional[Alert]:
        rows = self._q("SELECT data FROM rm_alerts WHERE alert_id = ?", (alert_id,))
        return Alert.model_validate_json(rows[0]["data"]) if rows else None

    def alerts(self, study_uid: Optional[str] = None, unassigned: bool = False, open_only: bool = False) -> list[Alert]:
        """Alerts in log order: one exam's, the ones with no exam (unassigned), or all."""
        if study_uid is not None:
            rows = self._q("SELECT data FROM rm_alerts WHERE study_uid = ? ORDER BY seq", (study_uid,))
        elif unassigned:
            rows = self._q("SELECT data FROM rm_alerts WHERE study_uid IS NULL ORDER BY seq")
        else:
            rows = self._q("SELECT data FROM rm_alerts ORDER BY seq")
        out = [Alert.model_validate_json(r["data"]) for r in rows]
        return [a for a in out if not (open_only and a.acknowledged)]

