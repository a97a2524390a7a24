"""SQLite (WAL) state: every file, instance, series and event, so that a restart resumes where it stopped.

Events are written in the same transaction as the state change that caused them (a transactional
outbox), and each sink keeps a cursor: an event is never lost between the decision and the output,
and a key uniqueness constraint means the same fact is never recorded twice.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from scanside.agent.runtime.lifecycle import WorkerThread
from scanside.agent.schema.events import Event, parse_event
from scanside.agent.state.exam_repository import ExamRepository
from scanside.agent.dicom.header import InstanceHeader

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER, mtime REAL, status TEXT NOT NULL,
    sop_uid TEXT, reason TEXT, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, path TEXT NOT NULL,
    n_images INTEGER NOT NULL, header TEXT NOT NULL, received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_received ON instances(received);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, state TEXT NOT NULL, revision INTEGER NOT NULL,
    n_images INTEGER NOT NULL, expected INTEGER, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    completed_at REAL
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid, first_seen);
CREATE TABLE IF NOT EXISTS exams (
    study_uid TEXT PRIMARY KEY, state TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS exams_state ON exams(state, first_seen);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
    study_uid TEXT, payload TEXT NOT NULL, created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_study ON events(study_uid, seq);
CREATE INDEX IF NOT EXISTS files_updated ON files(updated);
CREATE INDEX IF NOT EXISTS files_status ON files(status, updated);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    sink TEXT NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT,
    created REAL NOT NULL, PRIMARY KEY (sink, seq)
);
"""
log = logging.getLogger(__name__)
SCHEMA_VERSION = "2"  # 2: the exam read model (scanside.agent.state.exam_repository), rebuilt from the log on the upgrade
READY_LOCK_WAIT_S = 2.0  # readiness never waits longer than this on a database another thread is waiting for


class StateError(Exception):
    """The state database cannot be used (corrupt, truncated, locked, read-only): the message names the
    file and says what to do; the agent does not start on it."""


def _diagnose(path: Path, exc: BaseException) -> str:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        what = "is locked by another process (a second agent, a backup or a sqlite3 shell holding a write lock)"
    elif "readonly" in text or "read-only" in text or "unable to open" in text or isinstance(exc, PermissionError):
        what = "cannot be opened for writing (read-only file, folder or file system, or wrong owner)"
    elif "malformed" in text or "not a database" in text or "corrupt" in text or "integrity" in text:
        what = ("is corrupt or truncated; stop the agent and move it aside (with its -wal and -shm files): a new one is "
                "created and the export folder is read again, recording each exam's events anew")
    else:
        what = "cannot be used"
    return f"state database {path} {what} ({type(exc).__name__}: {exc})"


#: how long opening the database may spend checking its pages (PRAGMA quick_check); past it, the check
#: finishes in a thread beside the running agent
OPEN_CHECK_S = 2.0


