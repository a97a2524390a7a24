"""A corrupt, truncated, locked or read-only state database (issue 20, finding 13): a clear error that
names the file, never a raw traceback, and readiness that tells the truth."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from scanside.agent.state.database import StateError, StateStore

REPO = Path(__file__).resolve().parents[2]


def _filled(path: Path, rows: int = 3000) -> Path:
    store = StateStore(path)
    with store.transaction():
        for i in range(rows):
            store.record_file(f"/export/f{i:05d}.dcm", 1000 + i, float(i), "ingested", f"1.2.{i}")
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def test_corrupt_file_is_named(tmp_path):
    db = tmp_path / "state.sqlite"
    db.write_bytes(os.urandom(8192))
    with pytest.raises(StateError) as err:
        StateStore(db)
    assert str(db) in str(err.value) and "corrupt" in str(err.value)


def test_truncated_file_is_named(tmp_path):
    db = _filled(tmp_path / "state.sqlite")
    with open(db, "r+b") as fp:
        fp.truncate(db.stat().st_size // 2)
    with pytest.raises(StateError) as err:
        StateStore(db)
    assert str(db) in str(err.value) and "corrupt or truncated" in str(err.value)


def test_malformed_last_page_is_found_at_open_not_on_first_write(tmp_path):
    db = _filled(tmp_path / "state.sqlite")
    page = 4096
    size = db.stat().st_size
    with open(db, "r+b") as fp:
        fp.seek(size - page)
        fp.write(b"\xff" * page)
    with pytest.raises(StateError) as err:
        StateStore(db)
    assert "corrupt" in str(err.value)


def test_locked_file_is_named(tmp_path):
    db = _filled(tmp_path / "state.sqlite", rows=10)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StateError) as err:
            StateStore(db, busy_timeout_s=0.2)
        assert str(db) in str(err.value) and "locked" in str(err.value)
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def test_readiness_does_not_wait_behind_a_locked_database(tmp_path):
    db = _filled(tmp_path / "state.sqlite", rows=10)
    store = StateStore(db, busy_timeout_s=5)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    worker = threading.Thread(target=lambda: _try_write(store))
    worker.start()  # holds the store's connection while SQLite waits for the lock
    try:
        assert store.writable() is False  # answered within READY_LOCK_WAIT_S, not after the busy timeout
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        worker.join()
    assert store.writable() is True


def _try_write(store: StateStore) -> None:
    try:
        with store.transaction():
            store.record_file("/x", 1, 1.0, "ingested")
    except sqlite3.Error:
        pass


def test_corruption_found_while_running_keeps_readiness_false(tmp_path):
    db = _filled(tmp_path / "state.sqlite", rows=10)
    store = StateStore(db)
    with pytest.raises(sqlite3.DatabaseError):
        with store.transaction():
            raise sqlite3.DatabaseError("database disk image is malformed")
    assert store.writable() is False and str(db) in (store.problem() or "")


def test_cli_names_a_read_only_database(tmp_path, nobody_can_run_the_agent):
    """`scanside run` as an unprivileged user on a database it may read but not write (in a folder it
    may write, so the folder check at start-up passes): one line naming the file, exit 3 (cannot start
    here), no traceback."""
    state = tmp_path / "state"
    state.mkdir()
    _filled(state / "state.sqlite", rows=10)
    for p in (tmp_path, state, state / "state.sqlite"):
        os.chmod(p, 0o755 if p == tmp_path else 0o777 if p.is_dir() else 0o644)
    os.chmod(tmp_path.parent, 0o755)
    os.chmod(tmp_path.parent.parent, 0o755)
    (tmp_path / "export").mkdir(mode=0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": "/nonexistent"}
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "scanside.agent.cli",
                           "run", "--watch", str(tmp_path / "export"), "--state-dir", str(state), "--no-api"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
    assert proc.returncode == 3, proc.stderr
    assert str(state / "state.sqlite") in proc.stderr and "Traceback" not in proc.stderr


def test_cli_names_a_corrupt_database(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(5000))
    (tmp_path / "export").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "run", "--watch", str(tmp_path / "export"),
                           "--state-dir", str(state), "--no-api"], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(REPO))
    assert proc.returncode == 3, proc.stderr
    assert str(state / "state.sqlite") in proc.stderr and "Traceback" not in proc.stderr


def test_corruption_found_while_running_stops_the_watchdog(tmp_path):
    from scanside.agent.runtime.config import load_config
    from scanside.agent.service.daemon import Agent

    agent = Agent(load_config(**{"watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"),
                                 "output.stdout": False, "protocol.enabled": False})).start()
    try:
        assert agent.healthy()
        with pytest.raises(sqlite3.DatabaseError):
            with agent.store.transaction():
                raise sqlite3.DatabaseError("database disk image is malformed")
        assert not agent.healthy()  # watchdog pings stop: systemd restarts it, and the start names the file
    finally:
        agent.stop()


def test_a_large_database_opens_at_once_and_its_check_finishes_beside_the_agent(tmp_path):
    """Opening may spend only open_check_s on PRAGMA quick_check (it reads every page: seconds on a year-sized
    database); past it the agent starts, and the rest of the check, on a connection of its own, still finds a
    malformed page and makes the store report it (readiness false)."""
    db = _filled(tmp_path / "state.sqlite")
    page = 4096
    with open(db, "r+b") as fp:
        fp.seek(db.stat().st_size - page)
        fp.write(b"\xff" * page)
    store = StateStore(db, open_check_s=0.0)  # the budget is spent at once: the check goes to the background
    assert store.check_worker is not None
    deadline = time.monotonic() + 30
    while store.check_worker.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.problem() is not None and "corrupt" in store.problem()
    assert not store.writable()
    store.close()

    sound = _filled(tmp_path / "sound.sqlite")
    store = StateStore(sound, open_check_s=0.0)
    assert store.check_worker is not None
    store.check_worker.stop(timeout=30)
    assert store.problem() is None and store.writable()
    store.close()
    assert StateStore(sound).check_worker is None  # a small database is checked within the budget
