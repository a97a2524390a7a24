"""Webhook output against a real HTTP server on 127.0.0.1: failures then success, receiver down then
up, an agent restart in between, permanent rejections, signatures, ordering, idempotency keys."""
from __future__ import annotations

import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scanside.agent.runtime.config import load_config
from scanside.agent.service.daemon import Agent
from scanside.agent.schema.events import ExamCompleted, ProtocolDeviation, SeriesReopened, parse_event
from scanside.agent.outputs.sinks import SinkRunner
from scanside.agent.state.database import StateStore
from scanside.agent.outputs.webhook import Backoff, WebhookSink, retry_after_s, sign, verify

SECRET = "whsec_c2NhbnNpZGUtdGVzdC1zZWNyZXQ="


class Receiver:
    """A webhook receiver: records every request; answers 503 to the first `fail_first` requests,
    `status_for[key]` to given idempotency keys, optionally stalls past the client's timeout."""

    def __init__(self, port: int = 0, fail_first: int = 0):
        self.requests: list[dict] = []
        self.fail_first = fail_first
        self.status_for: dict[str, int] = {}
        self.stall_keys: set[str] = set()
        self.stall_s = 0.0
        self.lock = threading.Lock()
        recv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                key = self.headers.get("Idempotency-Key", "")
                with recv.lock:
                    n = len(recv.requests)
                    recv.requests.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
                    if n < recv.fail_first:
                        status = 503
                    else:
                        status = recv.status_for.get(key, 200)
                    stall = key in recv.stall_keys
                    if stall:
                        recv.stall_keys.discard(key)  # stall once: the retry is answered
                if stall:
                    time.sleep(recv.stall_s)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/scanside"

    def accepted(self) -> list[dict]:
        """Requests answered 2xx (the stalled one counts: the receiver processed it)."""
        with self.lock:
            return [r for i, r in enumerate(self.requests)
                    if i >= self.fail_first and self.status_for.get(r["headers"].get("Idempotency-Key"), 200) < 300]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_events(n_exams: int = 2, per_exam: int = 4):
    evs = []
    for i in range(per_exam):
        for e in range(n_exams):
            study = f"1.2.826.0.1.3680043.8.498.{e + 1}"
            if i == per_exam - 1:
                evs.append(ExamCompleted(key=f"exam-done:{study}", study_uid=study, reason="quiet_period", n_series=3, n_deviations=i))
            else:
                evs.append(ProtocolDeviation(key=f"dev:{study}:{i}", study_uid=study, alert_id=f"a{e}{i}", code="SLICE_TOO_THICK",
                                             severity="warning", message=f"deviation {i}", profile="pirads-v2.1-bpmri",
                                             measured="4.5 mm", required="<= 3 mm"))
    return evs


def webhook_config(url: str, **kw):
    base = {"webhook.url": url, "webhook.secret": SECRET, "webhook.backoff_initial_s": 0.05,
            "webhook.backoff_max_s": 0.2, "webhook.connect_timeout_s": 0.5, "webhook.read_timeout_s": 0.5}
    base.update({f"webhook.{k}": v for k, v in kw.items()})
    return load_config(**base).webhook


