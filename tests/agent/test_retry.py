"""One retry policy for every output (scanside.agent.outputs.retry): transient failures retried with backoff a bounded
number of times, permanent ones and exhausted ones recorded as dead letters in the state database,
counted in scanside_output_dead_letters_total; failed model runs counted, not dropped."""
from __future__ import annotations

import logging
import random
import threading

import httpx
import pytest

from scanside.agent.runtime.config import load_config
from scanside.agent.schema.events import ExamCompleted
from scanside.agent.service.metrics import AgentMetrics
from scanside.agent.outputs.retry import OutputRetry, RetryLater, RetryPolicy
from scanside.agent.outputs.sinks import SinkRunner
from scanside.agent.state.database import StateStore
from scanside.agent.outputs.webhook import WebhookSink
from tests.agent import _live
from tests.agent.test_webhook import Receiver, drain, make_events, store, webhook_config  # noqa: F401 (store: fixture)


def _stored(store, events):
    for ev in events:
        ev.seq = store.append_event(ev)
    return events


def test_transient_backs_off_then_gives_up_into_a_dead_letter(store):
    (ev,) = _stored(store, make_events(1, 1))
    retry = OutputRetry("webhook", RetryPolicy(1.0, 4.0, 0.0, max_attempts=4), store, random.Random(0))
    delays = []
    for _ in range(3):
        with pytest.raises(RetryLater) as caught:
            retry.transient(ev, "HTTP 503", stage="HTTP 503")
        delays.append(caught.value.retry_after_s)
    assert delays == [1.0, 2.0, 4.0]  # doubling, capped at max_s
    assert store.dead_letters("webhook") == []
    retry.transient(ev, "HTTP 503", stage="HTTP 503")  # the 4th failed attempt: no RetryLater, a dead letter
    (dead,) = store.dead_letters("webhook")
    assert (dead["seq"], dead["key"], dead["reason"]) == (ev.seq, ev.key, "HTTP 503")
    assert "gave up after 4 attempt(s)" in dead["detail"]
    assert retry.failed_attempts == 4 and retry.dead_lettered == 1 and retry.attempt == 0  # the next event starts afresh


def test_a_receivers_retry_after_is_honoured_within_the_cap(store):
    (ev,) = _stored(store, make_events(1, 1))
    retry = OutputRetry("webhook", RetryPolicy(1.0, 30.0, 0.0, max_attempts=5), store)
    with pytest.raises(RetryLater) as caught:
        retry.transient(ev, "HTTP 429", hint_s=20.0)
    assert caught.value.retry_after_s == 20.0
    with pytest.raises(RetryLater) as caught:
        retry.transient(ev, "HTTP 429", hint_s=3600.0)
    assert caught.value.retry_after_s == 30.0


def test_policy_refuses_nonsense():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(initial_s=0)


def test_real_receiver_fails_transiently_then_succeeds(store):
    recv = Receiver(fail_first=2)
    try:
        events = _stored(store, make_events(1, 3))
        sink = WebhookSink(webhook_config(recv.url, max_attempts=5), store, rng=random.Random(1))
        runner = SinkRunner(store, [sink], threading.Condition())
        assert drain(runner, sink)
        assert [r["headers"]["Idempotency-Key"] for r in recv.requests[:3]] == [events[0].key] * 3
        assert sink.failed_attempts == 2 and sink.delivered == len(events)
        assert store.dead_letters() == []
    finally:
        recv.stop()


def test_real_receiver_rejecting_a_payload_dead_letters_it_at_once(store):
    recv = Receiver()
    try:
        events = _stored(store, make_events(1, 3))
        recv.status_for[events[0].key] = 422
        sink = WebhookSink(webhook_config(recv.url, max_attempts=5), store)
        runner = SinkRunner(store, [sink], threading.Condition())
        assert drain(runner, sink)
        keys = [r["headers"]["Idempotency-Key"] for r in recv.requests]
        assert keys == [e.key for e in events]  # one attempt for the rejected event, then the others in order
        (dead,) = store.dead_letters("webhook")
        assert dead["key"] == events[0].key and dead["reason"] == "HTTP 422"
        assert sink.dead_lettered == 1 and sink.delivered == 2
    finally:
        recv.stop()


def test_real_receiver_down_for_good_is_bounded(store):
    recv = Receiver(fail_first=10_000)  # answers 503 to everything
    try:
        events = _stored(store, make_events(1, 2))
        sink = WebhookSink(webhook_config(recv.url, max_attempts=3), store, rng=random.Random(2))
        runner = SinkRunner(store, [sink], threading.Condition())
        assert drain(runner, sink), "an output that never succeeds must still move on"
        keys = [r["headers"]["Idempotency-Key"] for r in recv.requests]
        assert keys == [events[0].key] * 3 + [events[1].key] * 3
        assert [d["key"] for d in store.dead_letters("webhook")] == [e.key for e in events]
        assert sink.failed_attempts == 6
    finally:
        recv.stop()


