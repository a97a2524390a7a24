"""Calibration and parity data from real DICOM folders, prepared exactly as the agent prepares them.

DICOM folder -> scanside.agent.dicom.exam_reader.read_exams (the daemon's read path: headers, series, split parts,
header label, the model frames) -> scanside.agent.dicom.volume.load_volume -> scanside.engines.preprocess.prepare(spec) ->
model inputs.  For a sliding-window model (``spec.window``, e.g. TAPS) each prepared series gives
ROI-sized windows at the same positions scanside.engines.preprocess.sliding_window visits; the windows
holding the most foreground are kept.

What is stored (``CalibrationSet.save``): an ``.npz`` with the input tensor (N, C, *spatial), the
header label of each sample's series (for task metrics), an opaque per-sample source id (a
hash of the series UID: no patient identifiers), its exam (hash of the study UID) and its origin.

Origin: ``simulated`` for this project's simulator (its files say so in the file meta:
ImplementationVersionName ``SCANSIDE_SIM``, or InstitutionName ``SCANSIDE SIMULATED HOSPITAL``),
``real`` for everything else.  Calibration and parity records carry the summary
(``origin_summary``) and the model store refuses, for real exams, an INT8 variant whose parity was
measured on simulated data only (scanside.engines.store.parity_refusal).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from scanside.engines.manifest import ModelManifest
from scanside.engines.spec import PreprocessSpec

log = logging.getLogger(__name__)

#: channel names a manifest may use for "any axial T2W" (TAPS says "T2W")
CHANNEL_ALIASES: Dict[str, Tuple[str, ...]] = {
    "T2W": ("T2WI_nan", "T2WI_fs"),
    "T2WI": ("T2WI_nan", "T2WI_fs"),
    "DWI": ("DWI_High",),
    "HBV": ("DWI_High",),
}
#: how this project's simulator marks its files (simulator/vendors/common.py)
SIMULATOR_IMPLEMENTATION_VERSION = "SCANSIDE_SIM"
SIMULATOR_INSTITUTION = "SCANSIDE SIMULATED HOSPITAL"
ORIGINS = ("real", "simulated")


class CalibrationDataError(ValueError):
    """No usable series / the prepared data does not fit the model."""


def _in_half_range(x: np.ndarray) -> bool:
    return bool(np.all(np.abs(x) <= np.finfo(np.float16).max))


@dataclass
class SeriesVolume:
    """One labelled, loaded series of an exam."""

    study_key: str  # hash of the StudyInstanceUID (no PHI)
    series_key: str  # hash of series id
    label: str
    plane: Optional[str]
    volume: object  # scanside.agent.dicom.volume.Volume
    origin: str = "real"  # "real" | "simulated" (file_origin)


@dataclass
class CalibrationSet:
    """Model-ready samples (N, C, *spatial) with their series labels and opaque sources."""

    inputs: np.ndarray
    labels: List[str] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)
    input_name: str = "input"
    windows: List[Tuple[int, int, int]] = field(default_factory=list)
    #: exam-level csPCa truth (1/0) per sample where a simulator ground_truth.json says so, else NaN
    targets: List[float] = field(default_factory=list)
    #: per sample: "real" | "simulated" (file_origin of its series); empty: not recorded (an older set)
    origins: List[str] = field(default_factory=list)
    #: per sample: opaque exam key (hash of the StudyInstanceUID); empty: not recorded
    studies: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def split(self, n_first: int) -> Tuple["CalibrationSet", "CalibrationSet"]:
        """Split by *series*, not sample, so that calibration and held-out data never share a series."""
        order: List[str] = []
        for s in self.sources:
            if s not in order:
                order.append(s)
        first = set(order[:n_first])
        a = [i for i, s in enumerate(self.sources) if s in first]
        b = [i for i, s in enumerate(self.sources) if s not in first]
        return self.subset(a), self.subset(b)

    def subset(self, idx: Sequence[int]) -> "CalibrationSet":
        idx = list(idx)
        return CalibrationSet(self.inputs[idx] if idx else self.inputs[:0], [self.labels[i] for i in idx],
                              [self.sources[i] for i in idx], self.input_name,
                              [self.windows[i] for i in idx] if self.windows else [],
                              [self.targets[i] for i in idx] if self.targets else [],
                              [self.origins[i] for i in idx] if self.origins else [],
                              [self.studies[i] for i in idx] if self.studies else [])

    def origin_summary(self) -> Dict[str, object]:
        """Where the samples came from: ``origin`` real / simulated / mixed (both) / unknown (not recorded),
        and how many series and exams of each."""
        out: Dict[str, object] = {"samples": len(self), "series": len(set(self.sources))}
        if self.studies:
            out["exams"] = len(set(self.studies))
        if not self.origins or len(self.origins) != len(self):
            out["origin"] = "unknown"
            return out
        for kind in ORIGINS:
            idx = [i for i, o in enumerate(self.origins) if o == kind]
            out[f"{kind}_series"] = len({self.sources[i] for i in idx})
            if self.studies:
                out[f"{kind}_exams"] = len({self.studies[i] for i in idx})
        kinds = set(self.origins)
        out["origin"] = "mixed" if kinds >= set(ORIGINS) else (kinds.pop() if len(kinds) == 1 else "unknown")
        return out

    def rounded_to_half(self) -> "CalibrationSet":
        """The same set with its inputs rounded to float16 (held as float32).  Calibration runs on these, so the
        tensors it keeps are stored at half precision without losing a bit of what was used: about half the file
        (the classifier's 18 samples: 12 -> 5.4 MB); each value moves by at most 1 part in 2048, far below the
        resolution of an INT8 range.  Inputs beyond float16's range (unnormalised, > 65504) are left as they are."""
        if not _in_half_range(self.inputs):
            return self
        return replace(self, inputs=self.inputs.astype(np.float16).astype(np.float32))

    def save(self, path: Union[str, Path]) -> Path:
        """Atomically; inputs as float16 when that is exact (a rounded_to_half set), else float32."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        x = self.inputs.astype(np.float32)
        half = x.astype(np.float16) if _in_half_range(x) else None
        stored = half if half is not None and np.array_equal(half.astype(np.float32), x) else x  # only if lossless
        np.savez_compressed(tmp, inputs=stored, labels=np.asarray(self.labels, dtype=str),
                            sources=np.asarray(self.sources, dtype=str), input_name=np.asarray(self.input_name),
                            windows=np.asarray(self.windows, dtype=np.int64).reshape(-1, 3),
                            targets=np.asarray(self.targets, dtype=np.float64),
                            origins=np.asarray(self.origins, dtype=str), studies=np.asarray(self.studies, dtype=str))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CalibrationSet":
        with np.load(path, allow_pickle=False) as z:
            win = [tuple(int(v) for v in w) for w in z["windows"]] if "windows" in z else []
            tg = [float(v) for v in z["targets"]] if "targets" in z else []
            extra = {k: [str(x) for x in z[k]] for k in ("origins", "studies") if k in z}
            return cls(inputs=z["inputs"].astype(np.float32), labels=[str(x) for x in z["labels"]],
                       sources=[str(x) for x in z["sources"]], input_name=str(z["input_name"]),
                       windows=win, targets=tg, **extra)  # type: ignore[arg-type]

    def feeds(self, batch: int = 1) -> Iterator[Dict[str, np.ndarray]]:
        for i in range(0, len(self), batch):
            yield {self.input_name: np.ascontiguousarray(self.inputs[i:i + batch])}


def _opaque(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def file_origin(path: Union[str, Path]) -> str:
    """"simulated" when *path* is a file of this project's simulator (its file meta / institution say so),
    else "real" (anything else a scanner or another tool wrote)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["InstitutionName"])
    except Exception:  # unreadable here: the series reader decides what to do with the file
        return "real"
    meta = getattr(ds, "file_meta", None)
    impl = str(getattr(meta, "ImplementationVersionName", "") or "").strip() if meta is not None else ""
    inst = str(ds.get("InstitutionName", "") or "").strip()
    return "simulated" if impl == SIMULATOR_IMPLEMENTATION_VERSION or inst == SIMULATOR_INSTITUTION else "real"


