"""Progress of the long commands (models evaluate, training, calibration, parity, TAPS import) on
stderr, so that a user can tell progress from a hang: a tqdm bar (count, rate, estimate) on a terminal,
plain lines when stderr is not one (a log file, CI, journald: no carriage returns), nothing with
`scanside --quiet` (or SCANSIDE_QUIET=1). Standard output stays for results (JSON, tables).

    for exam in progress(exams, desc="simulating", unit="exam"):
        ...
    with progress(total=n, desc="calibrating") as bar:
        bar.update(1)
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

from tqdm import tqdm

from scanside.agent.runtime.lifecycle import WorkerThread

_QUIET: Optional[bool] = None


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def quiet() -> bool:
    if _QUIET is not None:
        return _QUIET
    from scanside.agent.runtime.config import ToolSettings

    try:
        return ToolSettings().quiet
    except ValueError:  # SCANSIDE_QUIET=maybe: meters stay on, as before
        return False


class _Lines:
    """tqdm's meter as whole lines: at most one every `every_s` seconds (and at 25/50/75/100 %)."""

    def __init__(self, iterable: Optional[Iterable[Any]], total: Optional[float], desc: str, unit: str,
                 stream: TextIO, every_s: float = 30.0):
        self.iterable, self.desc, self.unit, self.stream, self.every_s = iterable, desc, unit, stream, every_s
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n = total, 0
        self.t0 = self._last = time.monotonic()
        self._quarter = 0
        self._closed = False
        self.postfix = ""
        self._line(force=True)

    def _line(self, force: bool = False) -> None:
        now = time.monotonic()
        quarter = int(4 * self.n / self.total) if self.total else 0
        if not force and now - self._last < self.every_s and quarter <= self._quarter:
            return
        self._last, self._quarter = now, max(self._quarter, quarter)
        meter = tqdm.format_meter(self.n, self.total, now - self.t0, prefix=self.desc, unit=self.unit, ncols=0,
                                  postfix=self.postfix or None)
        self.stream.write(meter.strip() + "\n")
        self.stream.flush()

    def update(self, n: float = 1) -> None:
        self.n += n
        self._line(force=self.total is not None and self.n >= self.total)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if not (self.total is not None and self.n >= self.total):
                self._line(force=True)

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "_Lines":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Optional[Iterable[Any]] = None, *, total: Optional[float] = None, desc: str = "",
             unit: str = "it", stream: Optional[TextIO] = None) -> Any:
    """A progress reporter over *iterable* (or for *total* steps with .update()): tqdm on a terminal,
    plain lines otherwise, silent when quiet. Iterate it, or use it as a context manager."""
    out = stream or sys.stderr
    if quiet():
        return tqdm(iterable, total=total, disable=True)
    if getattr(out, "isatty", lambda: False)():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=out, dynamic_ncols=True, mininterval=0.5)
    return _Lines(iterable, total, desc, unit, out)


def note(message: str) -> None:
    """One line of what a long step is doing (downloading, extracting ...), unless quiet."""
    if not quiet():
        print(message, file=sys.stderr, flush=True)


class Every:
    """Call fn every `seconds` in a daemon thread for the duration of a `with` block (progress of work
    that reports no steps of its own, read from a counter)."""

    def __init__(self, seconds: float, fn: Any):
        self.seconds, self.fn = seconds, fn
        self.worker = WorkerThread("scanside-progress", self._loop)

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.seconds):
            self.fn()

    def __enter__(self) -> "Every":
        self.worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()
