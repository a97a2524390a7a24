"""DICOM output: per exam, a Comprehensive 3D SR (TID 1500 measurement report) of the triage findings
and the protocol check, and a fractional SEG of the lesion likelihood on the T2W geometry, both
referencing the source series. Written to a folder, optionally sent by C-STORE (scanside.agent.outputs.dicom_send).

What goes in the SR (highdicom ``MeasurementReport``):
- per lesion finding a planar ROI group (TID 1410): tracking id + UID, finding type Lesion, finding
  site Prostate (and PZ/TZ when known), the centre as an SCOORD3D POINT in the T2W frame of reference,
  long and short axis (mm), volume (ml) when known, peak likelihood (DCM 111047 Probability of cancer,
  derivation Maximum), the algorithm (model name/version);
- an exam-level group (TID 1501) with the exam csPCa probability and the DCE recommendation;
- a "protocol" group (method: PI-RADS 2.1 acquisition requirements) with one qualitative evaluation
  per deviation or label mismatch: the stable code (coding scheme 99SCANSIDE) with its severity, and
  the sentence for the technologist as a TEXT item (HAS PROPERTIES) under it;
- evidence: every instance of the series the agent saw in the exam (the report covers the exam).

When: on ``ExamCompleted`` (everything the agent decided about the exam up to then), and on a
``TriageResult`` that arrives after the exam was completed: one SR per revision of the exam's results,
each later one naming the one it supersedes in its Predecessor Documents Sequence (PS3.3 C.17.2.3), so
a PACS or viewer shows the latest and knows the earlier one is replaced. Both SR and SEG are written
in ISO_IR 192 (UTF-8): the sentences hold "≥" and "≤", which the source images' character set
(often ISO_IR 100) cannot. UIDs derive from the triggering event key,
so a rebuild after a crash writes the same objects (same file names; a PACS sees the same SOP
instance again, not a new one).

SR and SEG carry the patient and study modules copied from the source images: that is what makes them
land in the right study on the PACS. Nothing here is logged with patient identifiers.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import highdicom as hd
from scanside.agent.runtime.config import AgentConfig, DicomOutputConfig
from scanside.agent.outputs.atomic import atomic_path
from scanside.agent.runtime.health import WriteReporter
from scanside.agent.schema.events import Event, ExamCompleted, LabelMismatch, ProtocolDeviation, TriageResult
from scanside.agent.outputs.maps import MapStore
from scanside.agent.outputs.retry import OutputRetry, RetryPolicy
from scanside.agent.outputs.sinks import Sink
from scanside.agent.state.database import StateStore
from scanside.engines.preprocess import Grid, resample_to_reference
from scanside.agent.dicom.volume import Volume
from scanside.agent.protocol.wording import display_name

log = logging.getLogger(__name__)

SCHEME = "99SCANSIDE"  # private coding scheme for codes that have no standard equivalent
SOFTWARE = "scanside"
ZONE_CODES = {
    "PZ": hd.sr.CodedConcept("279706003", "SCT", "Peripheral zone of prostate"),
    "TZ": hd.sr.CodedConcept("399384005", "SCT", "Transition zone of prostate"),
}
SEVERITY_CODES = {
    "critical": codes.SCT.SevereSeverityModifier,
    "warning": codes.SCT.ModerateSeverityModifier,
    "info": codes.SCT.Mild,
}
UNIT_ML = hd.sr.CodedConcept("ml", "UCUM", "ml")
# SCT 719178004; pydicom's meaning carries the "(procedure)" tag and is longer than a CodeMeaning (LO, 64)
PROCEDURE = hd.sr.CodedConcept("719178004", "SCT", "Multiparametric magnetic resonance imaging of prostate")
PROBABILITY = codes.DCM.ProbabilityOfCancer
T2W_LABELS = ("T2WI_nan", "T2WI_fs")
UTF8 = "ISO_IR 192"


class DicomBuildError(Exception):
    """The objects cannot be built from what is stored (missing or unreadable source images)."""


def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning[:64])  # > 16 characters: Long Code Value


def _meaning(code: str) -> str:
    return code.replace("_", " ").capitalize()


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


# ---------------------------------------------------------------------------------------------
# What one report says
# ---------------------------------------------------------------------------------------------


@dataclass
class ExamFindings:
    study_uid: str
    trigger_key: str
    trigger_seq: int
    triage: Optional[TriageResult] = None
    deviations: list[ProtocolDeviation] = field(default_factory=list)
    mismatches: list[LabelMismatch] = field(default_factory=list)
    series_labels: dict[str, str] = field(default_factory=dict)  # series_uid -> label (first completed part)


def collect_findings(store: StateStore, study_uid: str, trigger: Event) -> ExamFindings:
    """Everything the agent decided about the exam up to (and including) the triggering event."""
    out = ExamFindings(study_uid=study_uid, trigger_key=trigger.key, trigger_seq=trigger.seq or 0)
    upto = trigger.seq  # a sink behind the log reports what was known when the trigger was recorded
    for ev in store.read_model.findings(study_uid, upto_seq=upto):
        if isinstance(ev, TriageResult):
            # the latest one counts; one in shadow mode or NOT_ASSESSED does not leave the agent (scanside.agent.analysis.shadow)
            if not ev.shadow and ev.recommendation != "NOT_ASSESSED":
                out.triage = ev
        elif isinstance(ev, ProtocolDeviation):
            out.deviations.append(ev)
        elif isinstance(ev, LabelMismatch):
            if not ev.shadow:
                out.mismatches.append(ev)
    for row in store.read_model.series_rows(study_uid):  # first completion order
        if row.first_label is not None and (upto is None or (row.completed_seq or 0) <= upto):
            out.series_labels.setdefault(row.series_uid, row.first_label)
    return out


# ---------------------------------------------------------------------------------------------
# Source images
# ---------------------------------------------------------------------------------------------


def series_uid_of(series_id: str) -> str:
    return series_id.split("#", 1)[0]


def read_series(store: StateStore, series_uid: str, pixels: bool = False) -> list[Dataset]:
    """The stored instances of a series, read from the paths the agent recorded, in instance order."""
    headers = store.series_headers(series_uid)
    if not headers:
        raise DicomBuildError(f"no stored instances for series {series_uid}")
    out = []
    for h in headers:
        try:
            out.append(pydicom.dcmread(h.path, stop_before_pixels=not pixels))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise DicomBuildError(f"source image unreadable: {type(exc).__name__}") from exc
    out.sort(key=lambda d: (int(getattr(d, "InstanceNumber", 0) or 0), str(d.SOPInstanceUID)))
    return out


def _first(seq_item: Dataset, name: str):
    v = getattr(seq_item, name, None)
    return v[0] if v else None


def frame_planes(ds: Dataset) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float]]]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of each frame of a source image."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = _first(ds, "SharedFunctionalGroupsSequence") or Dataset()
        planes = []
        for fg in ds.PerFrameFunctionalGroupsSequence:
            pos = _first(fg, "PlanePositionSequence")
            ori = _first(fg, "PlaneOrientationSequence") or _first(shared, "PlaneOrientationSequence")
            pm = _first(fg, "PixelMeasuresSequence") or _first(shared, "PixelMeasuresSequence")
            if pos is None or ori is None or pm is None:
                raise DicomBuildError("enhanced source image without plane position/orientation/pixel measures")
            planes.append((np.asarray(pos.ImagePositionPatient, float), np.asarray(ori.ImageOrientationPatient, float),
                           (float(pm.PixelSpacing[0]), float(pm.PixelSpacing[1]))))
        return planes
    try:
        return [(np.asarray(ds.ImagePositionPatient, float), np.asarray(ds.ImageOrientationPatient, float),
                 (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])))]
    except AttributeError as exc:
        raise DicomBuildError("source image without plane geometry") from exc


def frame_grid(ipp: np.ndarray, iop: np.ndarray, spacing: tuple[float, float], rows: int, cols: int) -> Grid:
    """One image plane as a (1, rows, cols) grid: d1 = row index (along the column cosine), d2 = column index."""
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    aff = np.eye(4)
    aff[:3, 0] = normal
    aff[:3, 1] = col_cos * spacing[0]
    aff[:3, 2] = row_cos * spacing[1]
    aff[:3, 3] = ipp
    return Grid(shape=(1, rows, cols), affine=aff)


def map_on_source(array: np.ndarray, grid: Grid, sources: Sequence[Dataset]) -> np.ndarray:
    """Resample a likelihood map onto the frames of the source images: (n_frames, rows, cols) in 0..1,
    frames in source order (image by image, frame by frame), as highdicom's Segmentation expects."""
    vol = Volume.from_array_affine(np.clip(np.nan_to_num(array, nan=0.0), 0.0, 1.0).astype(np.float32), grid.affine)
    frames = []
    for ds in sources:
        for ipp, iop, spacing in frame_planes(ds):
            g = frame_grid(ipp, iop, spacing, int(ds.Rows), int(ds.Columns))
            frames.append(resample_to_reference(vol, g, order=1).array[0])
    return np.clip(np.stack(frames), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Objects
# ---------------------------------------------------------------------------------------------


def _algorithm(triage: TriageResult) -> hd.sr.AlgorithmIdentification:
    name, _, version = triage.model.partition("@")
    if not version and "/" in name:
        name, _, version = name.partition("/")
    return hd.sr.AlgorithmIdentification(name=name[:64] or "scanside", version=(version or "unknown")[:64])


def _with_comment(item: hd.sr.QualitativeEvaluation, text: str) -> hd.sr.QualitativeEvaluation:
    if text:
        node = item[0]
        node.ContentSequence = hd.sr.ContentSequence([
            hd.sr.TextContentItem(name=codes.DCM.Comment, value=text[:1024],
                                  relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES)])
    return item


def lesion_groups(triage: TriageResult, frame_of_reference_uid: str, study_uid: str) -> list:
    groups = []
    algo = _algorithm(triage)
    for i, f in enumerate(triage.findings, start=1):
        measurements = [
            hd.sr.Measurement(name=codes.SCT.LongAxis, value=float(f.long_axis_mm), unit=codes.UCUM.Millimeter, algorithm_id=algo),
            hd.sr.Measurement(name=codes.SCT.ShortAxis, value=float(f.short_axis_mm), unit=codes.UCUM.Millimeter, algorithm_id=algo),
            hd.sr.Measurement(name=PROBABILITY, value=float(f.likelihood), unit=codes.UCUM.NoUnits,
                              derivation=codes.SCT.Maximum, algorithm_id=algo),
        ]
        if f.volume_ml is not None:
            measurements.append(hd.sr.Measurement(name=codes.SCT.Volume, value=float(f.volume_ml), unit=UNIT_ML, algorithm_id=algo))
        sites = [hd.sr.FindingSite(anatomic_location=codes.SCT.Prostate)]
        if f.zone in ZONE_CODES:
            sites.append(hd.sr.FindingSite(anatomic_location=ZONE_CODES[f.zone]))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(triage.key, "lesion", i), identifier=f"lesion {i}"),
            referenced_region=hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                                  graphic_data=np.asarray([f.center_lps_mm], dtype=float),
                                                  frame_of_reference_uid=frame_of_reference_uid),
            finding_type=codes.SCT.Lesion,
            algorithm_id=algo,
            finding_sites=sites,
            measurements=measurements,
        ))
    return groups