def _loaded(roots: Union[str, Path, Sequence[Union[str, Path]]], want: Optional[set],
            want_planes: Optional[set]) -> List[SeriesVolume]:
    """The series of every exam under *roots* as the daemon reads them (scanside.agent.dicom.exam_reader: grouping, header
    label, the model frames), those with a wanted label and plane loaded; unloadable ones skipped and logged."""
    from scanside.agent.dicom.exam_reader import read_exams
    from scanside.agent.dicom.volume import VolumeError

    out: List[SeriesVolume] = []
    for exam in read_exams(roots):
        for s in exam.series:
            label, plane = s.summary.label, s.summary.plane
            if (want is not None and label not in want) or (want_planes is not None and plane not in want_planes):
                continue
            try:
                vol = s.volume()
            except (VolumeError, ValueError, OSError) as e:
                log.info("calibration data: series %s not loadable (%s)", _opaque(s.series_id), type(e).__name__)
                continue
            origin = file_origin(s.part.refs[0].path) if s.part.refs else "real"
            out.append(SeriesVolume(_opaque(exam.study_uid), _opaque(s.series_id), label, plane, vol, origin))
    return out


def read_series(roots: Union[str, Path, Sequence[Union[str, Path]]], *, labels: Optional[Iterable[str]] = None,
                planes: Optional[Iterable[str]] = ("axial",)) -> List[SeriesVolume]:
    """Every loadable series under *roots*, labelled by the agent's header rules.  Files that are not
    DICOM, unreadable or whose series cannot form a volume are skipped (and logged without PHI)."""
    return _loaded(roots, set(labels) if labels is not None else None, set(planes) if planes is not None else None)


