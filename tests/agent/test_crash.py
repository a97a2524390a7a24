"""Crash faults against the simulator's ground truth.

kill -9: a `scanside run` subprocess is SIGKILLed at seeded random moments while an exam streams in
(the scanner keeps writing while the agent is down), restarted on the same state folder, N times; then
every logical series must be completed exactly once per revision, every alert fact recorded once,
events.jsonl must hold each event key once, and the webhook receiver must have every event
(repeats only under the same Idempotency-Key). The short form runs in `make test`; `pytest -m soak`
runs more kills over more exams.

Out of order: an exam's files arrive shuffled, some twice under another name, and one file after its
series has completed: every series completes, the copies are recorded as duplicates, the late file
reopens its series, which completes again as revision 2."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from scanside.agent.runtime.config import load_config
from scanside.agent.service.daemon import Agent
from scanside.agent.state.database import StateStore
from scanside.simulator.scanner import simulate_exam, stream_exam
from tests.agent.test_webhook import Receiver
from tests.agent._live import waiter

ROOT = Path(__file__).resolve().parents[2]
_EXAMS: dict[tuple, tuple[Path, object]] = {}


def exam(tmp_path_factory, vendor: str, seed: int, faults: tuple[str, ...] = ("b1000_high",)):
    key = (vendor, seed, faults)
    if key not in _EXAMS:
        out = tmp_path_factory.mktemp(f"crash-{vendor}-{seed}")
        _EXAMS[key] = (out, simulate_exam(vendor, out, seed, faults=list(faults)))
    return _EXAMS[key]


_wait = waiter(60.0, step=0.2)


def fact(ev) -> tuple:
    """What an event says, independent of its key: two events with the same fact are a duplicate."""
    t = ev.type
    if t == "series_completed":
        return (t, ev.series.series_id, ev.series.revision)
    if t == "series_reopened":
        return (t, ev.series_uid, ev.revision)
    if t == "file_quarantined":
        return (t, ev.file_ref)
    if t == "protocol_deviation":
        return (t, ev.study_uid, ev.code, ev.series_id)
    if t in ("label_mismatch", "series_classified"):
        return (t, ev.series_id)
    if t in ("triage_result", "exam_completed"):
        return (t, ev.study_uid)
    return (t, ev.key)


def expected_series_ids(truth) -> set[tuple[str, str]]:
    return {(s.series_uid, p.label) for s in truth.series for p in s.parts}


class Runner:
    """`scanside run` as a subprocess that can be SIGKILLed and restarted on the same state folder."""

    def __init__(self, root: Path, webhook_url: str, quiet_s: float = 6.0, exam_quiet_s: float = 8.0):
        self.root = root
        self.export, self.state = root / "export", root / "state"
        self.export.mkdir(parents=True, exist_ok=True)
        self.cfg = root / "scanside.toml"
        self.cfg.write_text(f"""