def exam_group(triage: TriageResult, study_uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algo = _algorithm(triage)
    rec = _code(triage.recommendation, "DCE advised" if triage.recommendation == "DCE_ADVISED" else "bpMRI sufficient")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(triage.key, "exam"), identifier="csPCa triage"),
        finding_type=codes.SCT.CarcinomaOfProstate,
        algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Prostate)],
        measurements=[hd.sr.Measurement(name=PROBABILITY, value=float(triage.probability), unit=codes.UCUM.NoUnits, algorithm_id=algo)],
        qualitative_evaluations=[_with_comment(hd.sr.QualitativeEvaluation(name=codes.LN.Recommendations, value=rec),
                                               triage.disclaimer)],
    )


def protocol_group(findings: ExamFindings) -> Optional[hd.sr.MeasurementsAndQualitativeEvaluations]:
    evals = []
    for d in findings.deviations:
        text = d.message + (f" Measured: {d.measured}." if d.measured else "") + (f" Required: {d.required}." if d.required else "")
        evals.append(_with_comment(hd.sr.QualitativeEvaluation(name=_code(d.code, _meaning(d.code)),
                                                               value=SEVERITY_CODES[d.severity]), text))
    for m in findings.mismatches:
        text = (f"{m.message} Header: {display_name(m.header_label)} ({m.header_confidence:.2f}); "
                f"image model: {display_name(m.image_label)} ({m.image_confidence:.2f}).")
        evals.append(_with_comment(hd.sr.QualitativeEvaluation(name=_code(m.code, _meaning(m.code)),
                                                               value=SEVERITY_CODES[m.severity]), text))
    if not evals:
        return None
    profile = findings.deviations[0].profile if findings.deviations else ""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(findings.trigger_key, "protocol"),
                                                     identifier=f"protocol check {profile}".strip()[:64]),
        finding_type=codes.DCM.ProtocolNotFollowed,
        method=codes.DCM.PIRADS2Point1ProstateMRIAcquisitionRequirements,
        qualitative_evaluations=evals,
    )


