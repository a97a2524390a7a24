"""One read path for exams: what the daemon sees of a folder of DICOM, for everything that reads exams.

``read_exam(folder)`` groups and labels the series of one exam exactly as the daemon does:
scanside.agent.dicom.header.read_header (header only, the same guards) -> one acquisition per SeriesInstanceUID,
duplicate SOP instances dropped -> scanside.agent.dicom.series.split_parts (multi-b diffusion split per b-value,
appended ADC pulled out) -> scanside.agent.dicom.series.summarise (scanside.agent.dicom.classify's header label, plane, slab, ...).
Files that are not usable DICOM are counted by reason, never raised. No state and no configuration:
the daemon's pipeline reaches the same summaries through its SQLite-backed assembler.

The pure selection functions take series summaries, so that the daemon (scanside.agent.analysis.analysis, on the
summaries of its event log) and every evaluation, calibration set and benchmark (on ``read_exam``'s)
pick the same series:

* ``triage_inputs``: the csPCa model's axial T2W / ADC / high-b DWI;
* ``gland_input``: the axial T2W the gland model segments;
* ``classifier_inputs``: the series the sequence classifier labels;

and ``model_frames`` the frames of a series that make the one volume a model gets
(scanside.agent.dicom.frames.select_frames: one orientation, the middle temporal phase, one frame per slice).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from scanside.agent.schema.events import SeriesSummary
from scanside.agent.dicom.header import FrameRef, HeaderError, InstanceHeader, read_header
from scanside.agent.dicom.series import SeriesPart, expected_images, split_parts, summarise

log = logging.getLogger(__name__)

T2_LABELS = ("T2WI_nan", "T2WI_fs")  # preference order: non-fat-suppressed first
TRIAGE_MIN_B = 1400.0  # PI-RADS v2.1 high b (acquired or calculated); [analysis] triage_min_b


# ---------------------------------------------------------------------------------------- selection
def _newest(xs: Sequence[SeriesSummary]) -> SeriesSummary:
    return max(xs, key=lambda s: (s.series_number or 0, s.revision))


def _axial_complete(summaries: Iterable[SeriesSummary]) -> List[SeriesSummary]:
    return [s for s in summaries if s.plane == "axial" and s.complete]


def gland_input(summaries: Iterable[SeriesSummary]) -> Optional[SeriesSummary]:
    """The axial T2W the gland is taken from: the newest complete T2WI_nan, else T2WI_fs."""
    axial = _axial_complete(summaries)
    for label in T2_LABELS:
        t2 = [s for s in axial if s.label == label]
        if t2:
            return _newest(t2)
    return None


def triage_inputs(summaries: Iterable[SeriesSummary], *, min_b: float = TRIAGE_MIN_B,
                  exam_over: bool = True) -> Optional[Dict[str, SeriesSummary]]:
    """{"T2W", "ADC", "HBV"}: the axial T2W (``gland_input``), the newest axial ADC and the axial high-b
    DWI with the highest b, all complete; None while one is missing. While the exam goes on
    (``exam_over=False``) the high b must reach ``min_b``, so that a b800 series does not trigger a run
    that the calculated b1400 then repeats; once the exam is over the highest b there is will do."""
    summaries = list(summaries)
    axial = _axial_complete(summaries)
    t2 = gland_input(summaries)
    adc = [s for s in axial if s.label == "ADC"]
    hbv = [s for s in axial if s.label == "DWI_High" and s.b_values and (exam_over or max(s.b_values) >= min_b)]
    if t2 is None or not adc or not hbv:
        return None
    return {"T2W": t2, "ADC": _newest(adc),
            "HBV": max(hbv, key=lambda s: (max(s.b_values), s.series_number or 0))}


def classifier_inputs(summaries: Iterable[SeriesSummary]) -> List[SeriesSummary]:
    """The series the sequence classifier labels: every MR series that holds images (complete or not:
    a series closed short of its count is still what the scanner sent). A CT or ultrasound series sent to
    the same folder is not an input of an MR sequence classifier: what it made of one would be noise."""
    return [s for s in summaries if s.n_images > 0 and s.modality == "MR"]


def model_frames(part: SeriesPart) -> List[FrameRef]:
    """The frames of a series that make the one volume every image model gets."""
    from scanside.agent.dicom.frames import select_frames

    return select_frames(part.refs, part.frames)


# ---------------------------------------------------------------------------------------- reading
@dataclass
class ExamSeries:
    """One logical series of an exam: its summary (as the daemon records it) and where its frames are."""

    summary: SeriesSummary
    part: SeriesPart

    @property
    def series_id(self) -> str:
        return self.summary.series_id

    def frames(self) -> List[FrameRef]:
        return model_frames(self.part)

    def volume(self, cache: Optional[dict] = None) -> Any:
        """The series' volume as the models take it (scanside.agent.dicom.volume.load_volume of ``frames()``)."""
        from scanside.agent.dicom.volume import load_volume

        return load_volume(self.frames(), cache=cache)