def drain(runner: SinkRunner, sink: WebhookSink, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        runner.pump()
        if sink.outbox_depth() == 0:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def store(tmp_path):
    s = StateStore(tmp_path / "state.sqlite")
    yield s
    s.close()


def check_delivery(requests, events):
    """No loss; duplicates only as repeats of the same key with the same body; order per exam kept."""
    keys = [r["headers"]["Idempotency-Key"] for r in requests]
    assert set(keys) == {e.key for e in events}
    bodies: dict[str, bytes] = {}
    for r in requests:
        k = r["headers"]["Idempotency-Key"]
        assert bodies.setdefault(k, r["body"]) == r["body"], "a retried event must be byte-identical"
        ev = parse_event(r["body"])
        assert ev.key == k
    seq_of = {e.key: e.seq for e in events}
    first_seen: list[str] = []
    for k in keys:
        if k not in first_seen:
            first_seen.append(k)
    by_exam: dict[str, list[int]] = {}
    for k in first_seen:
        by_exam.setdefault(parse_event(bodies[k]).study_uid, []).append(seq_of[k])
    for study, seqs in by_exam.items():
        assert seqs == sorted(seqs), f"order broken for {study}: {seqs}"
    return keys


def test_fails_then_accepts_with_signed_idempotent_requests(store):
    recv = Receiver(fail_first=3)
    try:
        events = make_events()
        for ev in events:
            ev.seq = store.append_event(ev)
        sink = WebhookSink(webhook_config(recv.url), store, rng=random.Random(1))
        runner = SinkRunner(store, [sink], threading.Condition())
        assert sink.outbox_depth() == len(events)
        assert drain(runner, sink)
        keys = check_delivery(recv.requests, events)
        # the first event was attempted 4 times (3 x 503, then 200), every other event once
        assert keys[:4] == [events[0].key] * 4
        assert len(keys) == len(events) + 3
        assert sink.failed_attempts == 3 and sink.delivered == len(events)
        for r in recv.requests:
            h = r["headers"]
            assert h["Content-Type"] == "application/json"
            assert verify(SECRET, h, r["body"]), "signature must verify with the shared secret"
            assert not verify("whsec_" + "QUFBQQ==", h, r["body"]), "and fail with another"
            assert h["webhook-id"] == h["Idempotency-Key"]
            assert r["path"] == "/hooks/scanside"
        # delivered bodies are the events as stored (no extra fields: no patient identifiers can leak in)
        got = json.loads(recv.requests[-1]["body"])
        assert got == json.loads(events[-1].model_dump_json())
    finally:
        recv.stop()


def test_receiver_down_then_up_drains_the_outbox(store):
    port = free_port()
    events = make_events()
    for ev in events:
        ev.seq = store.append_event(ev)
    sink = WebhookSink(webhook_config(f"http://127.0.0.1:{port}/h"), store, rng=random.Random(2))
    runner = SinkRunner(store, [sink], threading.Condition())
    end = time.monotonic() + 1.0
    while time.monotonic() < end:  # nobody listening: connection refused, retried with backoff
        runner.pump()
        time.sleep(0.02)
    assert sink.outbox_depth() == len(events)
    assert sink.failed_attempts >= 3
    assert "ConnectError" in (sink.last_error or "")
    recv = Receiver(port=port)
    try:
        assert drain(runner, sink)
        keys = check_delivery(recv.requests, events)
        assert len(keys) == len(events)  # nothing reached the receiver while it was down
    finally:
        recv.stop()


def test_agent_restart_between_loses_nothing_and_duplicates_only_by_key(tmp_path):
    """Agent 1 delivers part of the log; one request is processed by the receiver but its answer is
    lost (timeout); agent 1 stops with the receiver down; agent 2 on the same state directory
    delivers the rest once the receiver is back, the unacknowledged one again under the same key."""
    port = free_port()
    recv = Receiver(port=port)
    cfg = dict(**{"watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"), "output.stdout": False,
                  "webhook.url": f"http://127.0.0.1:{port}/h", "webhook.secret": SECRET, "webhook.backoff_initial_s": 0.05,
                  "webhook.backoff_max_s": 0.2, "webhook.connect_timeout_s": 0.5, "webhook.read_timeout_s": 0.4})
    events = make_events(n_exams=2, per_exam=5)
    first, rest = events[:4], events[4:]
    recv.stall_keys = {first[2].key}
    recv.stall_s = 1.0
    agent = Agent(load_config(**cfg)).start()
    try:
        for ev in first:
            with agent.store.transaction():
                ev.seq = agent.store.append_event(ev)
            with agent.pipeline.new_events:
                agent.pipeline.new_events.notify_all()
        end = time.monotonic() + 15
        while agent.webhook.outbox_depth() and time.monotonic() < end:
            time.sleep(0.05)
        assert agent.webhook.outbox_depth() == 0
        assert agent.webhook.failed_attempts >= 1  # the stalled answer timed out and was retried
        recv.stop()  # receiver goes down; more events are decided meanwhile
        for ev in rest[:3]:
            with agent.store.transaction():
                ev.seq = agent.store.append_event(ev)
        time.sleep(0.3)
    finally:
        agent.stop()
    agent2 = Agent(load_config(**cfg))
    try:
        assert agent2.webhook.outbox_depth() == 3  # survived the restart in the state database
        for ev in rest[3:]:
            with agent2.store.transaction():
                ev.seq = agent2.store.append_event(ev)
        recv2 = Receiver(port=port)
        agent2.start()
        end = time.monotonic() + 15
        while agent2.webhook.outbox_depth() and time.monotonic() < end:
            time.sleep(0.05)
        assert agent2.webhook.outbox_depth() == 0
    finally:
        agent2.stop()
        recv2.stop()
    requests = recv.requests + recv2.requests
    keys = check_delivery(requests, events)
    dup = [k for k in set(keys) if keys.count(k) > 1]
    assert dup == [first[2].key], "only the event whose answer was lost is sent twice"


