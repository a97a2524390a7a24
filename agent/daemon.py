"""The agent: watcher + ingest worker + event sinks around one state database.

Also the in-process embedding API: `Agent(config).start()`, `agent.subscribe(fn)`, `agent.stop()`.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from agent.config import AgentConfig
from agent.events import Event
from agent.ingest import Ingestor
from agent.pipeline import Pipeline
from agent.sinks import CallbackSink, JsonlSink, SinkRunner, StdoutSink
from agent.state import StateStore
from agent.watch import FolderWatcher

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig):
        if config.watch.folder is None:
            raise ValueError("watch.folder is not set")
        self.config = config
        config.state.dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(config.db_path)
        self.pipeline = Pipeline(config, self.store)
        self.ingestor = Ingestor(config, self.pipeline)
        from agent.health import WriteHealth

        self.write_health = WriteHealth()  # last write outcome per output folder: /readyz "writes", metrics
        self.pipeline.quarantine_box.health = self.write_health
        self.ingestor.health = self.write_health
        sinks = [JsonlSink(config.jsonl_path, health=self.write_health)]
        if config.output.stdout:
            sinks.append(StdoutSink())
        self.sinks = SinkRunner(self.store, sinks, self.pipeline.new_events)
        # network and DICOM outputs each deliver from their own cursor in a thread of their own, so a
        # receiver that is down holds back neither the event log nor the console
        self.output_runners: list[SinkRunner] = []
        self.webhook = None  # agent.webhook.WebhookSink when [webhook] url is set
        if config.webhook.url:
            from agent.webhook import WebhookSink

            self.webhook = WebhookSink(config.webhook, self.store)
            self.output_runners.append(SinkRunner(self.store, [self.webhook], self.pipeline.new_events))
        self.dicom_output = None  # agent.dicom_out.DicomSink when [dicom_output] folder is set
        if config.dicom_output.folder is not None:
            from agent.dicom_out import DicomSink

            self.dicom_output = DicomSink.from_config(config, self.store)
            self.dicom_output.health = self.write_health
            self.output_runners.append(SinkRunner(self.store, [self.dicom_output], self.pipeline.new_events))
        # the image models run from their own cursor in their own thread: ingestion never waits for them
        from agent.analysis import Analyzer

        self.analyzer = Analyzer(config, self.store, self.pipeline.new_events)
        self.output_runners.append(SinkRunner(self.store, [self.analyzer], self.pipeline.new_events))
        if self.pipeline.protocol is not None:  # the analyzer checks the gland's coverage: slab ends are its call
            from agent.protocol import gland_model_active

            self.pipeline.protocol.gland_coverage = gland_model_active(config)
        from agent.retention import Retention

        # retention keeps what any durable output has not delivered yet (its cursor in the store)
        durable = [s.name for r in [self.sinks, *self.output_runners] if r.persistent
                   for s in r.sinks if not isinstance(s, CallbackSink)]
        self.retention = Retention(config, self.store, durable)
        self.watcher: Optional[FolderWatcher] = None
        self.receiver = None  # agent.cstore.StoreSCP when [cstore] enabled
        if config.cstore.enabled:
            from agent.cstore import build_receiver

            self.receiver = build_receiver(config, self.ingestor)
            self.receiver.health = self.write_health
        self._subscribers = 0
        self.started = threading.Event()
        from agent.metrics import AgentMetrics

        self.metrics = AgentMetrics()  # Prometheus registry: pipeline hook + event subscriber + live gauges
        self.metrics.attach(self)
        self.analyzer.metrics = self.metrics
        self.api = None  # agent.api.ApiServer when [api] enabled
        from agent.adapt_schedule import AdaptScheduler

        # [adapt] (off by default): site adaptation in a child process; a promoted version is loaded next series
        self.adapt = AdaptScheduler(config, lambda: len(self.store.exams()), lambda _r: self.analyzer.reload_classifier())
        self._unredact: Optional[Callable[[], None]] = None

    def start(self) -> "Agent":
        folder = Path(self.config.watch.folder)  # type: ignore[arg-type]
        if not self.config.privacy.include_file_paths and self._unredact is None:
            from agent.redact import install

            self._unredact = install([folder])  # no export path in any log record (agent.redact)
        folder.mkdir(parents=True, exist_ok=True)
        self.analyzer.ready()  # load the models now: READY=1 (systemd) means engines are loaded
        self.sinks.start()
        for runner in self.output_runners:
            runner.start()
        # watch first, then catch up: a file landing in between is seen twice, which is harmless.
        # The ingest worker starts only after the catch-up is queued: its first tick would otherwise
        # judge quiet periods before the backlog is known, and close series whose files are waiting
        # (time the agent was down or loading models is not quiet on the scanner's side)
        self.watcher = FolderWatcher(folder, self.ingestor, self.config.watch.recursive,
                                     self.config.watch.polling, self.config.watch.poll_interval_s)
        self.watcher.start()
        self.ingestor.catch_up(folder)
        if self.receiver is not None:
            self.receiver.catch_up()
        self.ingestor.start()
        if self.receiver is not None:
            self.receiver.start()
        if self.config.retention.enabled:
            self.retention.start()
        if self.config.api.enabled:
            try:
                self.start_api()
            except Exception:
                self.stop()
                raise
        self.adapt.start()
        self.started.set()
        return self

    def start_api(self) -> str:
        """Serve the HTTP API, /metrics and the console ([api] host/port); returns its URL."""
        from agent.api import ApiServer

        if self.api is None:
            self.api = ApiServer(self).start()
        return self.api.url

    @property
    def api_url(self) -> Optional[str]:
        return self.api.url if self.api is not None else None

    def subscribe(self, fn: Callable[[Event], None], from_now: bool = True) -> None:
        """Call fn for each event (in the sink thread). from_now=False replays the whole log first."""
        self._subscribers += 1
        self.sinks.add(CallbackSink(f"callback-{self._subscribers}", fn), from_now=from_now)

    def stop(self) -> None:
        self.adapt.stop()
        if self.api is not None:
            api, self.api = self.api, None
            api.stop()
        if self.receiver is not None:
            self.receiver.stop()
        if self.watcher:
            self.watcher.stop()
        self.retention.stop()
        self.ingestor.stop()
        self.sinks.stop()
        for runner in self.output_runners:
            runner.stop()
        self.store.close()
        if self._unredact is not None:
            self._unredact()
            self._unredact = None

    def engines_ready(self) -> bool:
        """Readiness: every enabled model that is in the store has loaded (loads them on first call)."""
        return self.analyzer.ready()

    def healthy(self) -> bool:
        ingest_recent = time.time() - self.ingestor.last_loop < self.config.ingest.stall_after_s
        receiver_ok = self.receiver is None or self.receiver.alive()
        # a state database found corrupt while running: no watchdog pings, so systemd restarts the agent,
        # which then refuses to start with a message naming the file (agent.state.StateError)
        db_sound = getattr(self.store, "corrupt", None) is None
        return self.ingestor.alive() and ingest_recent and bool(self.watcher and self.watcher.alive()) and receiver_ok and db_sound

    def __enter__(self) -> "Agent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
