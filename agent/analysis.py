"""The image side of the agent: after a series completes, the sequence classifier labels it from its
pixels (LABEL_MISMATCH where image and header disagree, both confident); once an exam has axial T2W,
ADC and high-b DWI, the csPCa model runs and a TriageResult with lesion findings and a contrast
recommendation follows; when the gland model is enabled, the axial T2W is segmented first so the
csPCa crop is centred on the gland.

It runs as a sink with its own persisted cursor in its own thread, so ingestion never waits for a
model, a restart resumes where it stopped, and every result has a deterministic key (the store
refuses a second copy of the same fact).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any, Optional

from agent.config import AgentConfig
from agent.events import Event, LabelMismatch, SeriesClassified, SeriesSummary, TriageResult
from agent.series import split_parts
from agent.sinks import Sink
from agent.state import StateStore

log = logging.getLogger(__name__)

TRIAGE_CHANNELS = ("T2W", "ADC", "HBV")


def _short(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:12]


class Analyzer(Sink):
    name = "analysis"

    def __init__(self, config: AgentConfig, store: StateStore, wakeup: threading.Condition, metrics: Any = None,
                 model_store: Any = None):
        self.config = config
        self.settings = config.analysis
        self.store = store
        self.wakeup = wakeup
        self.metrics = metrics
        self._model_store = model_store
        self._classifier: Any = None
        self._cspca: Any = None
        self._gland: Any = None
        self._unavailable: dict[str, str] = {}  # model -> why it is not used (logged once)

    # ------------------------------------------------------------------ models (lazy, optional)
    def model_store(self) -> Any:
        if self._model_store is None:
            from engines.store import ModelStore

            self._model_store = ModelStore(int8_tolerance=self.config.engines.int8_tolerance)
        return self._model_store

    def _has(self, name: str) -> bool:
        try:
            self.model_store().resolve(name)
            return True
        except Exception as exc:
            self._note_unavailable(name, f"not in the model store ({exc.__class__.__name__}: {exc})")
            return False

    def _note_unavailable(self, name: str, why: str) -> None:
        if name not in self._unavailable:
            self._unavailable[name] = why
            log.warning("model %s unavailable: %s", name, why)

    def classifier(self) -> Any:
        if self._classifier is None and self.settings.image_label and self._has(self.settings.sequence_model):
            from agent.image_label import ImageClassifier

            clf = ImageClassifier(self.model_store(), self.settings.sequence_model)
            engine = clf._ensure()
            if self.metrics is not None:
                self.metrics.instrument(engine)
            self._classifier = clf
        return self._classifier

    def cspca(self) -> Any:
        if self._cspca is None and self.settings.triage and self._has(self.settings.cspca_model):
            from agent.cspca import CspcaModel

            model = CspcaModel(self.model_store(), self.settings.cspca_model)
            if self.metrics is not None:
                self.metrics.instrument(model.engine)
            self._cspca = model
        return self._cspca

    def gland(self) -> Any:
        if self._gland is None and self.config.gland.enabled:
            from agent.gland import GlandService

            self._gland = GlandService(self.model_store(), model=self.config.gland.model, variant=self.config.gland.variant,
                                       windows=self.config.gland.windows)
        return self._gland

    def ready(self) -> bool:
        """Every enabled model that is in the store has loaded."""
        try:
            if self.settings.image_label and self._has(self.settings.sequence_model):
                self.classifier()
            if self.settings.triage and self._has(self.settings.cspca_model):
                self.cspca()
            return True
        except Exception as exc:
            log.error("model load failed: %s", exc)
            return False

    # ------------------------------------------------------------------ events
    def deliver(self, event: Event) -> None:
        if event.type == "series_completed":
            try:
                self._classify(event.series)
            except Exception as exc:  # a series that cannot be classified must not block the ones after it
                log.warning("image label for series %s failed: %s", event.series.series_number, exc)
        if event.type in ("series_completed", "exam_completed") and event.study_uid:
            try:
                self._triage(event.study_uid, exam_over=event.type == "exam_completed")
            except Exception as exc:
                log.warning("triage failed: %s", exc)

    def _record(self, *events: Any) -> None:
        with self.store.transaction():
            stored = [e for e in events if self.store.append_event(e) is not None]
        if stored:
            with self.wakeup:
                self.wakeup.notify_all()

    def _part(self, summary: SeriesSummary) -> Any:
        for part in split_parts(self.store.series_headers(summary.series_uid)):
            if part.series_id == summary.series_id:
                return part
        return None

    def _classify(self, s: SeriesSummary) -> None:
        clf = self.classifier()
        if clf is None:
            return
        part = self._part(s)
        if part is None:
            return
        image = clf.classify(part)
        agree = image.label == s.label
        key = f"series_classified:{s.series_id}:r{s.revision}"
        events: list[Any] = [SeriesClassified(
            key=key, study_uid=s.study_uid, series_id=s.series_id, series_number=s.series_number,
            header_label=s.label, image_label=image.label,  # type: ignore[arg-type]
            image_confidence=image.confidence, probabilities=image.probabilities, model=image.model,
            backend=image.backend, agree=agree,
        )]
        if (not agree and image.confidence >= self.settings.mismatch_image_confidence
                and s.label_confidence >= self.settings.mismatch_header_confidence):
            mkey = f"label_mismatch:{s.series_id}:r{s.revision}"
            events.append(LabelMismatch(
                key=mkey, alert_id=_short(mkey), study_uid=s.study_uid, series_id=s.series_id,
                series_number=s.series_number, header_label=s.label, header_confidence=s.label_confidence,
                image_label=image.label, image_confidence=image.confidence,  # type: ignore[arg-type]
                message=(f"Series {s.series_number or ''} '{s.series_description}' is labelled {s.label} by its header "
                         f"but looks like {image.label} ({image.confidence:.0%}): check the series before relying on it."),
            ))
        self._record(*events)

    # ------------------------------------------------------------------ triage
    def _latest_series(self, study_uid: str) -> dict[str, SeriesSummary]:
        latest: dict[str, SeriesSummary] = {}
        for ev in self.store.events_after(0, limit=100_000, study_uid=study_uid):
            if ev.type == "series_completed":
                latest[ev.series.series_id] = ev.series
        return latest

    def triage_inputs(self, study_uid: str, exam_over: bool = False) -> Optional[dict[str, SeriesSummary]]:
        """Axial T2W (non-fat-suppressed preferred), axial ADC and the highest axial high-b DWI, all complete.
        The high b must reach `triage_min_b` (PI-RADS' >= 1400, acquired or calculated) while the exam goes
        on, so that a b800 series does not trigger a run that the calculated b1400 then repeats; when the
        exam ends without one, the highest b there is will do."""
        axial = [s for s in self._latest_series(study_uid).values() if s.plane == "axial" and s.complete]
        t2 = [s for s in axial if s.label == "T2WI_nan"] or [s for s in axial if s.label == "T2WI_fs"]
        adc = [s for s in axial if s.label == "ADC"]
        hbv = [s for s in axial if s.label == "DWI_High" and s.b_values
               and (exam_over or max(s.b_values) >= self.settings.triage_min_b)]
        if not (t2 and adc and hbv):
            return None
        newest = lambda xs: max(xs, key=lambda s: (s.series_number or 0, s.revision))  # noqa: E731
        return {"T2W": newest(t2), "ADC": newest(adc), "HBV": max(hbv, key=lambda s: (max(s.b_values), s.series_number or 0))}

    def _triage(self, study_uid: str, exam_over: bool = False) -> None:
        inputs = self.triage_inputs(study_uid, exam_over)
        if inputs is None:
            return
        model = self.cspca()
        if model is None:
            return
        ident = ",".join(f"{ch}={s.series_id}:r{s.revision}" for ch, s in sorted(inputs.items()))
        key = f"triage:{study_uid}:{_short(ident)}"
        if self.store.has_event(key):
            return
        from agent.volume import load_volume

        volumes = {}
        for ch, summary in inputs.items():
            part = self._part(summary)
            if part is None:
                return
            from agent.image_label import select_frames

            volumes[ch] = load_volume(select_frames(part.refs, part.frames))
        center = None
        gland_ml = None
        service = self.gland()
        if service is not None:
            result = service.segment(volumes["T2W"])
            if result is not None and result.found:
                center, gland_ml = result.centroid_lps, result.volume_ml
        prediction = model.predict(volumes, center_lps=center)
        threshold = self.settings.dce_advised_threshold
        if threshold is None:
            threshold = model.decision_threshold
        event = TriageResult(
            key=key, alert_id=_short(key), study_uid=study_uid, probability=prediction.probability,
            findings=prediction.findings,
            recommendation="DCE_ADVISED" if prediction.probability >= threshold else "BPMRI_SUFFICIENT",
            thresholds={"dce_advised_at_probability": float(threshold)},
            inputs={ch: s.series_id for ch, s in inputs.items()}, model=prediction.model, backend=prediction.backend,
            gland_volume_ml=gland_ml,
        )
        if self.config.dicom_output.folder is not None:  # the SEG of the likelihood map is built from this
            from agent.maps import MapStore

            MapStore(self.config.state.dir / "maps").put(key, prediction.likelihood, prediction.grid)
        self._record(event)