class StateStore:
    """One connection guarded by a lock: the ingest worker writes, the API and sinks read.

    Opening checks the file (quick_check): a corrupt, truncated, locked or read-only database raises
    StateError naming it, rather than starting ready and failing on the first write to a bad page.
    A write that finds the file corrupt later keeps `writable()` false (readiness tells the truth)."""

    def __init__(self, path: Path | str, busy_timeout_s: float = 30.0, open_check_s: float = OPEN_CHECK_S):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._in_tx = 0
        self.corrupt: Optional[str] = None  # set when a statement found the file malformed
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=busy_timeout_s)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(_diagnose(self.path, exc)) from exc
        self._conn.row_factory = sqlite3.Row
        try:
            with self._lock:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
                self._conn.execute("PRAGMA foreign_keys=ON")
                # a year of exams is a database of gigabytes: 2 MB of page cache (the default) left each
                # lookup re-reading the upper B-tree pages (bench/bench_scale.py)
                self._conn.execute("PRAGMA cache_size=-16384")
                # and the random-position inserts of a new exam's rows (files, instances) land on leaf pages
                # not in that cache: mapped, a miss is a memory read from the OS cache, not a read() call
                self._conn.execute("PRAGMA mmap_size=268435456")
                self._conn.executescript(SCHEMA)
                ExamRepository.create_tables(self._conn)
                self.read_model = ExamRepository(self._conn, self._lock)
                self._migrate()
                problems = self._quick_check(self._conn, open_check_s)
            if problems is not None and problems != ["ok"]:
                raise sqlite3.DatabaseError("database disk image is malformed: " + "; ".join(map(str, problems)))
            self.writable(raise_errors=True)  # a read-only file opens and reads fine: write once now
            # a large database: the rest of the check runs beside the agent
            self.check_worker: Optional[WorkerThread] = None
            if problems is None:
                self.check_worker = WorkerThread("scanside-state-check", lambda stop: self._finish_check()).start()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StateError(_diagnose(self.path, exc)) from exc

    @staticmethod
    def _quick_check(conn: sqlite3.Connection, budget_s: Optional[float]) -> Optional[list[str]]:
        """PRAGMA quick_check's findings (["ok"] when sound), or None when it ran past ``budget_s`` (it reads
        every page: seconds on a database of gigabytes, and the agent must not wait that long to start)."""
        deadline = time.monotonic() + budget_s if budget_s is not None else None
        if deadline is not None:
            conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            return [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
        except sqlite3.OperationalError as exc:
            if "interrupt" in str(exc).lower():
                return None
            raise
        finally:
            conn.set_progress_handler(None, 0)

    def _finish_check(self) -> None:
        """The whole quick_check on a connection of its own (WAL: it reads beside the writer); a corrupt file
        found here is reported as one found by a statement (readiness false, the watchdog stops)."""
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            try:
                problems = self._quick_check(conn, None)
            finally:
                conn.close()
            if problems != ["ok"]:
                self.corrupt = _diagnose(self.path, sqlite3.DatabaseError("database disk image is malformed: "
                                                                          + "; ".join(map(str, problems or []))))
        except sqlite3.DatabaseError as exc:
            self._note(exc)
        except sqlite3.Error as exc:  # locked, unreadable: not a finding about the file's pages
            log.warning("state database check did not finish: %s", exc)

    def _migrate(self) -> None:
        """Bring an older database up to SCHEMA_VERSION (a new one is stamped with it)."""
        rows = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        version = int(rows[0][0]) if rows else None
        if version == int(SCHEMA_VERSION):
            return
        with self.transaction():
            if version is not None and version < 2:  # the read model of the exams recorded before it existed
                t0 = time.monotonic()
                n = self.read_model.rebuild()
                log.warning("state database upgraded to schema %s: exam read model rebuilt from %d events in %.1f s",
                            SCHEMA_VERSION, n, time.monotonic() - t0)
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))

    def rebuild_read_model(self) -> int:
        """Replay the event log into empty read-model tables (a repair); how many events were replayed."""
        with self.transaction():
            return self.read_model.rebuild()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Nested calls join the outer transaction."""
        with self._lock:
            if self._in_tx:
                self._in_tx += 1
                try:
                    yield
                finally:
                    self._in_tx -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._in_tx = 1
            try:
                yield
            except sqlite3.DatabaseError as exc:
                self._note(exc)
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            except BaseException:
                if self._conn.in_transaction:  # SQLite may already have rolled back (disk full)
                    self._conn.execute("ROLLBACK")
                raise
            else:
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error:  # disk full at commit: leave no transaction open behind us
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            finally:
                self._in_tx = 0

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _x(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, args)

    def _note(self, exc: sqlite3.DatabaseError) -> None:
        text = str(exc).lower()
        if "malformed" in text or "not a database" in text:
            self.corrupt = _diagnose(self.path, exc)

    def writable(self, raise_errors: bool = False) -> bool:
        """A real write (heartbeat row) succeeds, within READY_LOCK_WAIT_S when another thread holds the
        connection (a worker waiting on a lock held by another process shows as not writable)."""
        if self.corrupt is not None and not raise_errors:
            return False
        if not self._lock.acquire(timeout=READY_LOCK_WAIT_S):
            return False
        try:
            with self.transaction():
                self._x("INSERT OR REPLACE INTO meta VALUES ('heartbeat', ?)", (str(time.time()),))
            return True
        except sqlite3.Error:
            if raise_errors:
                raise
            return False
        finally:
            self._lock.release()

    def problem(self) -> Optional[str]:
        """Why the database is not usable, for readiness (None: fine as far as known)."""
        return self.corrupt

    # ------------------------------------------------------------------ files
    def file_status(self, path: str) -> Optional[sqlite3.Row]:
        rows = self._q("SELECT * FROM files WHERE path = ?", (path,))
        return rows[0] if rows else None

    def record_file(self, path: str, size: Optional[int], mtime: Optional[float], status: str,
                    sop_uid: Optional[str] = None, reason: Optional[str] = None) -> None:
        self._x(
            "INSERT INTO files(path, size, mtime, status, sop_uid, reason, updated) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(path) DO UPDATE SET size=excluded.size, mtime=excluded.mtime, status=excluded.status, "
            "sop_uid=excluded.sop_uid, reason=excluded.reason, updated=excluded.updated",
            (path, size, mtime, status, sop_uid, reason, time.time()),
        )

    def file_counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._q("SELECT status, COUNT(*) AS n FROM files GROUP BY status")}

    def quarantined(self, since: Optional[float] = None) -> list[sqlite3.Row]:
        """Quarantined files (since: recorded at or after this time), by the files_status index."""
        return self._q("SELECT path, reason FROM files WHERE status = 'quarantined' AND updated >= ? ORDER BY updated",
                       (since if since is not None else float("-inf"),))

    def exam_first_seen(self, study_uid: str) -> Optional[float]:
        rows = self._q("SELECT first_seen FROM exams WHERE study_uid = ?", (study_uid,))
        return float(rows[0]["first_seen"]) if rows else None

    # ------------------------------------------------------------------ instances
    def has_instance(self, sop_uid: str) -> bool:
        return bool(self._q("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

    def add_instance(self, header: InstanceHeader, received: float) -> None:
        self._x(
            "INSERT INTO instances(sop_uid, series_uid, study_uid, path, n_images, header, received) VALUES (?,?,?,?,?,?,?)",
            (header.sop_instance_uid, header.series_uid, header.study_uid, header.path, header.n_images,
             header.model_dump_json(), received),
        )

    def series_headers(self, series_uid: str) -> list[InstanceHeader]:
        rows = self._q("SELECT header FROM instances WHERE series_uid = ? ORDER BY received, sop_uid", (series_uid,))
        return [InstanceHeader.model_validate_json(r["header"]) for r in rows]

    # ------------------------------------------------------------------ series and exams
    def get_series(self, series_uid: str) -> Optional[sqlite3.Row]:
        rows = self._q("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
        return rows[0] if rows else None

    def put_series(self, series_uid: str, study_uid: str, state: str, revision: int, n_images: int,
                   expected: Optional[int], first_seen: float, last_seen: float, completed_at: Optional[float]) -> None:
        self._x(
            "INSERT INTO series VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(series_uid) DO UPDATE SET state=excluded.state, "
            "revision=excluded.revision, n_images=excluded.n_images, expected=excluded.expected, "
            "last_seen=excluded.last_seen, completed_at=excluded.completed_at",
            (series_uid, study_uid, state, revision, n_images, expected, first_seen, last_seen, completed_at),
        )

    def all_series(self, state: Optional[str] = None) -> list[sqlite3.Row]:
        if state:
            return self._q("SELECT * FROM series WHERE state = ? ORDER BY first_seen", (state,))
        return self._q("SELECT * FROM series ORDER BY first_seen")

    def study_series(self, study_uid: str) -> list[sqlite3.Row]:
        return self._q("SELECT * FROM series WHERE study_uid = ? ORDER BY first_seen", (study_uid,))

    def touch_exam(self, study_uid: str, now: float) -> bool:
        """Record activity on an exam; True when the exam is new."""
        # every image of an exam after its first one: one statement (the update) rather than two
        if self._x("UPDATE exams SET last_seen = ?, state = 'open' WHERE study_uid = ?", (now, study_uid)).rowcount:
            return False
        self._x("INSERT INTO exams VALUES (?, 'open', ?, ?)", (study_uid, now, now))
        return True

    def exams(self) -> list[sqlite3.Row]:
        return self._q("SELECT * FROM exams ORDER BY first_seen")

    def open_exams(self) -> list[sqlite3.Row]:
        """Exams not yet marked ended: what the exam clock looks at, so that its work per tick stays
        that of the exams in progress, not of every exam ever seen."""
        return self._q("SELECT * FROM exams WHERE state = 'open' ORDER BY first_seen")

    def mark_exam_ended(self, study_uid: str) -> None:
        self._x("UPDATE exams SET state = 'ended' WHERE study_uid = ?", (study_uid,))

    # ------------------------------------------------------------------ events
    def append_event(self, event: Event) -> Optional[int]:
        """Store an event and project it into the exam read model, in one transaction; None when an
        event with the same key exists (the fact is already recorded)."""
        with self.transaction():
            cur = self._x(
                "INSERT OR IGNORE INTO events(key, type, study_uid, payload, created) VALUES (?,?,?,?,?)",
                (event.key, event.type, event.study_uid, event.model_dump_json(exclude={"seq"}), time.time()),
            )
            if not cur.rowcount:
                return None
            seq = int(cur.lastrowid or 0)
            self.read_model.apply(event, seq)
        return seq

    def has_event(self, key: str) -> bool:
        return bool(self._q("SELECT 1 FROM events WHERE key = ?", (key,)))

    def events_after(self, seq: int, limit: int = 500, study_uid: Optional[str] = None) -> list[Event]:
        if study_uid:
            rows = self._q("SELECT seq, payload FROM events WHERE seq > ? AND study_uid = ? ORDER BY seq LIMIT ?", (seq, study_uid, limit))
        else:
            rows = self._q("SELECT seq, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        out = []
        for r in rows:
            ev = parse_event(r["payload"])
            ev.seq = r["seq"]
            out.append(ev)
        return out

    def cursor(self, sink: str) -> int:
        rows = self._q("SELECT seq FROM cursors WHERE sink = ?", (sink,))
        return int(rows[0]["seq"]) if rows else 0

    def set_cursor(self, sink: str, seq: int) -> None:
        self._x("INSERT INTO cursors VALUES (?, ?) ON CONFLICT(sink) DO UPDATE SET seq = excluded.seq", (sink, seq))

    def last_event_seq(self) -> int:
        rows = self._q("SELECT MAX(seq) AS s FROM events")
        return int(rows[0]["s"] or 0)

    def record_dead_letter(self, sink: str, seq: int, key: str, reason: str, detail: str = "") -> None:
        """An event a sink gave up on for good (e.g. a webhook receiver rejected the payload)."""
        self._x("INSERT OR REPLACE INTO dead_letters VALUES (?,?,?,?,?,?)", (sink, seq, key, reason, detail, time.time()))

    def dead_letters(self, sink: Optional[str] = None) -> list[sqlite3.Row]:
        if sink:
            return self._q("SELECT * FROM dead_letters WHERE sink = ? ORDER BY seq", (sink,))
        return self._q("SELECT * FROM dead_letters ORDER BY sink, seq")

    def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters per output (scanside_output_dead_letters_total)."""
        return {r["sink"]: int(r["n"]) for r in self._q("SELECT sink, COUNT(*) AS n FROM dead_letters GROUP BY sink")}

    def event_counts(self) -> dict[str, int]:
        return {r["type"]: r["n"] for r in self._q("SELECT type, COUNT(*) AS n FROM events GROUP BY type")}

    # ------------------------------------------------------------------ retention (scanside.agent.state.retention)
    def first_event_after(self, seq: int) -> Optional[float]:
        """When the first event after seq was recorded (None: there is none)."""
        rows = self._q("SELECT created FROM events WHERE seq > ? ORDER BY seq LIMIT 1", (seq,))
        return float(rows[0]["created"]) if rows else None

    def oldest_open_activity(self) -> Optional[float]:
        """The first image of the oldest series or exam still open."""
        rows = self._q("SELECT MIN(t) AS t FROM (SELECT MIN(first_seen) AS t FROM exams WHERE state = 'open' "
                       "UNION ALL SELECT MIN(first_seen) FROM series WHERE state = 'open')")
        return rows[0]["t"] if rows and rows[0]["t"] is not None else None

    def count_events(self) -> int:
        return int(self._q("SELECT COUNT(*) AS n FROM events")[0]["n"])

    def count_files(self) -> int:
        return int(self._q("SELECT COUNT(*) AS n FROM files")[0]["n"])

    def nth_event_seq(self, n: int) -> int:
        rows = self._q("SELECT seq FROM events ORDER BY seq LIMIT 1 OFFSET ?", (max(n - 1, 0),))
        return int(rows[0]["seq"]) if rows else 0

    def _delete_batches(self, sql: str, args: tuple[Any, ...], batch: int, limit: Optional[int] = None) -> int:
        """Run a DELETE ... LIMIT ? in transactions of ``batch`` rows until it deletes nothing."""
        total = 0
        while limit is None or total < limit:
            n = batch if limit is None else min(batch, limit - total)
            with self.transaction():
                deleted = self._x(sql, (*args, n)).rowcount
            total += deleted
            if deleted < n:
                break
        return total

    def delete_events(self, upto_seq: int, before: Optional[float] = None, batch: int = 5000) -> int:
        """Delete events with seq <= upto_seq (and recorded before ``before``); how many."""
        cond = "seq <= ?" + (" AND created < ?" if before is not None else "")
        args = (upto_seq,) + ((before,) if before is not None else ())
        return self._delete_batches(f"DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE {cond} ORDER BY seq LIMIT ?)",
                                    args, batch)

    def delete_old_instances(self, before: float, batch: int = 5000) -> int:
        """Instance rows received before ``before`` whose series is complete."""
        return self._delete_batches(
            "DELETE FROM instances WHERE rowid IN (SELECT i.rowid FROM instances i JOIN series s ON s.series_uid = i.series_uid "
            "WHERE i.received < ? AND s.state = 'complete' LIMIT ?)", (before,), batch)

    def delete_file_rows(self, before: float, gone: Any, batch: int = 5000, limit: Optional[int] = None,
                         scan: int = 50_000) -> int:
        """File rows last updated before ``before`` whose file ``gone(path)`` says is no longer there
        (at most ``scan`` rows looked at per call, oldest first)."""
        rows = self._q("SELECT path FROM files WHERE updated < ? ORDER BY updated LIMIT ?", (before, scan))
        paths = [r["path"] for r in rows if gone(r["path"])]
        if limit is not None:
            paths = paths[:limit]
        for i in range(0, len(paths), batch):
            with self.transaction():
                self._conn.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in paths[i:i + batch]])
        return len(paths)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