def read_series_whole(roots: Union[str, Path, Sequence[Union[str, Path]]]) -> List[SeriesVolume]:
    """Every series of every plane, one volume each as the sequence classifier sees it
    (scanside.agent.dicom.exam_reader.model_frames: one orientation, the middle temporal phase, one frame per
    position), labelled by the header rules -- the inputs of a model whose channel is "series"."""
    return _loaded(roots, None, None)


def exam_truth(roots: Union[str, Path, Sequence[Union[str, Path]]]) -> Dict[str, float]:
    """study key -> csPCa (1.0/0.0) from simulator ground_truth.json files under *roots* (if any)."""
    import json

    if isinstance(roots, (str, Path)):
        roots = [roots]
    out: Dict[str, float] = {}
    for root in roots:
        for gt in Path(root).rglob("ground_truth.json"):
            try:
                d = json.loads(gt.read_text(encoding="utf-8"))
                out[_opaque(str(d["study_uid"]))] = 1.0 if d.get("cspca") else 0.0
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return out


def channel_labels(channel: str) -> Tuple[str, ...]:
    return CHANNEL_ALIASES.get(channel, (channel,))


def exam_channel_volumes(series: Sequence[SeriesVolume], spec: PreprocessSpec) -> List[Tuple[str, str, Dict[str, object]]]:
    """Per study: (study key, first channel's series key, {channel: Volume}) for studies that have every channel.
    A study with several series for the first channel yields one entry per such series."""
    studies: Dict[str, List[SeriesVolume]] = {}
    for s in series:
        studies.setdefault(s.study_key, []).append(s)
    out = []
    for study, items in sorted(studies.items()):
        first = [s for s in items if s.label in channel_labels(spec.channels[0])]
        for lead in first:
            vols: Dict[str, object] = {spec.channels[0]: lead.volume}
            for ch in spec.channels[1:]:
                match = next((s for s in items if s.label in channel_labels(ch)), None)
                if match is None:
                    break
                vols[ch] = match.volume
            else:
                out.append((study, lead.series_key, vols))
    return out


def window_starts(shape: Sequence[int], spec: PreprocessSpec) -> List[Tuple[int, int, int]]:
    """Window origins scanside.engines.preprocess.sliding_window visits on a (padded) array of *shape*."""
    from scanside.engines.preprocess import _starts

    assert spec.window is not None
    roi = spec.window.roi
    psize = [max(s, r) for s, r in zip(shape, roi)]
    return [(i, j, k) for i in _starts(psize[0], roi[0], spec.window.overlap)
            for j in _starts(psize[1], roi[1], spec.window.overlap)
            for k in _starts(psize[2], roi[2], spec.window.overlap)]


