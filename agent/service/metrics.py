"""Prometheus metrics for the agent (design section 7: `scanside_` prefix, base units, counters end in
`_total`, bounded label values, never a patient identifier or a UID).

Three sources feed one registry per agent:
- the pipeline's outcome hook (`Pipeline.listeners`): files by outcome, quarantines and read errors by reason;
- the event log, through an in-process sink: series completed by label and vendor, completion latency,
  alerts by code and severity, exams, triage, acknowledgements, events by type;
- collectors that read the live state when scraped: ingest queue depth, open series, outbox depth and
  delivery failures per sink, free disk, engine info; plus build info and the process metrics.
Inference latency: `metrics.instrument(engine)` once after opening a model (engine info + every
`engine.run` timed), or `metrics.observe_inference(engine, seconds)` / `with metrics.time_inference(engine):`.
"""
from __future__ import annotations

import datetime as _dt
import logging
import platform
import shutil
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.gc_collector import GCCollector

from scanside.agent.state.alerts import alert_from_event, bounded_reason
from scanside.agent.schema.events import SCHEMA_VERSION, Event

if TYPE_CHECKING:  # pragma: no cover
    from scanside.agent.service.daemon import Agent
    from scanside.agent.intake.pipeline import Outcome

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300)
INFERENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
VENDORS = {"siemens", "ge", "philips", "canon", "toshiba", "hitachi", "fujifilm", "uih", "other"}
OUTCOMES = {"ingested", "duplicate", "ignored", "index", "skipped", "refused"}  # refused: FIFO, device, link out (scanside.agent.intake.ingest)
# reasons scanside.agent.dicom.header / scanside.agent.intake.ingest give a file they cannot take (HeaderError codes); anything else is "other"
FILE_REASONS = ("truncated", "not_dicom", "missing_uid", "unreadable", "oversized", "series_oversized",
                "no_pixel_data", "bad_transfer_syntax", "dicomdir", "too_complex", "vanished", "other")
EXAM_END_REASONS = ("quiet_period", "operator", "other")
TRIAGE_RECOMMENDATIONS = ("DCE_ADVISED", "BPMRI_SUFFICIENT", "other")
COMPLETION_BASES = ("expected_count", "quiet_period", "incomplete_grace")
SERIES_AGREE_KEPT = 10_000  # series whose label agreement is kept, for a revision of their label to replace it
MODEL_STAGES = ("load", "label", "gland", "triage")  # scanside.agent.analysis.analysis: where an image model failed
#: why a series could not be read as a volume (scanside.agent.dicom.volume.VolumeError,
#: scanside.agent.dicom.frames.FrameSelectionError reasons); anything else counts as `other`
UNUSABLE_REASONS = ("no_frames", "unreadable_file", "unreadable_header", "no_pixel_data", "unreadable_pixel_data",
                    "unsupported_pixels", "missing_geometry", "mixed_orientation", "mixed_size", "mixed_spacing",
                    "duplicate_position", "bad_frame_index", "bad_frames", "bad_mosaic", "oversized")
OUTPUTS = ("webhook", "dicom")  # outputs under the retry policy with dead letters (scanside.agent.outputs.retry)


def _sink_label(name: str) -> str:
    # in-process subscribers are numbered; one label for all of them keeps the set bounded
    return "callback" if name.startswith("callback-") else name[:32]


def _label(value: Any, allowed: Optional[set[str]] = None, default: str = "other") -> str:
    v = str(value or "").strip()
    if allowed is not None:
        return v if v in allowed else default
    return v[:48] if v else "none"


def _model_label(model_ref: str) -> str:
    """A model reference ("name/version" or "name@version") as a metric label: its name."""
    return _label(model_ref.split("/")[0].split("@")[0])