@dataclass
class Exam:
    study_uid: str
    series: List[ExamSeries]
    skipped: Dict[str, int] = field(default_factory=dict)  # files not used, by reason (shared by a folder's exams)

    def summaries(self) -> List[SeriesSummary]:
        return [s.summary for s in self.series]

    def get(self, series_id: str) -> ExamSeries:
        for s in self.series:
            if s.series_id == series_id:
                return s
        raise KeyError(series_id)

    def volumes(self, chosen: Dict[str, SeriesSummary]) -> Dict[str, Any]:
        """{channel: Volume} of a selection (e.g. ``triage_inputs(exam.summaries())``)."""
        return {ch: self.get(s.series_id).volume() for ch, s in chosen.items()}


def _files(root: Path) -> List[str]:
    """Every file under *root*, hidden files and folders skipped, in a stable order (as the daemon's folder
    walk, scanside.agent.intake.ingest.walk, which this decoding-side module does not import)."""
    if root.is_file():
        return [str(root)]
    out: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith(".")]
    return out


def read_exams(folders: Union[str, Path, Sequence[Union[str, Path]]], *,
               max_image_bytes: Optional[int] = None) -> List[Exam]:
    """Every exam (study) under *folders*, its series grouped, split and labelled as the daemon does
    (see the module doc), sorted by study; series in SeriesNumber order."""
    roots = [folders] if isinstance(folders, (str, Path)) else list(folders)
    by_series: Dict[str, List[InstanceHeader]] = {}
    seen: set[str] = set()
    skipped: Counter = Counter()
    for root in roots:
        for path in _files(Path(root)):
            try:
                h = read_header(path, max_image_bytes)
            except HeaderError as e:
                skipped[e.reason] += 1
                continue
            except Exception as e:  # bad input never crashes a reader (read_header should have said why)
                skipped[type(e).__name__] += 1
                continue
            if h.sop_instance_uid in seen:  # the daemon records a second copy as a duplicate
                skipped["duplicate"] += 1
                continue
            seen.add(h.sop_instance_uid)
            by_series.setdefault(h.series_uid, []).append(h)
    studies: Dict[str, List[ExamSeries]] = {}
    for headers in by_series.values():
        # as scanside.agent.intake.assembler.SeriesAssembler: the largest count any header declares, complete when reached
        declared = [n for n in (expected_images(h) for h in headers) if n is not None]
        expected = max(declared) if declared else None
        n_images = sum(h.n_images for h in headers)
        complete = expected is None or n_images >= expected
        for part in split_parts(headers):
            summary = summarise(part, 1, complete, expected)
            studies.setdefault(summary.study_uid, []).append(ExamSeries(summary, part))
    if skipped:
        log.info("read_exams: files not used: %s", dict(skipped))
    return [Exam(uid, sorted(items, key=lambda s: (s.summary.series_number or 0, s.summary.series_id)), dict(skipped))
            for uid, items in sorted(studies.items())]


def read_exam(folder: Union[str, Path], *, max_image_bytes: Optional[int] = None) -> Exam:
    """The one exam in *folder* (ValueError when it holds none or several: use ``read_exams``)."""
    exams = read_exams(folder, max_image_bytes=max_image_bytes)
    if len(exams) != 1:
        raise ValueError(f"expected one exam, found {len(exams)} (use read_exams for a folder of several)")
    return exams[0]
