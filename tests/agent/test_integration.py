"""Simulated exams of every vendor style streamed in real time into a watched folder: every series
completes exactly once with the label the simulator's ground truth gives; a restart mid-exam loses
and duplicates nothing; an injected truncated file is quarantined with its reason."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from scanside.agent.runtime.config import load_config
from scanside.agent.service.daemon import Agent
from scanside.agent.state.database import StateStore
from scanside.simulator.scanner import simulate_exam, stream_exam
from tests.agent._live import waiter

VARIANTS = {
    "siemens": dict(vendor="siemens"),
    "siemens-mosaic": dict(vendor="siemens", mosaic=True),
    "siemens-xa": dict(vendor="siemens-xa"),
    "ge": dict(vendor="ge"),
    "philips": dict(vendor="philips"),
    "philips-enhanced": dict(vendor="philips", enhanced=True),
}


@pytest.fixture(scope="session")
def exams(tmp_path_factory):
    cache = {}

    def get(name, seed=11, faults=()):
        key = (name, seed, tuple(faults))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"exam-{name}")
            kw = dict(VARIANTS[name])
            cache[key] = (out, simulate_exam(kw.pop("vendor"), out, seed, faults=list(faults), **kw))
        return cache[key]

    return get


def expected_parts(truth):
    return Counter((s.series_uid, p.label, p.b_value if p.label.startswith("DWI") else None)
                   for s in truth.series for p in s.parts)


def observed_parts(events):
    return Counter((e.series.series_uid, e.series.label, e.series.b_values[-1] if e.series.label.startswith("DWI") else None)
                   for e in events if e.type == "series_completed")


def _config(tmp_path, **kw):
    return load_config(**{
        "watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"), "output.stdout": False,
        "watch.settle_s": 0.2, "series.quiet_period_s": 2.0, "ingest.quarantine_after_s": 1.0,
        "ingest.retry_delays_s": [0.2, 0.4], **kw})


_wait = waiter(60.0, step=0.05)


@pytest.mark.parametrize("variant,write_mode", [
    ("siemens", "chunks"), ("siemens-mosaic", "rename"), ("siemens-xa", "rename"),
    ("ge", "chunks"), ("philips", "rename"), ("philips-enhanced", "chunks"),
])
def test_realtime_exam_every_series_once_with_right_label(tmp_path, exams, variant, write_mode):
    src, truth = exams(variant)
    want = expected_parts(truth)
    agent = Agent(_config(tmp_path)).start()
    events = []
    agent.subscribe(events.append, from_now=False)
    try:
        stream_exam(src, tmp_path / "export", rate=400, write_mode=write_mode, ground_truth=truth)
        assert _wait(lambda: sum(observed_parts(events).values()) >= sum(want.values()))
        time.sleep(0.3)  # anything extra would show up now
        counts = agent.store.file_counts()
    finally:
        agent.stop()
    assert observed_parts(events) == want
    keys = [e.key for e in events]
    assert len(keys) == len(set(keys))
    assert all(e.series.complete for e in events if e.type == "series_completed")
    assert counts == {"ingested": sum(s.n_files for s in truth.series)}


def test_restart_mid_exam_loses_and_duplicates_nothing(tmp_path, exams):
    src, truth = exams("ge")
    files = [f for s in truth.series for f in s.files]
    stop = threading.Event()
    streamed = []
    agent = Agent(_config(tmp_path)).start()

    def on_file(path):
        streamed.append(path)
        if len(streamed) == len(files) // 2:
            stop.set()  # the scanner is still writing when the agent goes down

    stream_exam(src, tmp_path / "export", rate=300, ground_truth=truth, stop_event=stop, on_file=on_file)
    agent.stop()
    # the rest of the exam arrives while the agent is down, then the agent restarts
    remaining = type(truth)(**{**truth.model_dump(), "series": []})
    half = len(streamed)
    for s in truth.series:
        rest = [f for f in s.files if (tmp_path / "export" / f) not in streamed]
        if rest:
            remaining.series.append(s.model_copy(update={"files": rest}))
    stream_exam(src, tmp_path / "export", rate=0, ground_truth=remaining)
    agent = Agent(_config(tmp_path)).start()
    try:
        want = expected_parts(truth)
        assert _wait(lambda: sum(observed_parts(agent.store.events_after(0, limit=10_000)).values()) >= sum(want.values()))
        time.sleep(0.5)
        events = agent.store.events_after(0, limit=10_000)
    finally:
        agent.stop()
    assert 0 < half < len(files)
    assert observed_parts(events) == want
    # the event log holds every stored event once: compared after the stop (the image side may still have added
    # a label or the exam's end after the snapshot above, on a loaded machine)
    store = StateStore(agent.config.db_path)
    try:
        stored = [e.key for e in store.events_after(0, limit=10_000)]
    finally:
        store.close()
    log_lines = [json.loads(x) for x in agent.config.jsonl_path.read_text().splitlines()]
    assert [x["key"] for x in log_lines] == stored and len(set(stored)) == len(stored) >= len(events)


def test_truncated_file_fault_is_quarantined(tmp_path, exams):
    src, truth = exams("siemens", seed=5, faults=("truncated_file",))
    assert truth.corrupt_files
    agent = Agent(_config(tmp_path)).start()
    try:
        stream_exam(src, tmp_path / "export", rate=0, ground_truth=truth)
        assert _wait(lambda: agent.store.file_counts().get("quarantined") == len(truth.corrupt_files))
        (event,) = [e for e in agent.store.events_after(0, limit=10_000) if e.type == "file_quarantined"]
    finally:
        agent.stop()
    assert event.reason == "truncated"
    (reason_file,) = agent.config.quarantine_path.glob("*.reason.json")
    note = json.loads(reason_file.read_text())
    # named by its ref; the path (export folder names can hold patient names) only with privacy.include_file_paths
    assert note["file_ref"] == event.file_ref and note["reason"] == "truncated" and "original_path" not in note
    copy = agent.config.quarantine_path / f"{event.file_ref}.dcm"
    assert copy.read_bytes() == (tmp_path / "export" / truth.corrupt_files[0]).read_bytes()


def test_scan_json_reports_series_and_quarantine(exams):
    src, truth = exams("siemens", seed=5, faults=("truncated_file",))
    out = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "scan", str(src), "--json"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    required = {"study_uid", "series_uid", "series_number", "series_description", "vendor", "label", "reason",
                "b_values", "plane", "n_instances", "complete"}
    assert report["series"] and all(required <= set(s) for s in report["series"])
    assert observed_parts_from_report(report) == expected_parts(truth)
    assert [q["reason"].split(":")[0] for q in report["quarantined"]] == ["truncated"]
    assert report["quarantined"][0]["path"].endswith(truth.corrupt_files[0])


def observed_parts_from_report(report):
    return Counter((s["series_uid"], s["label"], s["b_values"][-1] if s["label"].startswith("DWI") else None)
                   for s in report["series"])
