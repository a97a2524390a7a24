"""Webhook output: each event POSTed as JSON to one URL, from the event log (the outbox).

Delivery is at least once: the sink's cursor in the state database advances only after the receiver
answered 2xx, so an event in flight when the agent stops is sent again after the restart, with the
same ``Idempotency-Key`` (the event key) for the receiver to de-duplicate on. Events go one at a time
in log order, so the order within an exam (and overall) is the order the agent decided them.

Failures (one retry policy for every output, scanside.agent.outputs.retry):
- connection errors, timeouts, 5xx, 408, 425, 429 and the configuration errors 401/403/404 are
  transient: the same event is retried with exponential backoff and jitter (bounded by
  ``backoff_max_s``; a ``Retry-After`` from the receiver is honoured within that bound), at most
  ``max_attempts`` times (about 4 hours with the defaults). Holding the line keeps the order and loses
  nothing while the receiver is down or misconfigured for a while; an event still refused after that
  becomes a dead letter, so no event is retried forever;
- any other 4xx (400, 409, 413, 415, 422, ...) is permanent for that event: the receiver rejected the
  payload itself and would reject it again, so retrying would block every later event. It is
  recorded in the state database (``dead_letters``), logged, and skipped at once.

Bounds: one delivery takes at most ``total_timeout_s`` from connect to the last byte (httpx's timeouts
are per operation, so a receiver sending one header byte every few seconds would otherwise hold the
sink for ever: a timer closes the connection), at most ``max_response_bytes`` of the answer is read,
and redirects are not followed: a 3xx is a configuration error (webhook.url should be the final URL),
held and retried like 401/403/404, with an ERROR that says so. Stopping the agent interrupts a
delivery in flight (the event is sent again after the restart).

Signing (optional, ``webhook.secret``): the Standard Webhooks scheme (https://www.standardwebhooks.com):
``webhook-id`` (the event key), ``webhook-timestamp`` (Unix seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``; a secret written
``whsec_<base64>`` is base64-decoded, any other secret is used as its UTF-8 bytes.

Events carry no patient identifiers (scanside.agent.schema.events), so neither does the webhook.
"""
from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import logging
import random
import threading
import time
from typing import Mapping, Optional

import httpx

from scanside.agent.runtime.config import WebhookConfig
from scanside.agent.schema.events import Event
from scanside.agent.outputs.retry import Backoff, DeadLetterStore, OutputRetry, RetryPolicy
from scanside.agent.outputs.sinks import RetryLater, Sink
from scanside.agent.state.database import StateStore

__all__ = ["Backoff", "WebhookSink", "retry_after_s", "sign", "verify"]  # Backoff: scanside.agent.outputs.retry, kept importable here

log = logging.getLogger(__name__)

USER_AGENT = "scanside-webhook/1"
# transient although 4xx: request timeout, too early, rate limited, and configuration errors that
# would otherwise dead-letter every event until an operator fixed the URL or the secret
RETRY_4XX = frozenset({401, 403, 404, 408, 425, 429})


def secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_"):])
    return secret.encode("utf-8")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks v1 signature header value."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float = 300.0,
           now: Optional[float] = None) -> bool:
    """Receiver side check (for integrators and tests): signature valid and timestamp recent."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, ts = lower["webhook-id"], int(lower["webhook-timestamp"])
        given = lower["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    want = sign(secret, msg_id, ts, body)
    return any(hmac.compare_digest(want, g) for g in given)


def retry_after_s(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class WebhookSink(Sink):
    """POST one event per request. Deliver it through a SinkRunner: its cursor is the outbox."""

    def __init__(self, config: WebhookConfig, store: StateStore, *, name: str = "webhook",
                 transport: Optional[httpx.BaseTransport] = None, rng: Optional[random.Random] = None,
                 dead_letters: Optional[DeadLetterStore] = None):
        if config.url is None:
            raise ValueError("webhook.url is not set")
        self.name = name
        self.config = config
        self.store = store
        self.url = str(config.url)
        self._secret = config.secret.get_secret_value() if config.secret is not None else None
        self._types = frozenset(config.event_types)
        self.retry = OutputRetry(name, RetryPolicy(config.backoff_initial_s, config.backoff_max_s, config.backoff_jitter,
                                                   config.max_attempts), dead_letters or store, rng)
        self._transport = transport
        self._client = self._new_client()
        self._lock = threading.Lock()
        self._closing = False
        self.delivered = 0
        self.skipped = 0

    def _new_client(self) -> httpx.Client:
        timeout = httpx.Timeout(self.config.read_timeout_s, connect=self.config.connect_timeout_s)
        return httpx.Client(timeout=timeout, transport=self._transport, follow_redirects=False,
                            headers={"User-Agent": USER_AGENT})

    # ------------------------------------------------------------------ metrics
    @property
    def failed_attempts(self) -> int:
        return self.retry.failed_attempts

    @property
    def dead_lettered(self) -> int:
        return self.retry.dead_lettered

    @property
    def last_error(self) -> Optional[str]:
        return self.retry.last_error

    def outbox_depth(self) -> int:
        """Events decided but not yet acknowledged by the receiver (or skipped by the type filter)."""
        return max(0, self.store.last_event_seq() - self.store.cursor(self.name))

    def stats(self) -> dict[str, object]:
        return {"outbox_depth": self.outbox_depth(), "delivered_total": self.delivered,
                "failed_attempts_total": self.failed_attempts, "dead_letters_total": self.dead_lettered,
                "filtered_total": self.skipped, "last_error": self.last_error}

    # ------------------------------------------------------------------ delivery
    def headers_for(self, event: Event, body: bytes, now: Optional[float] = None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Idempotency-Key": event.key,
                   "X-Scanside-Event-Type": event.type, "X-Scanside-Event-Seq": str(event.seq or 0)}
        if self._secret is not None:
            ts = int(time.time() if now is None else now)
            headers["webhook-id"] = event.key
            headers["webhook-timestamp"] = str(ts)
            headers["webhook-signature"] = sign(self._secret, event.key, ts, body)
        return headers

    def deliver(self, event: Event) -> None:
        if self._types and event.type not in self._types:
            self.skipped += 1
            return
        body = event.model_dump_json().encode("utf-8")
        if self._closing:
            raise RetryLater("stopping", 1.0)
        with self._lock:
            client = self._client
            # the total bound: closing the client from a timer ends a read blocked on a trickling receiver
            timer = threading.Timer(self.config.total_timeout_s, client.close)
            timer.daemon = True
            timer.start()
            try:
                with client.stream("POST", self.url, content=body, headers=self.headers_for(event, body)) as resp:
                    status = resp.status_code
                    detail = self._read_some(resp) if 400 <= status < 500 else ""
            except (httpx.HTTPError, RuntimeError) as exc:  # timeouts, refused, reset, DNS; closed under us
                reason = f"{type(exc).__name__}: {exc}"
                if client.is_closed:
                    self._client = self._new_client()
                    reason = "stopping" if self._closing else f"no complete answer within {self.config.total_timeout_s} s"
                if self._closing:  # stopping is not a failed attempt: the event is sent after the restart
                    raise RetryLater("stopping", 1.0) from exc
                self.retry.transient(event, reason, None, stage="connection")
                return
            finally:
                timer.cancel()
            if 200 <= status < 300:
                self.delivered += 1
                self.retry.succeeded()
                return
            if 400 <= status < 500 and status not in RETRY_4XX:
                log.error("webhook: receiver rejected event seq %s (%s) with HTTP %d", event.seq, event.type, status)
                self.retry.permanent(event, f"HTTP {status}", detail)
                return
            if 300 <= status < 400:
                if not (self.last_error or "").startswith(f"HTTP {status}"):
                    log.error("webhook: the receiver answers HTTP %d (a redirect); redirects are not followed: set "
                              "webhook.url to the final URL. Events are held and retried meanwhile", status)
                self.retry.transient(event, f"HTTP {status} redirect (not followed)", None, stage=f"HTTP {status}")
                return
            self.retry.transient(event, f"HTTP {status}", retry_after_s(resp.headers.get("Retry-After")),
                                 stage=f"HTTP {status}")

    def _read_some(self, resp: httpx.Response) -> str:
        """At most max_response_bytes of the answer (for the dead-letter record); the rest is never read."""
        cap = self.config.max_response_bytes
        got = b""
        for chunk in resp.iter_raw():
            got += chunk[: cap - len(got)]
            if len(got) >= cap:
                break
        return got[:500].decode("utf-8", "replace")

    def interrupt(self) -> None:
        self._closing = True
        self._client.close()  # a delivery in flight fails now; the event stays in the outbox

    def close(self) -> None:
        self._closing = True
        self._client.close()
