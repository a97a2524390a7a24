"""One retry policy for every output (daemon / outputs layer): the webhook, the DICOM output (SR/SEG
written to a folder, C-STOREd to a PACS) and the event log.

An output delivers one event at a time from its cursor (scanside.agent.outputs.sinks.SinkRunner). For each failure it
tells its `OutputRetry` whether the failure is

- transient (no connection, timeout, 5xx, a full disk...): the same event is tried again after an
  exponential backoff with jitter, at most `max_attempts` times; then it becomes a dead letter;
- permanent (the receiver rejected the payload itself, the object cannot be built): a dead letter at once.

A dead letter is recorded in the state database (`dead_letters`: output, event seq and key, reason,
detail), logged at ERROR, and skipped: the output goes on with the next event, so one bad event never
blocks the ones after it, and nothing is retried forever. The one exception is the local event log
(scanside.agent.outputs.sinks.JsonlSink): it is the record itself, so it keeps retrying (same backoff, unbounded) while
/readyz and scanside_write_failing say that its disk is failing. `scanside_output_dead_letters_total{output}`
counts them (scanside.agent.service.metrics, read from the state database at scrape time).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Optional, Protocol

from pydantic import BaseModel

from scanside.agent.schema.events import Event

log = logging.getLogger(__name__)


class RetryLater(Exception):
    """Raised by a sink for a transient failure: the runner retries the same event after retry_after_s."""

    def __init__(self, reason: str, retry_after_s: float):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class DeadLetterStore(Protocol):
    """Where dead letters are recorded (scanside.agent.state.database.StateStore)."""

    def record_dead_letter(self, sink: str, seq: int, key: str, reason: str, detail: str = "") -> None: ...


class DeadLetter(BaseModel):
    """One event an output gave up on (GET /v1/dead-letters): no patient data, the event key and seq only."""

    output: str
    seq: int
    key: str
    reason: str
    detail: str
    created: float  # time.time() when it was given up on


class Backoff:
    """Exponential backoff with jitter: attempt n waits initial * 2**n, capped at maximum, scaled by a
    random factor in [1 - jitter, 1] so that many agents behind one receiver do not retry in step."""

    def __init__(self, initial_s: float, maximum_s: float, jitter: float = 0.5, rng: Optional[random.Random] = None):
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.attempt = 0

    def next(self) -> float:
        base = min(self.maximum_s, self.initial_s * (2.0 ** min(self.attempt, 62)))
        self.attempt += 1
        return base * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class RetryPolicy:
    """initial_s doubles per failed attempt up to max_s (jittered); max_attempts failed attempts on one
    event make it a dead letter (None: unbounded, only for the local event log; see scanside.agent.outputs.sinks)."""

    initial_s: float = 1.0
    max_s: float = 300.0
    jitter: float = 0.5
    max_attempts: Optional[int] = 10

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s <= 0:
            raise ValueError("retry delays must be positive")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


class OutputRetry:
    """The retry state of one output: failed attempts on the event in hand, totals, dead letters."""

    def __init__(self, output: str, policy: RetryPolicy, dead_letters: DeadLetterStore,
                 rng: Optional[random.Random] = None):
        self.output = output
        self.policy = policy
        self.dead_letters = dead_letters
        self.backoff = Backoff(policy.initial_s, policy.max_s, policy.jitter, rng)
        self.failed_attempts = 0  # every failed attempt since start (scanside_delivery_failures_total)
        self.dead_lettered = 0
        self.last_error: Optional[str] = None

    @property
    def attempt(self) -> int:
        """Failed attempts on the event in hand."""
        return self.backoff.attempt

    def transient(self, event: Event, reason: str, hint_s: Optional[float] = None, stage: str = "transient") -> None:
        """A failure that may pass: raises RetryLater with the backoff delay (a receiver's hint, such as
        Retry-After, is honoured within max_s), or, when the attempts are spent, records a dead letter
        and returns (the runner moves on to the next event)."""
        self.failed_attempts += 1
        self.last_error = reason
        limit = self.policy.max_attempts
        if limit is not None and self.backoff.attempt + 1 >= limit:
            self.dead_letter(event, stage, f"gave up after {limit} attempt(s): {reason}")
            return
        delay = self.backoff.next()
        if hint_s is not None:
            delay = min(max(delay, hint_s), self.policy.max_s)
        log.warning("%s: event seq %s not delivered (%s); attempt %d%s, retrying in %.1f s", self.output, event.seq,
                    reason, self.backoff.attempt, f" of {limit}" if limit else "", delay)
        raise RetryLater(reason, delay)

    def permanent(self, event: Event, stage: str, detail: str) -> None:
        """A failure that will not pass: a dead letter now."""
        self.failed_attempts += 1
        self.dead_letter(event, stage, detail)

    def dead_letter(self, event: Event, reason: str, detail: str) -> None:
        self.dead_lettered += 1
        self.backoff.reset()
        self.last_error = f"{reason}: {detail}"
        log.error("%s: event seq %s (%s) is a dead letter (%s: %s): recorded in the state database and skipped",
                  self.output, event.seq, event.type, reason, detail[:300])
        self.dead_letters.record_dead_letter(self.output, event.seq or 0, event.key, reason, detail[:500])

    def succeeded(self) -> None:
        self.backoff.reset()
        self.last_error = None