class AgentMetrics:
    def __init__(self, agent: Optional["Agent"] = None, registry: Optional[CollectorRegistry] = None,
                 process: bool = True):
        disable_created_metrics()  # no *_created series: they double the exposition and nothing here reads them
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.agent = agent
        self._engines: dict[tuple[str, str, str, str], None] = {}
        self._lock = threading.Lock()
        r = self.registry
        self.files = Counter("scanside_files", "Files handled by the ingest pipeline, by outcome (quarantined counted apart)",
                             ["outcome"], registry=r)
        self.quarantined = Counter("scanside_files_quarantined", "Files quarantined, by reason", ["reason"], registry=r)
        self.read_errors = Counter("scanside_file_read_errors",
                                   "Failed reads of files not yet readable (retried before any quarantine), by reason",
                                   ["reason"], registry=r)
        self.series_completed = Counter("scanside_series_completed", "Logical series completed, by label and vendor",
                                        ["label", "vendor", "complete"], registry=r)
        self.series_reopened = Counter("scanside_series_reopened", "Series reopened by late images", registry=r)
        self.completion_latency = Histogram(
            "scanside_series_completion_latency_seconds",
            "Time from a series' last image being ingested to the agent announcing it complete, by how completion was decided",
            ["basis"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_latency = Histogram(
            "scanside_inference_latency_seconds", "Model inference time per call, by model, back end and precision",
            ["model", "backend", "precision"], buckets=INFERENCE_BUCKETS, registry=r)
        self.alerts = Counter("scanside_alerts", "Alerts raised to the technologist, by code and severity",
                              ["code", "severity"], registry=r)
        self.acks = Counter("scanside_alerts_acknowledged", "Alerts acknowledged", registry=r)
        self.exams = Counter("scanside_exams_completed", "Exams completed, by how the end was decided", ["reason"], registry=r)
        self.triage = Counter("scanside_triage_results", "csPCa triage results, by recommendation", ["recommendation"], registry=r)
        self.events = Counter("scanside_events", "Events recorded, by type", ["type"], registry=r)
        # image models against the site's reference (issue 18 shadow mode): since the agent started
        self.image_agreement = Gauge("scanside_image_agreement_ratio",
                                     "Share of image-model outputs that agree with the site's reference: the sequence "
                                     "classifier with the header labels, the csPCa model with its validated input range "
                                     "(assessed results), by model", ["model"], registry=r)
        self.image_shadow = Counter("scanside_image_shadow_results", "Image-model outputs recorded in shadow mode "
                                    "(no technologist alert), by model", ["model"], registry=r)
        self.image_uncertain = Counter("scanside_image_uncertain_results", "Image labels withheld as `uncertain` by the "
                                       "model's calibrated gate (low confidence or out of distribution), by model",
                                       ["model"], registry=r)
        self.model_failures = Counter("scanside_model_failures", "Image-model runs that failed (the series or exam goes "
                                      "on without that result; the reason is logged at ERROR), by stage", ["stage"], registry=r)
        for stage in MODEL_STAGES:
            self.model_failures.labels(stage)
        self.inputs_unusable = Counter("scanside_image_inputs_unusable", "Series the image models skipped because no "
                                       "volume can be made of them (no geometry, colour, clashing frames; logged at "
                                       "INFO), by stage and reason", ["stage", "reason"], registry=r)
        self._agreement: dict[str, list[int]] = {}  # model name -> [agreeing, total]
        self._series_agree: "OrderedDict[str, bool]" = OrderedDict()  # series_id -> does its latest label agree
        self._zero_known_label_sets()
        r.register(_StateCollector(self))
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    def _zero_known_label_sets(self) -> None:
        """Create every known label set at 0 (the client_python pattern): a series that first appears at
        its first increment hides that increment from increase()/rate(), so a one-off burst of 40
        quarantined files would never fire the quarantine alert (tests/agent/test_monitoring.py)."""
        from typing import get_args

        from scanside.agent.schema.events import Event as _Event
        from scanside.agent.schema.taxonomy import LABELS

        for outcome in (*sorted(OUTCOMES), "quarantined"):
            self.files.labels(outcome)
        for reason in FILE_REASONS:
            self.quarantined.labels(reason)
            self.read_errors.labels(reason)
        for label in LABELS:
            for vendor in sorted(VENDORS):
                for complete in ("true", "false"):
                    self.series_completed.labels(label, vendor, complete)
        for basis in COMPLETION_BASES:
            self.completion_latency.labels(basis)
        for reason in EXAM_END_REASONS:
            self.exams.labels(reason)
        for rec in TRIAGE_RECOMMENDATIONS:
            self.triage.labels(rec)
        union = get_args(get_args(_Event)[0])
        for cls in union:
            self.events.labels(cls.model_fields["type"].default)
        for code, severity in known_alerts():
            self.alerts.labels(code, severity)

    # ------------------------------------------------------------------ hooks
    def attach(self, agent: "Agent") -> None:
        """Wire into a (not yet started) agent: the pipeline hook and an event subscriber."""
        from scanside.agent.outputs.sinks import CallbackSink

        self.agent = agent
        agent.pipeline.listeners.append(self.on_outcome)
        agent.sinks.add(CallbackSink("metrics", self.on_event), from_now=True)

    def on_outcome(self, path: str, outcome: "Outcome") -> None:
        if outcome.status == "quarantined":
            self.files.labels("quarantined").inc()
            self.quarantined.labels(bounded_reason(outcome.error.reason if outcome.error else "")).inc()
        elif outcome.status == "error":
            self.read_errors.labels(bounded_reason(outcome.error.reason if outcome.error else "")).inc()
        else:
            self.files.labels(_label(outcome.status, OUTCOMES)).inc()

    def on_event(self, ev: Event) -> None:
        self.events.labels(_label(ev.type)).inc()
        if ev.type == "series_completed":
            s = ev.series
            self.series_completed.labels(s.label, _label(s.vendor, VENDORS), "true" if s.complete else "false").inc()
            self._observe_completion(ev)
        elif ev.type == "series_reopened":
            self.series_reopened.inc()
        elif ev.type == "exam_completed":
            self.exams.labels(_label(ev.reason, {"quiet_period", "operator"})).inc()
        elif ev.type == "triage_result":
            self.triage.labels(_label(ev.recommendation, {"DCE_ADVISED", "BPMRI_SUFFICIENT", "NOT_ASSESSED"})).inc()
            self._image_result(ev.model, ev.recommendation != "NOT_ASSESSED", ev.shadow)
        elif ev.type == "series_classified" and ev.revises:  # a series counts once, by its latest label
            self._image_revised(ev.model, ev.series_id, ev.agree)
        elif ev.type == "series_classified":
            self._image_result(ev.model, ev.agree, False, series_id=ev.series_id)
            if ev.image_label == "uncertain":
                self.image_uncertain.labels(_model_label(ev.model)).inc()
        elif ev.type == "label_mismatch" and ev.shadow:
            model = self.agent.config.analysis.sequence_model if self.agent is not None else "sequence-classifier"
            self.image_shadow.labels(_label(model.split("@")[0])).inc()
        elif ev.type == "alert_acknowledged":
            self.acks.inc()
        alert = alert_from_event(ev)
        if alert is not None:
            self.alerts.labels(alert.code, alert.severity).inc()

    def model_failed(self, stage: str) -> None:
        self.model_failures.labels(_label(stage, set(MODEL_STAGES))).inc()

    def input_unusable(self, stage: str, reason: str) -> None:
        self.inputs_unusable.labels(_label(stage, set(MODEL_STAGES)), _label(reason, set(UNUSABLE_REASONS))).inc()

    def _image_result(self, model_ref: str, agree: bool, shadow: bool, series_id: Optional[str] = None) -> None:
        name = _model_label(model_ref)
        with self._lock:
            counts = self._agreement.setdefault(name, [0, 0])
            counts[0] += int(bool(agree))
            counts[1] += 1
            self.image_agreement.labels(name).set(counts[0] / counts[1])
            if series_id is not None:
                self._series_agree[series_id] = bool(agree)
                while len(self._series_agree) > SERIES_AGREE_KEPT:
                    self._series_agree.popitem(last=False)
        if shadow:
            self.image_shadow.labels(name).inc()

    def _image_revised(self, model_ref: str, series_id: str, agree: bool) -> None:
        """A series' label revised (the diffusion physics placed it once its ADC map was in): the agreement
        counts it by its new label, once."""
        name = _model_label(model_ref)
        with self._lock:
            before = self._series_agree.get(series_id)
            counts = self._agreement.get(name)
            if before is None or counts is None:
                return  # its first label is not counted here (older than the series kept)
            counts[0] += int(bool(agree)) - int(before)
            self._series_agree[series_id] = bool(agree)
            self.image_agreement.labels(name).set(counts[0] / counts[1])

    def _observe_completion(self, ev: Any) -> None:
        agent = self.agent
        if agent is None:
            return
        row = agent.store.get_series(ev.series.series_uid)
        if row is None:
            return
        try:
            decided = _dt.datetime.fromisoformat(ev.time).timestamp()
        except ValueError:
            return
        s = ev.series
        basis = "expected_count" if (s.complete and s.expected_images) else ("quiet_period" if s.complete else "incomplete_grace")
        self.completion_latency.labels(basis).observe(max(0.0, decided - float(row["last_seen"])))

    # ------------------------------------------------------------------ engines
    def engine_loaded(self, engine: Any) -> None:
        """Record an engine for scanside_engine_info (call when a model is opened)."""
        info = engine.describe()
        key = (_label(info.model), _label(info.backend), _label(info.precision), _label(info.device))
        with self._lock:
            self._engines[key] = None
        self.inference_latency.labels(*key[:3])  # at 0 from the load on, like every known label set

    def observe_inference(self, engine: Any, seconds: float) -> None:
        info = engine.describe()
        self.inference_latency.labels(_label(info.model), _label(info.backend), _label(info.precision)).observe(seconds)

    @contextmanager
    def time_inference(self, engine: Any) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe_inference(engine, time.perf_counter() - t0)

    def instrument(self, engine: Any) -> Any:
        """Record the engine (engine info) and time every `engine.run` from now on; returns the engine."""
        self.engine_loaded(engine)
        run = engine.run
        if getattr(run, "timed_by_metrics", False):
            return engine

        def timed_run(inputs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return run(inputs)
            finally:
                self.observe_inference(engine, time.perf_counter() - t0)

        timed_run.timed_by_metrics = True  # type: ignore[attr-defined]
        engine.run = timed_run
        return engine

    def engine_labels(self) -> list[tuple[str, str, str, str]]:
        with self._lock:
            return list(self._engines)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def known_alerts() -> list[tuple[str, str]]:
    """(code, severity) of every alert the agent can raise with its shipped profiles' default severities."""
    from scanside.agent.protocol.checker import DEFAULT_SEVERITY, PARAMETERS

    pairs = {("FILE_QUARANTINED", "warning"), ("LABEL_MISMATCH", "warning"), ("TRIAGE_DCE_ADVISED", "warning"),
             ("TRIAGE_BPMRI_SUFFICIENT", "info"), ("SERIES_MISSING", "critical"), ("T2_ORTHOGONAL_MISSING", "warning"),
             ("GLAND_NOT_COVERED", "critical"), ("DWI_LOW_B_OUT_OF_RANGE", "warning"),
             ("DWI_INTERMEDIATE_B_OUT_OF_RANGE", "warning")}
    pairs |= set(DEFAULT_SEVERITY.items())
    pairs |= {(code, "warning") for _unit, above, below in PARAMETERS.values() for code in (above, below)}
    return sorted(pairs)


class _StateCollector:
    """Gauges read from the live agent at scrape time."""

    def __init__(self, metrics: AgentMetrics):
        self.m = metrics

    def describe(self) -> list:
        return []  # values come from the agent at scrape time; nothing to pre-declare

    def collect(self) -> Iterator[Any]:
        build = InfoMetricFamily("scanside_build", "Agent build information")
        build.add_metric([], _build_info())
        yield build
        engines = GaugeMetricFamily("scanside_engine_info", "Loaded inference engines (value 1)",
                                    labels=["model", "backend", "precision", "device"])
        for key in self.m.engine_labels():
            engines.add_metric(list(key), 1)
        yield engines
        agent = self.m.agent
        if agent is None:
            return
        yield from self._safe(lambda: _agent_gauges(agent))
        yield from self._safe(lambda: retention_metrics(agent.retention))

    @staticmethod
    def _safe(fn: Any) -> Iterator[Any]:
        try:
            yield from fn()
        except Exception as exc:  # a scrape must never take the agent down; the gap shows in the graphs
            log.warning("metrics collection failed: %s", exc)


def _agent_gauges(agent: "Agent") -> Iterator[Any]:
    queue = GaugeMetricFamily("scanside_queue_depth", "Files waiting in the ingest queue (settling or retrying)")
    queue.add_metric([], agent.ingestor.backlog)
    yield queue
    open_series = GaugeMetricFamily("scanside_series_open", "Series receiving images, not yet complete")
    open_series.add_metric([], len(agent.store.all_series("open")))
    yield open_series
    last = agent.store.last_event_seq()
    depth = GaugeMetricFamily("scanside_outbox_depth", "Events recorded but not yet delivered, per output", labels=["sink"])
    failures = CounterMetricFamily("scanside_delivery_failures", "Failed delivery attempts to an output (each retried)", labels=["sink"])
    dead = CounterMetricFamily("scanside_delivery_dead_letters", "Events an output rejected for good (recorded, skipped)", labels=["sink"])
    runners = [agent.sinks, *agent.output_runners]
    totals: dict[str, list[float]] = {}
    for runner in runners:
        for sink in list(runner.sinks):
            name = _sink_label(sink.name)
            own_depth = sink.outbox_depth()
            value = own_depth if own_depth is not None else max(0, last - runner.cursor(sink))
            t = totals.setdefault(name, [0, 0, 0])
            t[0] = max(t[0], value)
            t[1] += sink.failed_attempts
            t[2] += sink.dead_lettered
    for name, (d, f, x) in sorted(totals.items()):
        depth.add_metric([name], d)
        failures.add_metric([name], f)
        dead.add_metric([name], x)
    yield depth
    yield failures
    yield dead
    # read from the state database (scanside.agent.outputs.retry records each dead letter there): survives restarts
    letters = CounterMetricFamily("scanside_output_dead_letters", "Events an output gave up on (rejected for good, or "
                                  "still failing after its bounded attempts): recorded in the state database, skipped",
                                  labels=["output"])
    counts = agent.store.dead_letter_counts()
    for name in sorted({*OUTPUTS, *(_sink_label(k) for k in counts)}):
        letters.add_metric([name], sum(n for k, n in counts.items() if _sink_label(k) == name))
    yield letters
    disk = GaugeMetricFamily("scanside_state_disk_free_bytes", "Free space on the state folder's file system")
    disk.add_metric([], shutil.disk_usage(agent.config.state.dir).free)
    yield disk
    yield from _write_gauges(agent)
    yield from _cstore_counters(agent.receiver)


def _cstore_counters(receiver: Any) -> Iterator[Any]:
    """The C-STORE receiver's own counts (scanside.agent.intake.cstore.StoreSCP.stats); absent when it is not enabled."""
    if receiver is None:
        return
    stats = dict(receiver.stats)
    objects = CounterMetricFamily("scanside_cstore_objects", "Objects received by C-STORE, by result (stored: "
                                  "on disk and confirmed; failed: refused to the sender, who keeps it)", labels=["result"])
    objects.add_metric(["stored"], stats.get("received", 0))
    objects.add_metric(["failed"], stats.get("failed", 0))
    yield objects
    nbytes = CounterMetricFamily("scanside_cstore_received_bytes", "Bytes of the objects stored from C-STORE")
    nbytes.add_metric([], stats.get("bytes", 0))
    yield nbytes
    assocs = CounterMetricFamily("scanside_cstore_associations", "C-STORE associations, by result (rejected: "
                                 "calling or called AE title not accepted, or too many at once)", labels=["result"])
    assocs.add_metric(["accepted"], stats.get("accepted", 0))
    assocs.add_metric(["rejected"], stats.get("rejected", 0))
    yield assocs


def _write_gauges(agent: "Agent") -> Iterator[Any]:
    """Free space per written folder, and write failures per output target (scanside.agent.runtime.health)."""
    from scanside.agent.runtime.health import TARGETS, folder_space

    free = GaugeMetricFamily("scanside_disk_free_bytes",
                             "Free space on the file system of each folder the agent writes (state, quarantine, "
                             "events, dicom_output, received)", labels=["folder"])
    for fs in folder_space(agent.config):
        if fs.free is not None:
            for label in fs.folders:
                free.add_metric([label], fs.free)
    yield free
    failing = agent.write_health.failing()
    totals = dict(agent.write_health.failures_total)
    failures = CounterMetricFamily("scanside_write_failures", "Writes to an output folder that failed (disk full, "
                                   "read-only, I/O error), by target; each is retried or refused to the sender",
                                   labels=["target"])
    now_failing = GaugeMetricFamily("scanside_write_failing", "1 while the last write to the target failed", labels=["target"])
    for target in TARGETS:
        failures.add_metric([target], totals.get(target, 0))
        now_failing.add_metric([target], 1 if target in failing else 0)
    yield failures
    yield now_failing


_BUILD: dict[str, str] = {}


def _build_info() -> dict[str, str]:
    if not _BUILD:
        from importlib import metadata

        def version(dist: str) -> str:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                return "none"

        _BUILD.update(version=version("scanside"), python=platform.python_version(),
                      onnxruntime=version("onnxruntime"), pydicom=version("pydicom"), event_schema=SCHEMA_VERSION)
    return dict(_BUILD)


def retention_metrics(retention: Any) -> Iterator[Any]:
    """Per folder (received, outputs, maps, quarantine) and table (events, files): what the last
    retention pass left and what retention has deleted since start (scanside.agent.state.retention)."""
    if retention is None:
        return
    size = GaugeMetricFamily("scanside_retention_bytes", "Bytes a folder under retention held after the last pass", labels=["folder"])
    files = GaugeMetricFamily("scanside_retention_files", "Files a folder under retention held after the last pass", labels=["folder"])
    deleted = CounterMetricFamily("scanside_retention_deleted_files", "Files retention deleted", labels=["folder"])
    deleted_bytes = CounterMetricFamily("scanside_retention_deleted_bytes", "Bytes retention deleted", labels=["folder"])
    over = GaugeMetricFamily("scanside_retention_over_limit", "1 when a folder is over its size limit with only undelivered files left",
                             labels=["folder"])
    for name, u in sorted(retention.folders.items()):
        size.add_metric([name], u.bytes)
        files.add_metric([name], u.files)
        deleted.add_metric([name], u.deleted_files)
        deleted_bytes.add_metric([name], u.deleted_bytes)
        over.add_metric([name], int(u.over_limit))
    rows = GaugeMetricFamily("scanside_retention_rows", "Rows a state table held after the last retention pass", labels=["table"])
    deleted_rows = CounterMetricFamily("scanside_retention_deleted_rows", "State table rows retention deleted", labels=["table"])
    for name, t in sorted(retention.tables.items()):
        rows.add_metric([name], t.rows)
        deleted_rows.add_metric([name], t.deleted_rows)
    last = GaugeMetricFamily("scanside_retention_last_run_timestamp_seconds", "When the last retention pass ran (0: not yet)")
    last.add_metric([], retention.last_run or 0)
    took = GaugeMetricFamily("scanside_retention_last_pass_seconds", "How long the last retention pass took")
    took.add_metric([], sum(retention.pass_seconds.values()))
    yield from (size, files, deleted, deleted_bytes, over, rows, deleted_rows, last, took)