[watch]
settle_s = 0.2
[series]
quiet_period_s = {quiet_s}
incomplete_grace_s = {quiet_s + 4}
[ingest]
quarantine_after_s = 0.5
retry_delays_s = [0.2, 0.3]
[output]
stdout = false
[protocol]
exam_quiet_period_s = {exam_quiet_s}
[webhook]
url = "{webhook_url}"
backoff_initial_s = 0.2
backoff_max_s = 1.0
""")
        self.proc: subprocess.Popen | None = None
        self.lives = 0

    def start(self) -> None:
        self.lives += 1
        self.log = open(self.root / f"agent-{self.lives}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "scanside.agent.cli", "--log-level", "info", "run", "--no-api",
                                      "--config", str(self.cfg), "--watch", str(self.export), "--state-dir", str(self.state)],
                                     stdout=subprocess.DEVNULL, stderr=self.log, cwd=ROOT)

    def kill(self) -> None:
        assert self.proc is not None
        assert self.proc.poll() is None, (self.root / f"agent-{self.lives}.log").read_text()[-3000:]
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.log.close()

    def events(self) -> list:
        store = StateStore(self.state / "state.sqlite") if (self.state / "state.sqlite").exists() else None
        if store is None:
            return []
        try:
            return store.events_after(0, limit=1_000_000)
        finally:
            store.close()

    def jsonl(self) -> list[dict]:
        path = self.state / "events.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def crash_run(tmp_path: Path, exams: list, kills: int, seed: int, rate: float = 60.0) -> dict:
    """Runs the exams through kill -9 / restart cycles, checks everything, and returns what happened."""
    t0 = time.monotonic()
    rng = random.Random(seed)
    receiver = Receiver()
    runner = Runner(tmp_path, receiver.url)
    done = threading.Event()

    def scanner() -> None:
        for src, truth in exams:  # exams one after the other, as on a scanner
            stream_exam(src, runner.export, rate=rate, ground_truth=truth, write_mode=rng.choice(["chunks", "rename"]))
        done.set()

    runner.start()
    feeder = threading.Thread(target=scanner, daemon=True)
    feeder.start()
    try:
        n_files = sum(s.n_files for _, t in exams for s in t.series)
        stream_s = n_files / rate
        for _ in range(kills):
            # a kill anywhere from model loading through ingestion and series completion
            time.sleep(rng.uniform(0.5, max(1.0, 1.5 * stream_s / kills)))
            runner.kill()
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.5, 2.0))  # down for a while: files pile up
            runner.start()
        assert done.wait(600)
        want = set().union(*(expected_series_ids(t) for _, t in exams))
        studies = {t.study_uid for _, t in exams}

        def finished() -> bool:
            evs = runner.events()
            got = {(e.series.series_uid, e.series.label) for e in evs if e.type == "series_completed"}
            ended = {e.study_uid for e in evs if e.type == "exam_completed"}
            classified = sum(e.type == "series_classified" for e in evs)
            completed = sum(e.type == "series_completed" for e in evs)
            return got >= want and ended >= studies and classified >= completed

        assert _wait(finished, 240, step=0.5), "not everything completed after the last restart"
        # the outbox drains: the receiver gets everything the store holds
        assert _wait(lambda: {r["headers"].get("Idempotency-Key") for r in receiver.accepted()}
                     >= {e.key for e in runner.events()}, 60), "webhook outbox did not drain"
        time.sleep(1.0)
    finally:
        runner.stop()
        receiver.stop()

    events = runner.events()
    assert runner.lives == kills + 1
    # every logical series completed, each once per revision, every fact once
    completed = Counter((e.series.series_id, e.series.revision) for e in events if e.type == "series_completed")
    assert completed and max(completed.values()) == 1
    assert {(e.series.series_uid, e.series.label) for e in events if e.type == "series_completed"} == want
    facts = Counter(fact(e) for e in events)
    assert [f for f, n in facts.items() if n > 1] == []
    keys = [e.key for e in events]
    assert len(keys) == len(set(keys))
    assert any(e.type == "protocol_deviation" for e in events), "the b1000_high fault should raise a deviation"
    assert sum(e.type == "exam_completed" for e in events) == len(exams)
    # the file store agrees with the scanner: every file ingested once, nothing lost
    counts = Counter()
    store = StateStore(runner.state / "state.sqlite")
    try:
        counts.update(store.file_counts())
    finally:
        store.close()
    assert counts["ingested"] == sum(s.n_files for _, t in exams for s in t.series) - sum(len(t.corrupt_files) for _, t in exams)
    # the event log: each key exactly once, in store order
    lines = runner.jsonl()
    assert [x["key"] for x in lines] == keys
    # the webhook: every event; repeats only as the same event under the same Idempotency-Key
    by_key: dict[str, set[bytes]] = {}
    for r in receiver.accepted():
        body = json.loads(r["body"])
        assert r["headers"]["Idempotency-Key"] == body["key"]
        by_key.setdefault(body["key"], set()).add(json.dumps({k: v for k, v in body.items()}, sort_keys=True).encode())
    assert set(by_key) == set(keys)
    assert all(len(v) == 1 for v in by_key.values())
    deliveries = len(receiver.accepted())
    return {"exams": len(exams), "vendors": sorted({t.vendor for _, t in exams}), "files": n_files,
            "kills": kills, "restarts": runner.lives - 1, "seed": seed, "events": len(keys),
            "events_by_type": dict(sorted(Counter(e.type for e in events).items())),
            "checks_passed": ["every logical series completed, once per revision", "no fact recorded twice",
                              "events.jsonl holds each key once, in store order", "every file ingested once",
                              "the webhook got every event; repeats only under the same Idempotency-Key"],
            "webhook_deliveries": deliveries,
            "webhook_redeliveries_same_key": deliveries - len(keys), "seconds": round(time.monotonic() - t0, 1)}


def test_kill9_while_exam_streams_in(tmp_path, tmp_path_factory):
    crash_run(tmp_path, [exam(tmp_path_factory, "ge", 21)], kills=3, seed=7)


@pytest.mark.soak
def test_kill9_soak_many_kills_many_exams(tmp_path, tmp_path_factory):
    seed = int(os.environ.get("SOAK_SEED", "11"))
    exams = [exam(tmp_path_factory, v, seed + i) for i, v in enumerate(["siemens", "philips", "ge", "siemens-xa"])]
    result = crash_run(tmp_path, exams, kills=int(os.environ.get("SOAK_KILLS", "12")), seed=seed)
    # the figures for issue 7 (bench/results/soak.json): what ran, and that nothing was lost or repeated
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["command"] = "make soak (or SOAK_KILLS=12 .venv/bin/pytest -m soak tests/agent/test_crash.py)"
    out = ROOT / "bench" / "results" / "soak.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------------- out of order, duplicated, late
def test_shuffled_duplicated_and_late_files(tmp_path, tmp_path_factory):
    src, truth = exam(tmp_path_factory, "ge", 21)
    rng = random.Random(3)
    files = [f for s in truth.series for f in s.files]
    # the late file: the last image of a multi-image series arrives after that series has completed
    late_series = next(s for s in truth.series if s.n_files >= 10 and not set(s.files) & set(truth.corrupt_files))
    late = late_series.files[-1]
    first = [f for f in files if f != late]
    rng.shuffle(first)
    dups = rng.sample([f for f in first if f not in truth.corrupt_files], 15)
    export = tmp_path / "export"
    export.mkdir()
    agent = Agent(load_config(**{
        "watch.folder": str(export), "state.dir": str(tmp_path / "state"), "output.stdout": False,
        "watch.settle_s": 0.2, "series.quiet_period_s": 1.5, "series.incomplete_grace_s": 2.5,
        "ingest.quarantine_after_s": 0.5, "ingest.retry_delays_s": [0.2, 0.3],
        "analysis.image_label": False, "analysis.triage": False})).start()

    def put(rel: str, name: str | None = None) -> None:
        dest = export / (name or rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name("." + dest.name + ".tmp")
        shutil.copyfile(src / rel, tmp)
        os.replace(tmp, dest)

    try:
        for i, rel in enumerate(first):
            put(rel)
            if rel in dups:
                put(rel, str(Path(rel).with_name("COPY_" + Path(rel).name)))
        want = expected_series_ids(truth)

        def completed():
            return {(e.series.series_uid, e.series.label): e for e in agent.store.events_after(0, limit=100_000)
                    if e.type == "series_completed"}
        assert _wait(lambda: set(completed()) >= want, 90)
        late_parts = [e for k, e in completed().items() if k[0] == late_series.series_uid]
        assert late_parts and all(e.series.revision == 1 and not e.series.complete for e in late_parts)
        put(late)
        assert _wait(lambda: any(e.type == "series_completed" and e.series.revision == 2
                                 for e in agent.store.events_after(0, limit=100_000)), 30)
        time.sleep(0.5)
        events = agent.store.events_after(0, limit=100_000)
        counts = agent.store.file_counts()
    finally:
        agent.stop()
    assert {(e.series.series_uid, e.series.label) for e in events if e.type == "series_completed"} == want
    reopened = [e for e in events if e.type == "series_reopened"]
    assert [(e.series_uid, e.revision) for e in reopened] == [(late_series.series_uid, 2)]
    r2 = [e for e in events if e.type == "series_completed" and e.series.revision == 2]
    assert r2 and all(e.series.series_uid == late_series.series_uid and e.series.complete for e in r2)
    assert sum(e.series.n_instances for e in r2) == sum(e.series.n_instances for e in events if e.type == "series_completed"
                                                         and e.series.series_uid == late_series.series_uid and e.series.revision == 1) + 1
    assert counts.get("duplicate") == len(dups)
    assert counts.get("ingested") == len(files) - len(truth.corrupt_files)
    assert Counter(fact(e) for e in events).most_common(1)[0][1] == 1


# ---------------------------------------------------------------------- restart after a long stop
def test_restart_long_after_a_series_went_quiet_waits_for_its_backlog(tmp_path):
    """The agent stops halfway through a series, stays down past the incomplete grace while the
    scanner writes the rest, and restarts: the series completes whole (not 'incomplete' by the time the
    agent was down), because the ingest worker judges quiet periods only once the backlog is queued."""
    from tests.agent.factory import series_files

    export = tmp_path / "export"
    staged = series_files(tmp_path / "stage", 12, images_in_acquisition=12, rows=32, cols=32)
    cfg = load_config(**{"watch.folder": str(export), "state.dir": str(tmp_path / "state"), "output.stdout": False,
                         "watch.settle_s": 0.1, "series.quiet_period_s": 1.0, "series.incomplete_grace_s": 1.5,
                         "analysis.image_label": False, "analysis.triage": False, "api.enabled": False})

    def arrive(files):
        for f in files:
            dest = export / "s1" / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)

    agent = Agent(cfg).start()
    try:
        arrive(staged[:6])
        assert _wait(lambda: agent.store.file_counts().get("ingested") == 6, 30)
    finally:
        agent.stop()
    time.sleep(2.5)  # down longer than the incomplete grace; the scanner goes on writing
    arrive(staged[6:])
    agent = Agent(cfg).start()
    try:
        assert _wait(lambda: any(e.type == "series_completed" for e in agent.store.events_after(0)), 30)
        time.sleep(0.5)
        events = agent.store.events_after(0)
    finally:
        agent.stop()
    (done,) = [e for e in events if e.type == "series_completed"]
    assert done.series.complete and done.series.n_images == 12
    assert not [e for e in events if e.type == "protocol_deviation" and e.code == "SERIES_INCOMPLETE"]