def test_permanent_4xx_is_recorded_and_skipped_but_401_retries(store):
    recv = Receiver()
    try:
        events = make_events(n_exams=1, per_exam=4)
        for ev in events:
            ev.seq = store.append_event(ev)
        recv.status_for = {events[1].key: 422, events[2].key: 401}
        sink = WebhookSink(webhook_config(recv.url), store, rng=random.Random(3))
        runner = SinkRunner(store, [sink], threading.Condition())
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            runner.pump()
            time.sleep(0.02)
        # 422: dead letter, skipped; 401: held (a configuration error), so event 3 is not sent yet
        dead = store.dead_letters("webhook")
        assert [(r["seq"], r["key"], r["reason"]) for r in dead] == [(events[1].seq, events[1].key, "HTTP 422")]
        assert sink.outbox_depth() == 2
        sent = [r["headers"]["Idempotency-Key"] for r in recv.requests]
        assert events[3].key not in sent and sent.count(events[2].key) >= 2
        recv.status_for.pop(events[2].key)  # the receiver's credentials are fixed
        assert drain(runner, sink)
        sent = [r["headers"]["Idempotency-Key"] for r in recv.requests]
        assert sent[-2:] == [events[2].key, events[3].key]
        assert sent.count(events[1].key) == 1
    finally:
        recv.stop()


def test_event_type_filter_skips_without_sending(store):
    recv = Receiver()
    try:
        events = make_events(n_exams=1, per_exam=3) + [SeriesReopened(key="reopen:1", series_uid="1.2.3", revision=2, late_images=1)]
        for ev in events:
            ev.seq = store.append_event(ev)
        sink = WebhookSink(webhook_config(recv.url, event_types=["exam_completed"]), store)
        runner = SinkRunner(store, [sink], threading.Condition())
        assert drain(runner, sink)
        assert [json.loads(r["body"])["type"] for r in recv.requests] == ["exam_completed"]
        assert sink.skipped == 3
    finally:
        recv.stop()


def test_unsigned_when_no_secret(store):
    recv = Receiver()
    try:
        ev = make_events(n_exams=1, per_exam=1)[0]
        ev.seq = store.append_event(ev)
        cfg = load_config(**{"webhook.url": recv.url}).webhook
        sink = WebhookSink(cfg, store)
        assert drain(SinkRunner(store, [sink], threading.Condition()), sink)
        h = recv.requests[0]["headers"]
        assert "webhook-signature" not in {k.lower() for k in h} and h["Idempotency-Key"] == ev.key
    finally:
        recv.stop()


def test_backoff_grows_bounded_with_jitter():
    b = Backoff(0.5, 8.0, jitter=0.5, rng=random.Random(7))
    delays = [b.next() for _ in range(10)]
    for n, d in enumerate(delays):
        cap = min(8.0, 0.5 * 2 ** n)
        assert cap * 0.5 <= d <= cap
    assert len({round(d, 6) for d in delays[5:]}) > 1, "jitter spreads retries at the cap"
    b.reset()
    assert b.next() <= 0.5
    b0 = Backoff(1.0, 4.0, jitter=0.0)
    assert [b0.next() for _ in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_retry_after_and_signature_helpers():
    assert retry_after_s("7") == 7.0
    assert retry_after_s("garbage") is None and retry_after_s(None) is None
    assert 29 <= retry_after_s("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) <= 31
    body = b'{"a":1}'
    sig = sign("plain-secret", "k1", 1700000000, body)
    assert verify("plain-secret", {"webhook-id": "k1", "webhook-timestamp": "1700000000", "webhook-signature": sig}, body, now=1700000010)
    assert not verify("plain-secret", {"webhook-id": "k1", "webhook-timestamp": "1700000000", "webhook-signature": sig}, body + b" ", now=1700000010)
    assert not verify("plain-secret", {"webhook-id": "k1", "webhook-timestamp": "1700000000", "webhook-signature": sig}, body, now=1700009999)
