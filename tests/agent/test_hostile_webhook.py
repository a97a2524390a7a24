"""Webhook receivers that misbehave (issue 20, finding 9), as real sockets on 127.0.0.1: one trickling a
header byte every second, one answering 512 MiB, one redirecting. Each delivery is bounded in time and
memory, redirects are not followed, and stopping the agent does not wait for a receiver."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from scanside.agent.outputs.sinks import RetryLater, SinkRunner
from scanside.agent.state.database import StateStore
from scanside.agent.outputs.webhook import WebhookSink

from .test_hostile_api import recv_head
from .test_webhook import make_events, webhook_config


class RawServer:
    """Accepts connections and runs `answer(conn)` for each, after reading the request head and body."""

    def __init__(self, answer):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.answer = answer
        self.requests = 0
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = recv_head(conn)
            if b"\r\n\r\n" not in data:
                return
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            self.requests += 1
            try:
                self.answer(conn)
            except OSError:
                pass

    def stop(self) -> None:
        self.closed.set()
        self.sock.close()


def _trickle(conn: socket.socket) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
        conn.sendall(bytes([byte]))
        time.sleep(0.5)


def _huge(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % (512 * 1024**2))
    block = b"x" * (1024 * 1024)
    for _ in range(512):
        conn.sendall(block)


def _redirect(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def store(tmp_path):
    s = StateStore(tmp_path / "state.sqlite")
    with s.transaction():
        for ev in make_events(1, 2):
            s.append_event(ev)
    yield s
    s.close()


def _rss() -> int:
    with open("/proc/self/status") as fp:
        return next(int(line.split()[1]) * 1024 for line in fp if line.startswith("VmRSS:"))


def test_a_trickling_receiver_is_cut_off_at_the_total_timeout(store):
    server = RawServer(_trickle)
    sink = WebhookSink(webhook_config(server.url, total_timeout_s=2.0, read_timeout_s=5.0), store)
    try:
        event = store.events_after(0)[0]
        start = time.monotonic()
        with pytest.raises(RetryLater) as err:
            sink.deliver(event)
        assert time.monotonic() - start < 4.0 and "within 2.0 s" in str(err.value)
    finally:
        sink.close()
        server.stop()


def test_stopping_does_not_wait_for_a_trickling_receiver(store):
    server = RawServer(_trickle)
    sink = WebhookSink(webhook_config(server.url, total_timeout_s=600.0, read_timeout_s=600.0), store)
    runner = SinkRunner(store, [sink], threading.Condition())
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while server.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.requests == 1
        start = time.monotonic()
        runner.stop()  # SIGTERM path: the delivery in flight is interrupted, the event stays in the outbox
        assert time.monotonic() - start < 3.0
        assert sink.outbox_depth() == 2
    finally:
        server.stop()


def test_a_huge_answer_is_not_read(store):
    server = RawServer(_huge)
    sink = WebhookSink(webhook_config(server.url, total_timeout_s=20.0), store)
    try:
        before = _rss()
        sink.deliver(store.events_after(0)[0])  # 400: permanent, dead-lettered with the first bytes only
        assert _rss() - before < 64 * 1024**2
        (dead,) = store.dead_letters("webhook")
        assert dead["reason"] == "HTTP 400" and len(dead["detail"]) <= 500
    finally:
        sink.close()
        server.stop()


def test_a_redirect_is_not_followed_and_the_event_is_held(store, caplog):
    server = RawServer(_redirect)
    sink = WebhookSink(webhook_config(server.url), store)
    runner = SinkRunner(store, [sink], threading.Condition())
    try:
        for _ in range(3):
            runner._backoff.clear()
            runner.pump()
        assert server.requests == 3 and sink.delivered == 0 and sink.outbox_depth() == 2
        assert not store.dead_letters("webhook")
        assert "redirect" in (sink.last_error or "")
        assert sum("redirects are not followed" in r.getMessage() for r in caplog.records) == 1  # once, not per retry
    finally:
        sink.close()
        server.stop()