def _sample(text: str, name: str, **labels: str) -> float:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not exposed")


class RejectAll(dict):
    """Receiver.status_for that answers 400 (a permanent rejection) to every key."""

    def get(self, key, default=None):
        return 400


@pytest.mark.timeout(120)
def test_dead_letters_are_counted_in_the_metric(tmp_path):
    recv = Receiver()
    try:
        agent = _live.start(tmp_path, **{"webhook.url": recv.url, "webhook.backoff_initial_s": 0.05,
                                         "webhook.backoff_max_s": 0.1})
        try:
            recv.status_for = RejectAll()
            metrics = httpx.get(f"{agent.api_url}/metrics").text
            assert _sample(metrics, "scanside_output_dead_letters_total", output="webhook") == 0
            assert _sample(metrics, "scanside_output_dead_letters_total", output="dicom") == 0
            (tmp_path / "export" / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)  # quarantined: an event
            assert _live.wait(lambda: agent.store.dead_letters("webhook"), 30)
            n = len(agent.store.dead_letters("webhook"))
            metrics = httpx.get(f"{agent.api_url}/metrics").text
            assert _sample(metrics, "scanside_output_dead_letters_total", output="webhook") == n >= 1
            listed = httpx.get(f"{agent.api_url}/v1/dead-letters", params={"output": "webhook"}).json()
            assert len(listed) == n and listed[0]["reason"] == "HTTP 400" and listed[0]["output"] == "webhook"
        finally:
            agent.stop()
    finally:
        recv.stop()


def test_a_failed_model_run_is_counted_and_logged_at_error(tmp_path, caplog, monkeypatch):
    from scanside.agent.analysis.analysis import Analyzer

    config = load_config(**{"watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state")})
    store = StateStore(tmp_path / "state.sqlite")
    metrics = AgentMetrics(process=False)
    try:
        analyzer = Analyzer(config, store, threading.Condition(), metrics=metrics)

        def broken(study_uid, exam_over):
            raise RuntimeError("engine returned NaN")

        monkeypatch.setattr(analyzer, "_triage", broken)
        with caplog.at_level(logging.ERROR, logger="scanside.agent.analysis.analysis"):
            analyzer.deliver(ExamCompleted(key="exam_completed:1.2.3:1", study_uid="1.2.3", reason="operator",
                                           n_series=3, n_deviations=0))
        assert metrics.registry.get_sample_value("scanside_model_failures_total", {"stage": "triage"}) == 1
        assert metrics.registry.get_sample_value("scanside_model_failures_total", {"stage": "label"}) == 0
        assert any(r.levelno == logging.ERROR and "engine returned NaN" in r.getMessage() for r in caplog.records)
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_a_series_no_volume_can_be_made_of_is_skipped_not_a_model_failure(tmp_path, caplog):
    """A series without geometry (a screenshot, a vendor's odd export) next to a readable one of its grid: the
    image models skip it, counted by reason, logged at INFO; the readable series is still labelled and no model
    failure is counted (IT pages on scanside_model_failures_total)."""
    from pydicom.uid import generate_uid

    from tests.agent.factory import mr_dataset, series_files, write

    study = generate_uid()
    agent = _live.start(tmp_path)
    try:
        export = tmp_path / "export"
        bad_uid = generate_uid()
        for i in range(3):
            ds = mr_dataset(bad_uid, study, instance=i + 1, rows=16, cols=16, SeriesNumber=4, position=(0.0, 0.0, 3.0 * i))
            if i == 1:
                del ds.ImagePositionPatient
            write(ds, export / "bad" / f"IM{i + 1:04d}.dcm")
        with caplog.at_level(logging.INFO, logger="scanside.agent.analysis.analysis"):
            assert _live.wait(lambda: _live.completed_parts(agent) == 1 and _live.settled(agent), 60)
            # then a readable series of the same grid: looking for its diffusion siblings meets the bad one
            assert len(series_files(export / "good", 3, study_uid=study, rows=16, cols=16)) == 3
            assert _live.wait(lambda: _live.completed_parts(agent) == 2 and _live.settled(agent), 60)
        labelled = {e.series_number for e in agent.store.events_after(0, limit=1000) if e.type == "series_classified"}
        assert labelled == {3}
        metrics = httpx.get(f"{agent.api_url}/metrics").text
        assert _sample(metrics, "scanside_image_inputs_unusable_total", reason="missing_geometry", stage="label") == 1
        assert _sample(metrics, "scanside_model_failures_total", stage="label") == 0
        assert any(r.levelno == logging.INFO and "series 4: no label" in r.getMessage() for r in caplog.records)
        assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    finally:
        agent.stop()
