"""The image side of the agent: after a series completes, the sequence classifier labels it from its
pixels (LABEL_MISMATCH where image and header disagree, both confident); once an exam has axial T2W,
ADC and high-b DWI, the csPCa model runs and a TriageResult with lesion findings and a contrast
recommendation follows; when a gland model is in the store ([gland], scanside.engines.tasks.gland: TAPS, else the
zonal reference model, each only with good real-data figures), each completed axial T2W is segmented:
the csPCa crop is centred on the gland, findings outside the gland (dilated by a few mm) are dropped
and counted, each finding gets its zone (PZ / TZ, zonal model), the TriageResult carries the gland
volume, and every axial DWI/ADC series is checked for whether its slab holds the gland
(GLAND_NOT_COVERED, once per (series, T2W) pair; the profile's [coverage] sets the threshold).
A csPCa result whose inputs lie outside the model's validated range (scanside.engines.tasks.input_range) is
NOT_ASSESSED with its reason. Until a model is validated for the site (scanside.agent.analysis.shadow), its outputs
are recorded with ``shadow`` set and raise no technologist alert.

It runs as a sink with its own persisted cursor in its own thread, so ingestion never waits for a
model, a restart resumes where it stopped, and every result has a deterministic key (the store
refuses a second copy of the same fact).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional, Protocol

import numpy as np

from scanside.agent.runtime.config import AgentConfig
from scanside.agent.schema.events import Event, LabelMismatch, SeriesClassified, SeriesSummary, TriageResult
from scanside.agent.dicom.exam_reader import classifier_inputs, gland_input, model_frames, triage_inputs
from scanside.agent.dicom.frames import FrameSelectionError
from scanside.agent.dicom.volume import VolumeError
from scanside.agent.runtime.malloc import release_free_memory
from scanside.agent.outputs.redact import redact_text
from scanside.agent.analysis.shadow import ShadowPolicy, learning_line
from scanside.agent.dicom.series import split_parts
from scanside.agent.outputs.sinks import Sink
from scanside.agent.state.database import StateStore
from scanside.agent.protocol.wording import display_name

if TYPE_CHECKING:  # loaded lazily: the models' runtimes are imported only when a model is used
    from scanside.engines.tasks.cspca import CspcaModel
    from scanside.engines.tasks.image_label import ImageClassifier

log = logging.getLogger(__name__)
#: decoded series of the exam being analysed, kept for reuse: the triage needs three of them, often after the
#: classifier has seen every series of the exam (batched ingest completes several at once); another exam's volumes
#: are dropped when one of a new exam is decoded. A prostate exam is 8-14 series parts: an axial T2W is ~6 MB as
#: float32, DWI/ADC/one DCE phase far less, so about 30-40 MB at most.
VOLUMES_KEPT = 16

TRIAGE_CHANNELS = ("T2W", "ADC", "HBV")


def _short(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:12]



_DWI = {"DWI_Low", "DWI_High"}


def raises_mismatch(summary: SeriesSummary, image: Any, settings: Any) -> bool:
    """The LABEL_MISMATCH rule: image and header disagree, both are sure, the image label is not uncertain
    (the model's calibrated gate: it does not know), and the disagreement is one pixels can tell: not low- vs
    high-b DWI when the header's b-values lie in ``settings.mismatch_dwi_b_band`` around the 500 boundary."""
    if image.label == summary.label or image.uncertain:
        return False
    if image.confidence < settings.mismatch_image_confidence or summary.label_confidence < settings.mismatch_header_confidence:
        return False
    lo, hi = settings.mismatch_dwi_b_band
    if {image.label, summary.label} <= _DWI and summary.b_values and all(lo <= b <= hi for b in summary.b_values):
        return False
    return True


def headers_share_grid(a: SeriesSummary, b: SeriesSummary) -> bool:
    """Do two series' headers say one voxel grid: matrix, plane, and pixel spacing within 0.01 mm (a derived map
    may write its spacing with fewer digits than the images it was computed from)? The physics then compares
    the decoded grids themselves (scanside.engines.tasks.image_label.same_grid)."""
    if (a.rows, a.columns, a.plane) != (b.rows, b.columns, b.plane):
        return False
    if a.pixel_spacing_mm is None or b.pixel_spacing_mm is None:
        return a.pixel_spacing_mm == b.pixel_spacing_mm
    return bool(np.allclose(a.pixel_spacing_mm, b.pixel_spacing_mm, rtol=0.0, atol=0.01))


class AnalysisMetrics(Protocol):
    """What the analyzer reports to (scanside.agent.service.metrics.AgentMetrics)."""

    def instrument(self, engine: Any) -> Any: ...

    def model_failed(self, stage: str) -> None: ...

    def input_unusable(self, stage: str, reason: str) -> None: ...


#: a series no volume can be made of (no geometry, a colour screenshot, clashing frames): nothing for a model to read
UNUSABLE_INPUT = (VolumeError, FrameSelectionError)


class Analyzer(Sink):
    name = "analysis"

    def __init__(self, config: AgentConfig, store: StateStore, wakeup: threading.Condition,
                 metrics: Optional[AnalysisMetrics] = None, model_store: Any = None):
        self.config = config
        self.settings = config.analysis
        self.store = store
        self.wakeup = wakeup
        self.metrics = metrics
        self._model_store = model_store
        self._classifier: Optional[ImageClassifier] = None
        self._cspca: Optional[CspcaModel] = None
        self._gland: Any = None
        self._glands: "OrderedDict[str, Any]" = OrderedDict()  # T2W series_id:revision -> GlandResult | None
        # series_id:revision -> decoded Volume: labelling, the gland and triage share one decode per series
        self._volumes: "OrderedDict[str, Any]" = OrderedDict()
        # series_id:revision -> the network's own label (before the diffusion physics), for the series of one grid
        self._network_labels: "OrderedDict[str, Any]" = OrderedDict()
        self._checker: Any = None
        self._unavailable: dict[str, str] = {}  # model -> why it is not used (logged once)
        self.shadow = ShadowPolicy(config)

    # ------------------------------------------------------------------ models (lazy, optional)
    def model_store(self) -> Any:
        if self._model_store is None:
            from scanside.agent.analysis.model_store import open_model_store

            self._model_store = open_model_store(self.config)
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

    def classifier(self) -> Optional[ImageClassifier]:
        if self._classifier is None and self.settings.image_label and self._has(self.settings.sequence_model):
            from scanside.engines.tasks.image_label import ImageClassifier

            clf = ImageClassifier(self.model_store(), self.settings.sequence_model)
            engine = clf.load()
            if self.metrics is not None:
                self.metrics.instrument(engine)
            self._classifier = clf
        return self._classifier

    def reload_classifier(self) -> None:
        """Load the sequence model again on the next series (a new version was promoted into the store)."""
        self._classifier = None  # the store scans its folders on each resolve: the newest version wins
        self._network_labels.clear()  # labels of the version being replaced

    def cspca(self) -> Optional[CspcaModel]:
        if self._cspca is None and self.settings.triage and self._has(self.settings.cspca_model):
            from scanside.engines.tasks.cspca import CspcaModel

            model = CspcaModel(self.model_store(), self.settings.cspca_model)
            if self.metrics is not None:
                self.metrics.instrument(model.engine)
            self._cspca = model
        return self._cspca

    def gland(self) -> Any:
        if self._gland is None and self.config.gland.enabled:
            from scanside.engines.tasks.gland import GlandService

            self._gland = GlandService(self.model_store(), model=self.config.gland.model, variant=self.config.gland.variant,
                                       windows=self.config.gland.windows,
                                       on_failure=lambda exc: self._failed("gland", "gland segmentation", exc))
            if self.metrics is not None and self._gland.engine() is not None:
                self.metrics.instrument(self._gland.engine())
        return self._gland

    def protocol(self) -> Any:
        """The protocol checker (profile) the coverage deviations are raised with; None when checks are off."""
        if self._checker is None:
            from scanside.agent.protocol.checker import checker_from_config

            self._checker = checker_from_config(self.config, self.store) or False
        return self._checker or None

    def ready(self) -> bool:
        """Every enabled model that is in the store has loaded."""
        try:
            if self.config.gland.enabled and self.gland() is not None:
                self.gland().engine()
            if self.settings.image_label and self._has(self.settings.sequence_model):
                self.classifier()
            if self.settings.triage and self._has(self.settings.cspca_model):
                self.cspca()
            return True
        except Exception as exc:
            self._failed("load", "model load", exc)
            return False

    # ------------------------------------------------------------------ events
    def deliver(self, event: Event) -> None:
        if event.type == "series_completed":
            try:
                self._classify(event.series)
            except UNUSABLE_INPUT as exc:
                self._unusable("label", event.series, exc)
            except Exception as exc:  # a series that cannot be classified must not block the ones after it
                self._failed("label", f"image label for series {event.series.series_number}", exc)
        if event.type == "series_completed":
            try:
                self._coverage(event.series)
            except Exception as exc:
                self._failed("gland", f"gland coverage for series {event.series.series_number}", exc)
        if event.type in ("series_completed", "exam_completed") and event.study_uid:
            try:
                self._triage(event.study_uid, exam_over=event.type == "exam_completed")
            except Exception as exc:
                self._failed("triage", "triage", exc)
        if event.type == "exam_completed":
            self._volumes.clear()  # the exam is over: its volumes are not needed again
        if event.type in ("series_completed", "exam_completed"):
            release_free_memory()  # the volumes and activations just freed: back to the OS (agent/runtime/malloc.py)

    def _failed(self, stage: str, what: str, exc: BaseException) -> None:
        """A model run that failed: counted (scanside_model_failures_total{stage}) and logged at ERROR with the
        reason; the series or exam goes on without that result."""
        if self.metrics is not None:
            self.metrics.model_failed(stage)
        log.error("%s failed: %s", what, redact_text(f"{type(exc).__name__}: {exc}"))

    def _unusable(self, stage: str, s: SeriesSummary, exc: VolumeError | FrameSelectionError) -> None:
        """A series the image models cannot read as a volume: skipped, counted by reason
        (scanside_image_inputs_unusable_total{stage,reason}) and logged at INFO. No model failed: a screenshot or
        a series without geometry in a real exam is the scanner's, not an error to page IT about."""
        if self.metrics is not None:
            self.metrics.input_unusable(stage, exc.reason)
        log.info("series %s: no %s from the image models, no volume can be made of it: %s", s.series_number, stage,
                 redact_text(str(exc)))

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
        if clf is None or not classifier_inputs([s]):
            return
        part = self._part(s)
        if part is None:
            return
        volume = self._volume(s, part)
        placed = self._with_physics(clf, s, volume, self._network_label(clf, s, volume))
        events = self._classified(s, placed[s.series_id], f"series_classified:{s.series_id}:r{s.revision}")
        # series of its grid the physics now places otherwise (the DWI images in before their ADC map): a new label
        for other, image in placed.items():
            if other == s.series_id or image.diffusion is None:
                continue
            row = self.store.read_model.series_row(other)  # not labelled yet: it will be, physics included, when delivered
            if row is None or row.summary is None or row.classification is None or row.classification.image_label == image.label:
                continue
            o = row.summary
            events += self._classified(o, image, f"series_classified:{o.series_id}:r{o.revision}:with:{s.series_id}:r{s.revision}")
        self._record(*events)

    def _network_label(self, clf: ImageClassifier, s: SeriesSummary, volume: Any) -> Any:
        """The network's own label of a series revision (before the diffusion physics), run once: a series of
        its grid that completed first in the same ingest batch, or a restart, may have asked for it already."""
        key = f"{s.series_id}:r{s.revision}"
        if key not in self._network_labels:
            self._network_labels[key] = clf.classify(volume)
            while len(self._network_labels) > 4 * VOLUMES_KEPT:
                self._network_labels.popitem(last=False)
        return self._network_labels[key]

    def _with_physics(self, clf: ImageClassifier, s: SeriesSummary, volume: Any, network: Any) -> dict[str, Any]:
        """The labels of ``s`` and of the exam's other series on its voxel grid once the diffusion physics has
        looked at them together (ImageClassifier.with_physics, as every evaluation): only series of the
        same matrix, pixel spacing and plane are decoded to find the grid."""
        from scanside.engines.tasks.diffusion import MAX_SERIES
        from scanside.engines.tasks.image_label import series_name

        labels, volumes, names = {s.series_id: network}, {s.series_id: volume}, {s.series_id: series_name(s)}
        siblings = [o for o in self._latest_series(s.study_uid).values() if o.series_id != s.series_id
                    and classifier_inputs([o]) and headers_share_grid(o, s)]
        # the physics looks at MAX_SERIES series of a grid: the latest (a DWI acquisition and its maps complete
        # together), so forty dynamic phases stored as series of one grid are not all decoded for each one
        for o in siblings[-(MAX_SERIES - 1):]:
            try:
                v = self._volume(o)
            except UNUSABLE_INPUT:  # counted when that series itself was delivered; it must not stop this one
                continue
            if v is None or v.shape != volume.shape:
                continue
            labels[o.series_id], volumes[o.series_id] = self._network_label(clf, o, v), v
            names[o.series_id] = series_name(o)
        try:
            return clf.with_physics(labels, volumes, names)
        except Exception as exc:  # the network's labels stand; the failure is counted and logged
            self._failed("label", f"diffusion physics for series {s.series_number}", exc)
            return labels

    def _classified(self, s: SeriesSummary, image: Any, key: str) -> list[Any]:
        """SeriesClassified for ``s`` and, where the LABEL_MISMATCH rule says so, its alert."""
        events: list[Any] = [SeriesClassified(
            key=key, study_uid=s.study_uid, series_id=s.series_id, series_number=s.series_number,
            header_label=s.label, image_label=image.label,  # type: ignore[arg-type]
            image_confidence=image.confidence, probabilities=image.probabilities, model=image.model,
            backend=image.backend, agree=image.label == s.label, image_predicted=image.predicted,  # type: ignore[arg-type]
            ood_score=image.ood_score, uncertain_reason=image.uncertain_reason, diffusion=image.diffusion,
            revises=":with:" in key,
        )]
        if raises_mismatch(s, image, self.settings):
            mkey = key.replace("series_classified:", "label_mismatch:", 1)
            events.append(LabelMismatch(
                key=mkey, alert_id=_short(mkey), study_uid=s.study_uid, series_id=s.series_id,
                series_number=s.series_number, header_label=s.label, header_confidence=s.label_confidence,
                image_label=image.label, image_confidence=image.confidence,  # type: ignore[arg-type]
                shadow=self.shadow.shadow(image.model),
                message=(f"Series {s.series_number or ''} '{s.series_description}' is {display_name(s.label)} by its header "
                         f"but looks like {display_name(image.label)} ({image.confidence:.0%}): check the series before relying on it."),
            ))
        return events

    # ------------------------------------------------------------------ gland
    def _volume(self, summary: SeriesSummary, part: Any = None) -> Any:
        """The series' volume as the models take it (one temporal phase of a dynamic series), decoded once
        and kept for the last few series; None when the series has no part to load."""
        key = f"{summary.study_uid}/{summary.series_id}:r{summary.revision}"
        if key in self._volumes:
            self._volumes.move_to_end(key)
            return self._volumes[key]
        from scanside.agent.dicom.volume import load_volume

        part = part if part is not None else self._part(summary)
        if part is None:
            return None
        volume = load_volume(model_frames(part))
        for other in [k for k in self._volumes if not k.startswith(f"{summary.study_uid}/")]:
            del self._volumes[other]
        self._volumes[key] = volume
        while len(self._volumes) > VOLUMES_KEPT:
            self._volumes.popitem(last=False)
        return volume

    def _t2_volume(self, summary: SeriesSummary) -> Any:
        return self._volume(summary)

    def gland_for(self, t2: SeriesSummary, volume: Any = None) -> Any:
        """GlandResult of an axial T2W series (segmented once, kept for the last few), None without a model."""
        service = self.gland()
        if service is None:
            return None
        key = f"{t2.series_id}:r{t2.revision}"
        if key not in self._glands:
            if service.engine() is None:
                return None
            if volume is None:
                try:
                    volume = self._t2_volume(t2)
                except Exception as exc:
                    log.info("gland: series %s not loadable (%s)", t2.series_number, type(exc).__name__)
                    volume = None
            result = service.segment(volume) if volume is not None else None
            self._glands[key] = result
            while len(self._glands) > 8:
                self._glands.popitem(last=False)
        return self._glands[key]

    def _reference_t2(self, study_uid: str) -> Optional[SeriesSummary]:
        """The axial T2W the gland is taken from (scanside.agent.dicom.exam_reader.gland_input, as every evaluation)."""
        return gland_input(self._latest_series(study_uid).values())

    def _coverage(self, s: SeriesSummary) -> None:
        """GLAND_NOT_COVERED for each axial DWI/ADC series whose slab misses part of the gland: checked when
        the series completes (against the T2W's gland) and, for the series before it, when a T2W completes."""
        if self.gland() is None or not s.study_uid:
            return
        checker = self.protocol()
        if checker is None or not checker.profile.coverage.enabled:
            return
        cov = checker.profile.coverage
        t2 = self._reference_t2(s.study_uid)
        if t2 is None:
            return
        if s.series_id == t2.series_id:
            targets = [x for x in self._latest_series(s.study_uid).values()
                       if x.complete and x.slab is not None and cov.checked.matches(x.label, x.other_kind, x.plane)]
        elif s.complete and s.slab is not None and cov.checked.matches(s.label, s.other_kind, s.plane):
            targets = [s]
        else:
            return
        if not targets:
            return
        gland = self.gland_for(t2)
        if gland is None or not gland.found:
            self._edges_without_gland(checker, s.study_uid, targets, t2)
            return
        from scanside.engines.tasks.gland import coverage

        events = []
        done: set[tuple[str, int]] = set()  # one check per acquisition (the parts of a DWI series share its slab)
        for x in targets:
            if (x.series_uid, x.revision) in done:
                continue
            done.add((x.series_uid, x.revision))
            fraction = coverage(gland, x)
            if fraction is None:
                continue
            dev = checker.coverage_deviation(s.study_uid, x, t2, fraction, missed_end(gland, x))
            if dev is not None:
                events.append(dev)
        if events:
            self._record(*events)

    def _edges_without_gland(self, checker: Any, study_uid: str, targets: list, t2: SeriesSummary) -> None:
        """The gland model ran but found no gland: the slab-end check the pipeline left to it
        (profile geometry.edge_check = "without_gland") is made here, once per acquisition."""
        from scanside.agent.protocol.checker import ProtocolChecker

        g = checker.profile.geometry
        if not g.enabled or g.edge_check != "without_gland" or t2.slab is None:
            return
        plain = ProtocolChecker(checker.profile, self.store)
        deferring = ProtocolChecker(checker.profile, self.store, gland_coverage=True)
        events = []
        for x in {t.series_uid: t for t in reversed(targets)}.values():
            if not g.checked.matches(x.label, x.other_kind, x.plane):
                continue
            dev = plain.misaligned(study_uid, x, t2)
            if dev is None or deferring.misaligned(study_uid, x, t2) is not None:
                continue  # aligned, or misaligned otherwise too: the pipeline has said so
            key = f"deviation:{study_uid}:{dev.code}:{x.series_uid}:r{x.revision}:t2:{t2.series_id}:r{t2.revision}:no-gland"
            events.append(dev.model_copy(update={"key": key, "alert_id": "pd-" + hashlib.sha1(key.encode()).hexdigest()[:16]}))
        if events:
            self._record(*events)

    # ------------------------------------------------------------------ triage
    def _latest_series(self, study_uid: str) -> dict[str, SeriesSummary]:
        """The latest revision of every series part, in the order of first completion (the exam read model)."""
        return {s.series_id: s for s in self.store.read_model.latest_series(study_uid)}

    def triage_inputs(self, study_uid: str, exam_over: bool = False) -> Optional[dict[str, SeriesSummary]]:
        """The exam's csPCa inputs by scanside.agent.dicom.exam_reader.triage_inputs (the selection every evaluation makes)."""
        return triage_inputs(self._latest_series(study_uid).values(), min_b=self.settings.triage_min_b,
                             exam_over=exam_over)

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
        volumes = {}
        for ch, summary in inputs.items():
            volume = self._volume(summary)
            if volume is None:
                return
            volumes[ch] = volume
        gland = self.gland_for(inputs["T2W"], volumes["T2W"])
        found = gland is not None and gland.found
        prediction = model.predict(volumes, center_lps=gland.centroid_lps if found else None)
        event = triage_event(key, study_uid, inputs, model, prediction, gland, self.config,
                             self._disagreements(study_uid, inputs), self.shadow.shadow(prediction.model))
        if self.config.dicom_output.folder is not None:  # the SEG of the likelihood map is built from this
            from scanside.agent.outputs.maps import MapStore

            MapStore(self.config.state.dir / "maps").put(key, prediction.likelihood, prediction.grid)
        self._record(event)

    def _disagreements(self, study_uid: str, inputs: dict[str, SeriesSummary]) -> list[dict]:
        """Input series whose image label (sequence classifier) disagrees with the header's."""
        out = []
        for ch, s in inputs.items():
            row = self.store.read_model.series_row(s.series_id)
            c = row.classification if row is not None else None
            if row is None or c is None or c.agree:
                continue
            out.append((row.classified_seq or 0, {
                "channel": ch, "series_number": c.series_number, "header_label": c.header_label,
                "image_label": c.image_label, "image_confidence": round(c.image_confidence, 3), "agree": c.agree}))
        return [d for _, d in sorted(out, key=lambda x: x[0])]  # in the order the labels came

    # ------------------------------------------------------------------ shadow mode
    def learning(self) -> Optional[str]:
        """"image checks: learning this site (N exams)" while an image model in use is in shadow mode, else None."""
        refs = self._image_model_refs()
        if not self.shadow.enabled or not any(self.shadow.shadow(r) for r in refs):
            return None
        return learning_line(self.store.read_model.exams_with_image_results())

    def image_checks(self) -> str:
        """The image models' state in words, for the console and the readiness detail."""
        if not self._image_model_refs():
            return "image checks: no image model in use"
        if not self.shadow.enabled:
            return "image checks: shadow mode switched off for this site"
        return self.learning() or "image checks: validated for this site"

    def _image_model_refs(self) -> list[str]:
        manifests = [self._classifier.manifest if self._classifier is not None else None,
                     self._cspca.manifest if self._cspca is not None else None]
        return [m.ref for m in manifests if m is not None]


def input_words(s: SeriesSummary) -> str:
    b = f" b{max(s.b_values):g}" if s.b_values and s.label.startswith("DWI") else ""
    return f"series {s.series_number if s.series_number is not None else '?'} {s.label}{b} {s.plane or ''}".strip()


def triage_event(key: str, study_uid: str, inputs: dict[str, SeriesSummary], model: Any, prediction: Any, gland: Any,
                 config: AgentConfig, disagreements: list, shadow: bool) -> TriageResult:
    """The TriageResult of a prediction (pure; shared by the daemon and the real-data evaluation):

    * findings only inside the gland mask dilated by [gland] finding_margin_mm, the others dropped and
      counted, and the exam probability recomputed from the evidence kept (scanside.engines.tasks.cspca.restrict_findings);
    * NOT_ASSESSED, with its reason, when the inputs lie outside the model's validated range, or when the
      gland model ran and found no gland to place findings in: no confident answer the model cannot back;
    * the inputs used in words, how confident the model is that they are in its range, and the image/header
      disagreements on them."""
    from scanside.engines.tasks.cspca import restrict_findings
    from scanside.engines.tasks.gland import inside_gland

    findings, probability, dropped = prediction.findings, prediction.probability, 0
    gland_check, gland_ml, reason = "no_gland_model", None, None
    if gland is not None and gland.found:
        margin = config.gland.finding_margin_mm
        kept = restrict_findings(prediction, lambda pts: inside_gland(gland, pts, margin), model.exam_head)
        findings, probability, dropped = kept.findings, kept.probability, kept.dropped
        gland_check, gland_ml = "checked", round(gland.volume_ml, 2)
        if gland.zones is not None:
            findings = with_zones(dataclasses.replace(prediction, findings=findings), gland,
                                  float(model.post.get("lesion_threshold", 0.5)))
    elif gland is not None:
        gland_check, reason = "no_gland_found", "the gland model found no prostate on the axial T2W: findings cannot be placed"
    check = prediction.range_check
    if check is not None and not check.in_range:
        reason = check.reason()
    threshold = config.analysis.dce_advised_threshold
    if threshold is None:
        threshold = model.decision_threshold
    if reason is not None:
        recommendation, confidence = "NOT_ASSESSED", None
    else:
        recommendation = "DCE_ADVISED" if probability >= threshold else "BPMRI_SUFFICIENT"
        confidence = round(max(probability, 1.0 - probability), 4)
    return TriageResult(
        key=key, alert_id=_short(key), study_uid=study_uid, probability=probability, findings=findings,
        recommendation=recommendation, thresholds={"dce_advised_at_probability": float(threshold)},  # type: ignore[arg-type]
        inputs={ch: s.series_id for ch, s in inputs.items()}, model=prediction.model, backend=prediction.backend,
        gland_volume_ml=gland_ml, not_assessed_reason=reason, confidence=confidence,
        input_range=check.model_dump() if check is not None else None,
        input_series={ch: input_words(s) for ch, s in inputs.items()}, gland_check=gland_check,  # type: ignore[arg-type]
        gland_model=gland.model if gland is not None else None, findings_outside_gland=dropped,
        label_disagreements=disagreements, shadow=shadow,
    )


def missed_end(gland: Any, series: SeriesSummary) -> Optional[str]:
    """Which end of the gland lies outside the series' slab: "apex" (inferior), "base" (superior), both, or None."""
    slab = series.slab
    if slab is None or not gland.found:
        return None
    pts = gland.points_lps()
    n = np.asarray(slab.normal, dtype=float)
    d = pts @ n
    ends = []
    for outside in (d < slab.start_mm, d > slab.end_mm):
        if outside.any():
            # superior (LPS +z) of the gland's centroid: base; inferior: apex
            ends.append("base" if float(pts[outside, 2].mean()) > float(gland.centroid_lps[2]) else "apex")
    ends = sorted(set(ends))
    return " and ".join(ends) if ends else None


def with_zones(prediction: Any, gland: Any, threshold: float) -> list:
    """The prediction's findings with their zone (scanside.engines.tasks.gland.zone_of): the majority zone of the voxels of the
    likelihood component each finding was measured on, else the zone at (or within 5 mm of) its centre."""
    from scipy import ndimage

    from scanside.engines.tasks.gland import zone_of

    lk = np.nan_to_num(np.asarray(prediction.likelihood, dtype=np.float32), nan=0.0)
    lab, _ = ndimage.label(lk >= threshold, structure=np.ones((3, 3, 3), dtype=bool))
    grid = prediction.grid
    out = []
    for f in prediction.findings:
        pts = None
        idx = np.rint(grid.lps_to_index(np.asarray(f.center_lps_mm, dtype=float))).astype(int)
        k = int(lab[tuple(idx)]) if np.all((idx >= 0) & (idx < np.asarray(lab.shape))) else 0
        if k == 0 and lab.any():  # centre of an odd-shaped component: the nearest labelled voxel's component
            vox = np.argwhere(lab > 0)
            near = vox[np.argmin(np.linalg.norm(grid.index_to_lps(vox) - np.asarray(f.center_lps_mm), axis=1))]
            k = int(lab[tuple(near)])
        if k:
            pts = grid.index_to_lps(np.argwhere(lab == k).astype(np.float64))
        out.append(f.model_copy(update={"zone": zone_of(gland, pts, f.center_lps_mm)}))
    return out
