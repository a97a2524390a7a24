"""/metrics after a simulated exam streamed into a running agent: counters by label match the
simulator's ground truth, the gauges read live state, inference latency and engine info come from a
real ONNX Runtime engine, and no UID or patient identifier appears anywhere in the exposition."""
from __future__ import annotations

import re
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scanside.agent.service.metrics import AgentMetrics
from tests.agent import _live

pytestmark = pytest.mark.timeout(240)


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(smp: dict, name: str, **labels: str) -> float:
    found = [s.value for s in smp.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, f"no sample {name}{labels}"
    return sum(found)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    src, truth = _live.exam(tmp_path_factory)
    root = tmp_path_factory.mktemp("metrics-agent")
    agent = _live.start(root)
    try:
        _live.stream_in_background(src, agent, truth).join(timeout=120)
        assert _live.wait(lambda: _live.completed_parts(agent) >= _live.expected_parts(truth)
                          and agent.store.file_counts().get("quarantined") == len(truth.corrupt_files))
        assert _live.wait(lambda: _live.settled(agent))  # the image models have labelled everything
        assert _live.wait(lambda: agent.sinks.cursor(next(s for s in agent.sinks.sinks if s.name == "metrics"))
                          >= agent.store.last_event_seq())
        resp = httpx.get(f"{agent.api_url}/metrics", timeout=10)
    finally:
        agent.stop()
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return resp.text, truth


def test_counters_by_label_match_ground_truth(scraped):
    text, truth = scraped
    smp = samples(text)
    want = Counter(p.label for s in truth.series for p in s.parts)
    got = Counter()
    for s in smp["scanside_series_completed_total"]:
        if s.value:  # every known label set is exposed, at 0 until it happens (issue 21, 11)
            assert s.labels["vendor"] == "siemens"
        got[s.labels["label"]] += int(s.value)
    assert +got == want
    # ... all of them from the start: each label x vendor x complete, the quarantine reasons, the event types
    assert len(smp["scanside_series_completed_total"]) == 6 * 9 * 2
    assert value(smp, "scanside_files_quarantined_total", reason="not_dicom") == 0
    assert value(smp, "scanside_events_total", type="alert_acknowledged") == 0
    n_files = sum(s.n_files for s in truth.series)
    assert value(smp, "scanside_files_total", outcome="ingested") == n_files - len(truth.corrupt_files)
    assert value(smp, "scanside_files_total", outcome="quarantined") == len(truth.corrupt_files) == 1
    assert value(smp, "scanside_files_quarantined_total", reason="truncated") == 1
    assert value(smp, "scanside_alerts_total", code="FILE_QUARANTINED", severity="warning") == 1
    # one latency observation per completed logical series
    assert value(smp, "scanside_series_completion_latency_seconds_count") == sum(want.values())
    assert value(smp, "scanside_events_total", type="series_completed") == sum(want.values())


def test_gauges_and_info(scraped):
    text, _ = scraped
    smp = samples(text)
    assert value(smp, "scanside_queue_depth") == 0
    assert value(smp, "scanside_series_open") == 0
    assert value(smp, "scanside_outbox_depth", sink="jsonl") == 0
    assert value(smp, "scanside_delivery_failures_total", sink="jsonl") == 0
    assert value(smp, "scanside_state_disk_free_bytes") > 0
    (build,) = smp["scanside_build_info"]
    assert build.value == 1 and build.labels["version"] and build.labels["onnxruntime"]
    assert value(smp, "process_resident_memory_bytes") > 10e6  # the process collector is registered


def test_naming_conventions(scraped):
    text, _ = scraped
    for family in text_string_to_metric_families(text):
        if family.name.startswith(("process_", "python_")):
            continue
        assert family.name.startswith("scanside_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name


def test_no_uid_or_patient_identifier_in_exposition(scraped):
    text, truth = scraped
    for ident in _live.identifiers(truth):
        assert ident not in text, f"identifier leaked into /metrics: {ident[:8]}..."
    # no label value looks like a DICOM UID (digits and dots, several components)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for k, v in s.labels.items():
                assert not re.fullmatch(r"\d+(\.\d+){3,}", v) or k in ("python", "onnxruntime", "pydicom", "version"), (s.name, k, v)


def test_inference_latency_and_engine_info_from_a_real_engine(tmp_path):
    from scanside.engines.store import ModelStore
    from tests.engines._tiny import install_tiny, sample_input

    install_tiny(tmp_path / "models")
    engine, selection = ModelStore(tmp_path / "models").open("tiny3d")
    m = AgentMetrics(process=False)
    m.instrument(engine)
    m.instrument(engine)  # idempotent: still one observation per run
    for _ in range(2):
        engine.run({"x": sample_input()})
    with m.time_inference(engine):  # the explicit form, for code that times a call of its own
        time.sleep(0.01)
    smp = samples(m.exposition().decode())
    info = engine.describe()
    labels = dict(model=info.model, backend=info.backend, precision=info.precision)
    assert value(smp, "scanside_inference_latency_seconds_count", **labels) == 3
    assert value(smp, "scanside_inference_latency_seconds_sum", **labels) > 0
    (eng,) = smp["scanside_engine_info"]
    assert eng.labels == {**labels, "device": info.device} and eng.value == 1
    assert selection.backend == info.backend


def test_a_failing_collector_does_not_break_the_scrape(tmp_path):
    class Broken:  # an agent whose state cannot be read (e.g. a closed database)
        @property
        def ingestor(self):
            raise RuntimeError("closed")

    m = AgentMetrics(process=False)
    m.agent = Broken()  # type: ignore[assignment]
    smp = samples(m.exposition().decode())
    assert "scanside_build_info" in smp and "scanside_queue_depth" not in smp