def extract_windows(array: np.ndarray, spec: PreprocessSpec, max_windows: Optional[int] = None
                    ) -> List[Tuple[Tuple[int, int, int], np.ndarray]]:
    """ROI windows of a prepared (C, d0, d1, d2) array, padded like sliding_window: most foreground first,
    then nearest the centre."""
    assert spec.window is not None
    roi = tuple(int(r) for r in spec.window.roi)
    size = array.shape[1:]
    pad = [(max(0, r - s) // 2, max(0, r - s) - max(0, r - s) // 2) for r, s in zip(roi, size)]
    a = np.pad(array, [(0, 0)] + pad) if any(p != (0, 0) for p in pad) else array
    centre = (np.asarray(a.shape[1:], dtype=float) - 1) / 2
    wins = []
    for (i, j, k) in window_starts(size, spec):
        w = a[:, i:i + roi[0], j:j + roi[1], k:k + roi[2]]
        fg = round(float(np.count_nonzero(w)) / w.size, 2)
        dist = float(np.linalg.norm(np.asarray((i, j, k)) + (np.asarray(roi) - 1) / 2 - centre))
        wins.append(((i, j, k), (-fg, dist), np.ascontiguousarray(w, dtype=np.float32)))
    # most foreground first, then nearest the field-of-view centre (where the technologist puts the prostate)
    wins.sort(key=lambda t: t[1])
    if max_windows is not None:
        wins = wins[:max_windows]
    return [(s, w) for s, _, w in wins]


def _check_fits(manifest: ModelManifest, sample: np.ndarray) -> None:
    spec = manifest.inputs[0]
    want = spec.shape[1:]
    if len(want) != sample.ndim:
        raise CalibrationDataError(f"{manifest.ref}: prepared sample has shape {list(sample.shape)}, the model takes "
                                   f"{spec.shape} (rank differs): check the manifest's preprocessing")
    for a, (w, g) in enumerate(zip(want, sample.shape)):
        if isinstance(w, int) and w != g:
            raise CalibrationDataError(f"{manifest.ref}: prepared sample axis {a + 1} is {g}, the model's input "
                                       f"{spec.name!r} takes {w} ({spec.shape}): check the preprocessing shape/window")


def build_set(manifest: ModelManifest, roots: Union[str, Path, Sequence[Union[str, Path]]], *,
              max_samples: Optional[int] = None, windows_per_series: int = 2,
              series: Optional[Sequence[SeriesVolume]] = None) -> CalibrationSet:
    """Model inputs from the DICOM folders *roots* (or already read *series*), prepared with the
    manifest's PreprocessSpec.  Sliding-window models: up to *windows_per_series* windows each."""
    if manifest.preprocessing is None:
        raise CalibrationDataError(f"{manifest.ref}: the manifest has no preprocessing spec; "
                                   "calibration data must be prepared as the agent prepares it")
    if len(manifest.inputs) != 1:
        raise CalibrationDataError(f"{manifest.ref}: {len(manifest.inputs)} inputs; calibration supports one")
    from scanside.engines.preprocess import prepare

    spec = manifest.preprocessing
    if list(spec.channels) == ["series"]:  # a series classifier: every series is one sample, labelled by its header
        return _series_set(manifest, roots, series, max_samples)
    wanted = {lab for ch in spec.channels for lab in channel_labels(ch)}
    if series is None:
        series = read_series(roots, labels=wanted)
    studies = exam_channel_volumes(series, spec)
    if not studies:
        found = sorted({s.label for s in series})
        raise CalibrationDataError(f"{manifest.ref}: no exam with all channels {spec.channels} "
                                   f"(axial series found: {found or 'none'})")
    samples: List[np.ndarray] = []
    labels: List[str] = []
    sources: List[str] = []
    starts: List[Tuple[int, int, int]] = []
    label_of = {s.series_key: s.label for s in series}
    origin_of = {s.series_key: s.origin for s in series}
    truth = exam_truth(roots) if roots is not None else {}
    targets: List[float] = []
    origins: List[str] = []
    studies_of: List[str] = []
    for study, key, vols in studies:
        arr, _grid = prepare(vols, spec)  # type: ignore[arg-type]
        if spec.window is not None:
            items = extract_windows(arr, spec, windows_per_series)
        else:
            items = [((0, 0, 0), arr)]
        for st, w in items:
            _check_fits(manifest, w)
            samples.append(w)
            labels.append(label_of.get(key, ""))
            sources.append(key)
            starts.append(st)
            targets.append(truth.get(study, float("nan")))
            origins.append(origin_of.get(key, "real"))
            studies_of.append(study)
            if max_samples is not None and len(samples) >= max_samples:
                break
        if max_samples is not None and len(samples) >= max_samples:
            break
    return CalibrationSet(np.stack(samples).astype(np.float32), labels, sources, manifest.inputs[0].name, starts,
                          targets, origins, studies_of)


def _series_set(manifest: ModelManifest, roots: Union[None, str, Path, Sequence[Union[str, Path]]],
                series: Optional[Sequence[SeriesVolume]], max_samples: Optional[int]) -> CalibrationSet:
    """Classifier inputs, one per series, prepared as scanside.engines.tasks.image_label prepares them; samples are taken
    round-robin over the header labels so a capped set still holds every class."""
    from scanside.engines.preprocess import prepare

    spec = manifest.preprocessing
    assert spec is not None
    if series is None:
        series = read_series_whole(roots)  # type: ignore[arg-type]
    if not series:
        raise CalibrationDataError(f"{manifest.ref}: no loadable series")
    by_label: Dict[str, List[SeriesVolume]] = {}
    for s in series:
        by_label.setdefault(s.label, []).append(s)
    order: List[SeriesVolume] = []
    queues = [list(v) for _, v in sorted(by_label.items())]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    if max_samples is not None:
        order = order[:max_samples]
    arrs = []
    for s in order:
        vol = s.volume
        a = np.asarray(vol.array)  # type: ignore[attr-defined]
        if not np.isfinite(a).all():  # as scanside.engines.tasks.image_label.ImageClassifier.prepare
            from scanside.agent.dicom.volume import Volume

            vol = Volume.from_array_affine(np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0),
                                           vol.array_affine)  # type: ignore[attr-defined]
        arr, _ = prepare({spec.channels[0]: vol}, spec)  # type: ignore[dict-item]
        _check_fits(manifest, arr)
        arrs.append(arr.astype(np.float32))
    return CalibrationSet(np.stack(arrs), [s.label for s in order], [s.series_key for s in order],
                          manifest.inputs[0].name, [(0, 0, 0)] * len(order), [float("nan")] * len(order),
                          [s.origin for s in order], [s.study_key for s in order])
