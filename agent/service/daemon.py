"""The agent: watcher + ingest worker + event sinks around one state database.

Also the in-process embedding API: `Agent(config).start()`, `agent.subscribe(fn)`, `agent.stop()`.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Optional

from scanside.agent.analysis.adapt_schedule import AdaptScheduler
from scanside.agent.analysis.analysis import Analyzer
from scanside.agent.service.api import ApiServer
from scanside.agent.runtime.config import AgentConfig
from scanside.agent.intake.cstore import StoreSCP, build_receiver
from scanside.agent.outputs.dicom_out import DicomSink
from scanside.agent.schema.events import Event
from scanside.agent.runtime.health import WriteHealth
from scanside.agent.intake.ingest import Ingestor
from scanside.agent.runtime.lifecycle import Step, Supervisor
from scanside.agent.service.metrics import AgentMetrics
from scanside.agent.analysis.model_store import open_model_store
from scanside.agent.intake.pipeline import Pipeline
from scanside.agent.analysis.model_store import gland_model_active
from scanside.agent.outputs.redact import install as redact_install
from scanside.agent.state.retention import Retention
from scanside.agent.outputs.sinks import CallbackSink, JsonlSink, Sink, SinkRunner, StdoutSink
from scanside.agent.state.database import StateStore
from scanside.agent.intake.watch import FolderWatcher
from scanside.agent.outputs.webhook import WebhookSink

log = logging.getLogger(__name__)


class Agent:
    """The composition root: every part is built here, with its dependencies passed to its constructor,
    and registered with one Supervisor in start order (scanside.agent.runtime.lifecycle)."""

    def __init__(self, config: AgentConfig):
        if config.watch.folder is None:
            raise ValueError("watch.folder is not set")
        self.config = config
        self.folder = Path(config.watch.folder)
        config.state.dir.mkdir(parents=True, exist_ok=True)
        self.write_health = WriteHealth()  # last write outcome per output folder: /readyz "writes", metrics
        self.store = StateStore(config.db_path, open_check_s=config.state.open_check_s)
        self.pipeline = Pipeline(config, self.store, health=self.write_health,
                                 gland_coverage=gland_model_active(config))
        self.ingestor = Ingestor(config, self.pipeline, health=self.write_health)
        # Prometheus registry: pipeline hook, event subscriber and live gauges (read at scrape time)
        self.metrics = AgentMetrics()
        self.model_store = open_model_store(config)
        self.analyzer = Analyzer(config, self.store, self.pipeline.new_events, metrics=self.metrics,
                                 model_store=self.model_store)
        sinks: list[Sink] = [JsonlSink(config.jsonl_path, health=self.write_health)]
        if config.output.stdout:
            sinks.append(StdoutSink())
        self.sinks = SinkRunner(self.store, sinks, self.pipeline.new_events, name="events")
        # network and DICOM outputs each deliver from their own cursor in a thread of their own, so a
        # receiver that is down holds back neither the event log nor the console
        self.output_runners: list[SinkRunner] = []
        self.webhook: Optional[WebhookSink] = None
        if config.webhook.url:
            self.webhook = WebhookSink(config.webhook, self.store)
            self.output_runners.append(SinkRunner(self.store, [self.webhook], self.pipeline.new_events, name="webhook"))
        self.dicom_output: Optional[DicomSink] = None
        if config.dicom_output.folder is not None:
            self.dicom_output = DicomSink.from_config(config, self.store, health=self.write_health)
            self.output_runners.append(SinkRunner(self.store, [self.dicom_output], self.pipeline.new_events, name="dicom"))
        # the image models run from their own cursor in their own thread: ingestion never waits for them
        self.output_runners.append(SinkRunner(self.store, [self.analyzer], self.pipeline.new_events, name="analysis"))
        # retention keeps what any durable output has not delivered yet (its cursor in the store)
        durable = [s.name for r in [self.sinks, *self.output_runners] if r.persistent
                   for s in r.sinks if not isinstance(s, CallbackSink)]
        self.retention = Retention(config, self.store, durable)
        self.watcher = FolderWatcher(self.folder, self.ingestor, config.watch.recursive, config.watch.polling,
                                     config.watch.poll_interval_s)
        self.receiver: Optional[StoreSCP] = None
        if config.cstore.enabled:
            self.receiver = build_receiver(config, self.ingestor, health=self.write_health)
        self._subscribers = 0
        self.started = threading.Event()
        self.metrics.attach(self)
        # [adapt] (off by default): site adaptation in a child process; a promoted version is loaded next series
        self.adapt = AdaptScheduler(config, lambda: len(self.store.exams()), lambda _r: self.analyzer.reload_classifier())
        self.api: Optional[ApiServer] = None  # scanside.agent.service.api.ApiServer when [api] enabled, or start_api()
        self._unredact: Optional[Callable[[], None]] = None
        self.supervisor = self._supervise()

    def _supervise(self) -> Supervisor:
        """Start order. Watch first, then catch up: a file landing in between is seen twice, which is
        harmless. The ingest worker starts only after the catch-up is queued: its first tick would
        otherwise judge quiet periods before the backlog is known, and close series whose files are
        waiting (time the agent was down or loading models is not quiet on the scanner's side)."""
        sup = Supervisor()
        sup.add(self.sinks)
        for runner in self.output_runners:
            sup.add(runner)
        sup.add(self.watcher)
        sup.add(Step("catch-up", self._catch_up))
        sup.add(self.ingestor, stall_after_s=self.config.ingest.stall_after_s)
        if self.receiver is not None:
            sup.add(self.receiver)
        if self.config.retention.enabled:
            sup.add(self.retention)
        if self.config.api.enabled:
            self.api = ApiServer(self)
            sup.add(self.api)
        sup.add(self.adapt)
        return sup

    def _catch_up(self) -> None:
        self.ingestor.catch_up(self.folder)
        if self.receiver is not None:
            self.receiver.catch_up()

    def start(self) -> "Agent":
        if not self.config.privacy.include_file_paths and self._unredact is None:
            self._unredact = redact_install([self.folder])  # no export path in any log record (scanside.agent.outputs.redact)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.analyzer.ready()  # load the models now: READY=1 (systemd) means engines are loaded
        try:
            self.supervisor.start()
        except BaseException:
            self._close()
            raise
        self.started.set()
        return self

    def start_api(self) -> str:
        """Serve the HTTP API, /metrics and the console ([api] host/port) beside the running agent; returns
        its URL. A port that is taken raises and leaves the agent running (the demo then tries port 0)."""
        if self.api is None or not self.api.alive():
            api = ApiServer(self)
            self.supervisor.start_one(api)
            self.api = api
        return self.api.url

    @property
    def api_url(self) -> Optional[str]:
        return self.api.url if self.api is not None and self.api.alive() else None

    def subscribe(self, fn: Callable[[Event], None], from_now: bool = True) -> None:
        """Call fn for each event (in the sink thread). from_now=False replays the whole log first."""
        self._subscribers += 1
        self.sinks.add(CallbackSink(f"callback-{self._subscribers}", fn), from_now=from_now)

    def stop(self) -> None:
        self.supervisor.stop()  # reverse start order
        self._close()

    def _close(self) -> None:
        self.store.close()
        if self._unredact is not None:
            self._unredact()
            self._unredact = None

    def engines_ready(self) -> bool:
        """Readiness: every enabled model that is in the store has loaded (loads them on first call)."""
        return self.analyzer.ready()

    def healthy(self) -> bool:
        """The watchdog's test: every started component alive and none stalled (the ingest loop beats), and
        the state database sound. A database found corrupt while running stops the pings, so systemd
        restarts the agent, which then refuses to start with a message naming the file (scanside.agent.state.database.StateError)."""
        return self.supervisor.healthy() and self.store.corrupt is None

    def __enter__(self) -> "Agent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