def build_sr(findings: ExamFindings, evidence: Sequence[Dataset], t2w: Sequence[Dataset],
             config: DicomOutputConfig, predecessors: Sequence[Dataset] = ()) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report. ``t2w``: the T2W source images the lesion points refer to;
    ``predecessors``: earlier reports of the same exam this one supersedes (Predecessor Documents Sequence)."""
    groups: list = []
    if findings.triage is not None:
        if findings.triage.findings:
            if not t2w:
                raise DicomBuildError("lesion findings but no T2W source images for their frame of reference")
            groups += lesion_groups(findings.triage, str(t2w[0].FrameOfReferenceUID), findings.study_uid)
        groups.append(exam_group(findings.triage, findings.study_uid))
    pg = protocol_group(findings)
    if pg is not None:
        groups.append(pg)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(SOFTWARE, "device"), name=SOFTWARE, manufacturer_name=config.manufacturer, model_name=SOFTWARE))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups or None,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report[0],
        series_instance_uid=_uid(findings.study_uid, "scanside-sr-series"),
        series_number=config.series_number_sr,
        sop_instance_uid=_uid(findings.trigger_key, "sr"),
        instance_number=max(1, findings.trigger_seq),
        manufacturer=config.manufacturer,
        institution_name=config.institution_name,
        is_complete=True,
        series_description="scanside findings (decision support)",
        previous_versions=list(predecessors) or None,
    )
    # the texts hold "≥", "≤", "µ": a character set that has them, whatever the source images used
    # (highdicom copies theirs; ISO_IR 100 turns "≥ 1400" into "? 1400" on the PACS)
    sr.SpecificCharacterSet = UTF8
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "scanside codes: protocol check and triage"
    scheme.CodingSchemeResponsibleOrganization = "scanside"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def build_seg(triage: TriageResult, likelihood: np.ndarray, grid: Grid, t2w_pixels: Sequence[Dataset],
              config: DicomOutputConfig) -> Optional[hd.seg.Segmentation]:
    """Fractional (probability) SEG of the lesion likelihood on the T2W frames; None if all zero there."""
    frames = map_on_source(likelihood, grid, t2w_pixels)
    if not np.any(frames >= 1.0 / 255.0):
        return None
    name, _, version = triage.model.partition("@")
    algo = hd.AlgorithmIdentificationSequence(name=name[:64] or SOFTWARE, family=codes.cid7162.ArtificialIntelligence,
                                              version=(version or "unknown")[:64])
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="csPCa likelihood",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
        tracking_uid=_uid(triage.key, "seg-segment"), tracking_id="csPCa likelihood",
        anatomic_regions=[codes.SCT.Prostate])
    seg = hd.seg.Segmentation(
        source_images=list(t2w_pixels),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        segment_descriptions=[segment],
        series_instance_uid=_uid(triage.study_uid, "scanside-seg-series"),
        series_number=config.series_number_seg,
        sop_instance_uid=_uid(triage.key, "seg"),
        instance_number=max(1, triage.seq or 1),
        manufacturer=config.manufacturer,
        manufacturer_model_name=SOFTWARE,
        software_versions=SOFTWARE,
        device_serial_number="0",
        content_description="csPCa likelihood (decision support, not a diagnosis)",
        content_label="CSPCA",
        series_description="scanside csPCa likelihood",
    )
    seg.SpecificCharacterSet = UTF8
    return seg


def _t2w_series_uid(findings: ExamFindings) -> Optional[str]:
    if findings.triage is not None:
        for channel, sid in findings.triage.inputs.items():
            if channel.lower() in ("t2w", "t2", "t2wi") or "t2" in channel.lower():
                return series_uid_of(sid)
    for uid, label in findings.series_labels.items():
        if label in T2W_LABELS:
            return uid
    return None


def write_atomic(ds: Dataset, dest: Path) -> Path:
    with atomic_path(dest) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return dest


_SAFE = re.compile(r"[^0-9A-Za-z.]")


def _predecessor(out_dir: Path, findings: ExamFindings) -> list[Dataset]:
    """The exam's report this one supersedes: the latest SR written for an earlier trigger (instance
    numbers are trigger sequence numbers), so each revision names the one before it."""
    best: Optional[Dataset] = None
    for path in sorted(out_dir.glob("SR_*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        number = int(ds.get("InstanceNumber", 0) or 0)
        if number < max(1, findings.trigger_seq) and (best is None or number > int(best.InstanceNumber)):
            best = ds
    return [best] if best is not None else []


def build_exam_objects(store: StateStore, findings: ExamFindings, maps: Optional[MapStore], folder: Path,
                       config: DicomOutputConfig) -> list[Path]:
    """Build (or find, when already written for this trigger) the SR and SEG of an exam; their paths."""
    out_dir = Path(folder) / _SAFE.sub("_", findings.study_uid)
    sr_path = out_dir / f"SR_{_uid(findings.trigger_key, 'sr')}.dcm"
    seg_path = out_dir / f"SEG_{_uid(findings.triage.key, 'seg')}.dcm" if findings.triage else None
    paths: list[Path] = []
    t2w_uid = _t2w_series_uid(findings)
    t2w_headers = read_series(store, t2w_uid) if t2w_uid else []
    if not sr_path.exists():
        evidence: list[Dataset] = list(t2w_headers)
        seen = {t2w_uid} if t2w_uid else set()
        for row in store.study_series(findings.study_uid):
            if row["series_uid"] not in seen:
                seen.add(row["series_uid"])
                evidence += read_series(store, row["series_uid"])
        if not evidence:
            raise DicomBuildError("no source images stored for the exam")
        write_atomic(build_sr(findings, evidence, t2w_headers, config, _predecessor(out_dir, findings)), sr_path)
    paths.append(sr_path)
    if findings.triage is not None and seg_path is not None:
        if seg_path.exists():
            paths.append(seg_path)
        elif maps is not None and t2w_uid:
            got = maps.get(findings.triage.key)
            if got is None:
                log.info("no likelihood map stored for triage seq %s: SR only", findings.triage.seq)
            else:
                seg = build_seg(findings.triage, got[0], got[1], read_series(store, t2w_uid, pixels=True), config)
                if seg is None:
                    log.info("likelihood map is empty on the T2W frames: no SEG")
                else:
                    paths.append(write_atomic(seg, seg_path))
    return paths


# ---------------------------------------------------------------------------------------------
# Sink
# ---------------------------------------------------------------------------------------------


class DicomSink(Sink):
    """Builds the exam's SR (+ SEG) on ExamCompleted, or on a TriageResult that comes after it; writes
    them to the output folder and, when configured, C-STOREs them. A send that fails for a transient
    reason is retried from the outbox (the same event, the same files) with backoff; a build that
    cannot succeed (source images gone) or an object the receiver refuses is recorded and skipped."""

    def __init__(self, config: DicomOutputConfig, store: StateStore, maps: Optional[MapStore] = None,
                 sender: "Optional[object]" = None, name: str = "dicom", health: Optional[WriteReporter] = None):
        if config.folder is None:
            raise ValueError("dicom_output.folder is not set")
        self.name = name
        self.config = config
        self.store = store
        self.maps = maps
        self.sender = sender
        self.folder = Path(config.folder)
        self.written: list[Path] = []
        self.sent = 0
        self.health = health  # failed writes -> /readyz false until one succeeds (scanside.agent.runtime.health)
        # one policy (scanside.agent.outputs.retry), two budgets: writes to the output folder, and C-STOREs to the receiver;
        # both count in failed_attempts / dead_lettered (metrics: delivery failures, dead letters)
        self._write_retry = OutputRetry(name, RetryPolicy(1.0, 10.0, 0.0, config.write_max_attempts), store)
        send = config.send
        self._send_retry = OutputRetry(name, RetryPolicy(send.backoff_initial_s if send else 5.0,
                                                         send.backoff_max_s if send else 600.0, 0.5,
                                                         send.max_attempts if send else 30), store)

    @property
    def failed_attempts(self) -> int:
        return self._write_retry.failed_attempts + self._send_retry.failed_attempts

    @property
    def dead_lettered(self) -> int:
        return self._write_retry.dead_lettered + self._send_retry.dead_lettered

    @property
    def last_error(self) -> Optional[str]:
        return self._send_retry.last_error or self._write_retry.last_error

    @classmethod
    def from_config(cls, config: AgentConfig, store: StateStore, health: Optional[WriteReporter] = None) -> "DicomSink":
        out = config.dicom_output
        if out.folder is None:
            raise ValueError("dicom_output.folder is not set")
        if config.watch.folder is not None:
            folder, watched = Path(out.folder).resolve(), Path(config.watch.folder).resolve()
            if folder == watched or watched in folder.parents:
                raise ValueError("dicom_output.folder must not be inside watch.folder (the agent would ingest its own SEG)")
        sender = None
        if out.send is not None:
            from scanside.agent.outputs.dicom_send import DicomSender

            sender = DicomSender(out.send)
        return cls(out, store, MapStore(config.state.dir / "maps"), sender, health=health)

    def outbox_depth(self) -> int:
        return max(0, self.store.last_event_seq() - self.store.cursor(self.name))

    def _exam_completed_before(self, event: TriageResult) -> bool:
        exam = self.store.read_model.exam(event.study_uid or "")
        return exam is not None and exam.first_end_seq is not None and exam.first_end_seq < (event.seq or 0)

    def deliver(self, event: Event) -> None:
        if not event.study_uid:
            return
        if isinstance(event, ExamCompleted):
            pass
        elif isinstance(event, TriageResult) and self._exam_completed_before(event):
            pass
        else:
            return
        try:
            paths = build_exam_objects(self.store, collect_findings(self.store, event.study_uid, event), self.maps,
                                       self.folder, self.config)
        except (DicomBuildError, ValueError, AttributeError, KeyError, TypeError) as exc:
            self._write_retry.permanent(event, "build", f"{type(exc).__name__}: {exc}")
            return
        except OSError as exc:
            # the output folder is full, read-only or failing: atomic_path left no partial file; the
            # same event is retried (objects already written are found, not written again)
            if self.health is not None:
                self.health.failed("dicom_output", self.folder, exc)
            self._write_retry.transient(event, f"write: {exc.strerror or exc}", stage="write")
            return
        self._write_retry.succeeded()
        if self.health is not None:
            self.health.ok("dicom_output")
        self.written.extend(p for p in paths if p not in self.written)
        if self.sender is None:
            return
        from scanside.agent.outputs.dicom_send import PermanentSendError, TransientSendError

        try:
            self.sender.send(paths)  # type: ignore[attr-defined]
        except TransientSendError as exc:
            self._send_retry.transient(event, str(exc), stage="c-store")
            return
        except PermanentSendError as exc:
            self._send_retry.permanent(event, "c-store", str(exc))
            return
        self.sent += len(paths)
        self._send_retry.succeeded()
