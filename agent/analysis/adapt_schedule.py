"""Scheduled site adaptation of the sequence classifier ([adapt], off by default).

Every ``interval_hours``, once at least ``min_new_exams`` exams have been seen since the last run, the
agent runs `scanside models adapt sequence-classifier --from-state <its state dir>` in a child process
at low CPU priority (torch stays out of the daemon; a crash there cannot take the agent down). The
command promotes a new version into the user model store only if it beats the current one on the
site's held-out exams (scanside.training.sequence.adapt); when it does, the analyzer reloads the classifier
so the next series uses it. Every run is logged with its decision; nothing else changes.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable, List, Optional

from scanside.agent.runtime.lifecycle import Worker, WorkerThread

log = logging.getLogger(__name__)


def adapt_command(config: Any) -> List[str]:
    a = config.adapt
    cmd = [sys.executable, "-m", "scanside.agent.cli", "models"]
    if a.user_dir is not None:
        cmd += ["--user-dir", str(a.user_dir)]
    return cmd + ["adapt", config.analysis.sequence_model.split("@")[0], "--from-state", str(config.state.dir),
                  "--threads", str(a.threads), "--json"]


class AdaptScheduler(Worker):
    def __init__(self, config: Any, exam_count: Callable[[], int], on_promoted: Callable[[dict], None],
                 command: Optional[List[str]] = None) -> None:
        self.config = config
        self.exam_count = exam_count
        self.on_promoted = on_promoted
        self.command = command or adapt_command(config)
        self.worker = WorkerThread("adapt-schedule", self._loop)
        self._exams_at_last_run = 0
        self.last: Optional[dict] = None

    name = "adapt"

    def start(self) -> "AdaptScheduler":
        if self.config.adapt.enabled:
            self.worker.start()
        return self

    def alive(self) -> bool:
        """Off ([adapt] enabled false) is not dead: only a started scheduler can die."""
        return self.worker.alive() or not self.worker.started

    @property
    def running(self) -> bool:
        return self.worker.alive()

    def _loop(self, stop: threading.Event) -> None:
        interval = self.config.adapt.interval_hours * 3600.0
        while not stop.wait(interval):
            self.run_if_due()

    def run_if_due(self) -> Optional[dict]:
        """Run once when enough new exams are in; the parsed JSON summary (or an error record)."""
        n = self.exam_count()
        if n - self._exams_at_last_run < self.config.adapt.min_new_exams:
            return None
        self._exams_at_last_run = n
        t0 = time.time()
        env = child_environment(self.config)
        try:
            proc = subprocess.run(self.command, capture_output=True, text=True, env=env,
                                  timeout=self.config.adapt.timeout_s, preexec_fn=_lower_priority)
            out = proc.stdout.strip()
            result = json.loads(out[out.index("{"):]) if "{" in out else {"decision": "error", "reason": proc.stderr[-300:]}
        except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
            result = {"decision": "error", "reason": f"{type(exc).__name__}: {exc}"[:300]}
        result["seconds"] = round(time.time() - t0, 1)
        self.last = result
        log.info("site adaptation: %s (%s)", result.get("decision"), result.get("reason") or result.get("written") or "")
        if result.get("decision") == "promoted":
            self.on_promoted(result)
        return result


def child_environment(config: Any) -> dict[str, str]:
    """The child's environment: this one, with the agent's configured model store folders (a [engines]
    models_dirs set in the file is otherwise unknown to `scanside models adapt`)."""
    env = dict(os.environ)
    if config.engines.models_dirs:
        env["SCANSIDE_MODELS_DIR"] = os.pathsep.join(str(p) for p in config.engines.models_dirs)
    return env


def _lower_priority() -> None:  # pragma: no cover - runs in the child
    try:
        os.nice(10)
    except OSError:
        pass
