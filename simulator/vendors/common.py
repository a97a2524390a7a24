"""Vendor-neutral DICOM writing: study context, UIDs, pixel scaling, the modules every MR
image carries, and a base writer that vendors specialise through hooks.

What each writer puts in the counting attributes the agent's completion logic reads
-----------------------------------------------------------------------------------
* ``ImagesInAcquisition (0020,1002)``: the number of 2D images the series holds in total
  (every b-value, every derived image appended to it, e.g. Philips' ADC; for Siemens mosaics
  the number of *slices* (tiles) summed over all mosaics, not the number of files).
* Dynamic (DCE) series: ``(0020,1002)`` = slices per temporal position,
  ``NumberOfTemporalPositions (0020,0105)`` = number of phases and
  ``TemporalPositionIdentifier (0020,0100)`` = 1..n on each image; total images = product.
* Enhanced multi-frame (Siemens XA, Philips with ``enhanced=True``): one file per series,
  ``NumberOfFrames`` = all frames; (0020,1002) is also written with the same total and, for
  DCE, (0020,0105) with the number of temporal positions (each frame carries
  TemporalPositionIndex in its FrameContentSequence).
Vendors do not override these rules; the per-vendor modules document anything extra.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DSequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from scanside.simulator.model import RenderedImage, RenderedSeries, SeriesSpec
from scanside.simulator.render import ACQUISITION_FIELDS

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
EPI_KINDS = ("dwi", "adc", "calc_bvalue")
MAX_STORED = 4095  # 12 bits stored, as MR scanners do

_FIRST = ["ALBERT", "BRUNO", "CARL", "DIETER", "EMIL", "FRANZ", "GUSTAV", "HUGO", "IVAN", "JONAS", "KURT", "LEON"]


@dataclass(frozen=True)
class StudyContext:
    """Everything shared by the series of one simulated exam (patient, study, equipment)."""

    seed: int
    vendor: str
    field_strength_t: float
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    patient_age: str
    patient_weight_kg: float
    patient_size_m: float
    accession_number: str
    study_uid: str
    study_id: str
    study_date: str
    study_time: str
    study_description: str
    frame_of_reference_uid: str
    institution_name: str = "SCANSIDE SIMULATED HOSPITAL"
    station_name: str = ""
    device_serial_number: str = ""
    referring_physician: str = "SIMULATED^REFERRER"
    operator: str = "SIMULATED^TECH"
    #: stored-value scale of each DWI acquisition written so far: a calculated b-value image is stored on
    #: its source's scale, as a scanner does (ProstateX's CALC_BVAL b1600 and its b0: one scale)
    acquisition_scales: dict = field(default_factory=dict, compare=False, hash=False)

    def uid(self, *parts: object) -> str:
        """A deterministic UID below this study (same seed and parts -> same UID)."""
        return generate_uid(entropy_srcs=[self.study_uid, *[str(p) for p in parts]])

    def time_at(self, seconds_after_start: float) -> str:
        """A DICOM TM ``seconds_after_start`` after the study time (wraps at midnight)."""
        h, m, s = int(self.study_time[:2]), int(self.study_time[2:4]), float(self.study_time[4:])
        t = (h * 3600 + m * 60 + s + seconds_after_start) % 86400
        return f"{int(t // 3600):02d}{int(t % 3600 // 60):02d}{t % 60:09.6f}"


def make_study_context(vendor: str, seed: int, field_strength_t: float = 3.0, *, key: Sequence[object] = (),
                       study_description: str = "MRI PROSTATE W/WO CONTRAST") -> StudyContext:
    """Synthetic but realistic-looking patient/study identity, a function of the seed only
    (``key`` adds to the UID entropy, e.g. faults and profile, so variants do not collide)."""
    rnd = random.Random(f"scanside-sim-{seed}")
    num = rnd.randrange(1000, 10000)
    first = _FIRST[rnd.randrange(len(_FIRST))]
    birth = date(1940, 1, 1) + timedelta(days=rnd.randrange(0, 35 * 365))
    study_day = date(2024, 1, 1) + timedelta(days=rnd.randrange(0, 700))
    age = study_day.year - birth.year - ((study_day.month, study_day.day) < (birth.month, birth.day))
    hh, mm, ss = rnd.randrange(7, 18), rnd.randrange(60), rnd.randrange(60)
    study_uid = generate_uid(entropy_srcs=["scanside-sim", str(seed), vendor, f"{field_strength_t:g}", *[str(k) for k in key]])
    serial = {"siemens": "16", "siemens-xa": "17", "ge": "0000", "philips": "4"}.get(vendor, "")
    return StudyContext(
        seed=seed,
        vendor=vendor,
        field_strength_t=float(field_strength_t),
        patient_name=f"SIMULATED^PATIENT{num}^{first}",
        patient_id=f"SIMPID{seed:05d}{num}",
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_sex="M",
        patient_age=f"{age:03d}Y",
        patient_weight_kg=float(rnd.randrange(60, 110)),
        patient_size_m=round(rnd.uniform(1.62, 1.92), 2),
        accession_number=f"SIMACC{rnd.randrange(10**7, 10**8)}",
        study_uid=study_uid,
        study_id=str(rnd.randrange(1000, 99999)),
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{hh:02d}{mm:02d}{ss:02d}.000000",
        study_description=study_description,
        frame_of_reference_uid=generate_uid(entropy_srcs=[study_uid, "frame-of-reference"]),
        station_name=f"SIMMR{rnd.randrange(100, 999)}",
        device_serial_number=f"{serial}{rnd.randrange(10000, 99999)}",
    )


@dataclass
class WrittenFile:
    path: Path
    sop_instance_uid: str
    images: list[RenderedImage] = field(default_factory=list)  # the 2D images it carries, in order

    @property
    def n_images(self) -> int:
        return len(self.images)


# ----------------------------------------------------------------------------------- helpers

def ds_str(x: float, digits: int = 6) -> str:
    """A DS value (<= 16 characters)."""
    s = f"{x:.{digits}g}"
    if s == "-0":
        s = "0"
    while len(s) > 16:
        digits -= 1
        s = f"{x:.{digits}g}"
    return s


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    r = np.asarray(orientation[:3], float)
    c = np.asarray(orientation[3:], float)
    return np.cross(r, c)


def slice_location(img: RenderedImage) -> float:
    return float(np.dot(slice_normal(img.orientation), np.asarray(img.position, float)))


def derived_rank(img: RenderedImage) -> int:
    return {None: 0, "TRACE": 0, "CALC_BVALUE": 1, "ADC": 2}.get(img.derived, 3)


def is_directional(img: RenderedImage) -> bool:
    return img.direction is not None and any(abs(v) > 1e-6 for v in img.direction)


def image_sort_key(img: RenderedImage):
    """Acquisition order: phase, then derived maps last, b-value, direction, slice."""
    return (img.temporal_index, derived_rank(img), img.b_value if img.b_value is not None else -1.0,
            tuple(img.direction) if is_directional(img) else (9.0, 9.0, 9.0), img.slice_index)


def series_scale(images: Sequence[RenderedImage]) -> float:
    """One stored-value scale for a series' magnitude images (ADC keeps its own units)."""
    peak = max((float(np.max(im.pixels)) for im in images if im.derived != "ADC" and im.pixels.size), default=0.0)
    if not math.isfinite(peak) or peak <= 0:
        return 1.0
    return 0.95 * MAX_STORED / peak


def to_stored(pixels: np.ndarray, scale: float) -> np.ndarray:
    a = np.nan_to_num(np.asarray(pixels, np.float64) * scale, nan=0.0, posinf=MAX_STORED, neginf=0.0)
    return np.clip(np.rint(a), 0, MAX_STORED).astype("<u2")


def image_scale(img: RenderedImage, scale: float) -> float:
    return 1.0 if img.derived == "ADC" else scale


def b_label(b: Optional[float]) -> str:
    return "" if b is None else f"{int(round(b))}"


@dataclass
class SeriesInfo:
    """Derived facts about a series that writers need on every image."""

    spec: SeriesSpec
    n_images: int  # 2D images in the series
    n_phases: int
    slices_per_phase: int
    b_values: list[float]  # acquired/derived b-values present (excluding ADC)
    scale: float

    @property
    def images_in_acquisition(self) -> int:
        return self.slices_per_phase if self.spec.kind == "dce" and self.n_phases > 1 else self.n_images


def series_info(rendered: RenderedSeries, images: Sequence[RenderedImage], scale: float) -> SeriesInfo:
    phases = sorted({im.temporal_index for im in images})
    n_phases = max(len(phases), 1)
    per_phase = sum(1 for im in images if im.temporal_index == phases[0]) if phases else 0
    bvals = sorted({float(im.b_value) for im in images if im.b_value is not None and im.derived != "ADC"})
    return SeriesInfo(rendered.spec, len(images), n_phases, per_phase, bvals, scale)


# ------------------------------------------------------------------------------- base writer

class VendorWriter:
    """Shared DICOM construction; vendors override the hooks at the bottom."""

    vendor = "generic"
    manufacturer = "GENERIC"
    model_name = "GENERIC MR"
    software_versions = "1.0"
    default_enhanced = False
    supports_mosaic = False
    file_prefix = "IM"
    transfer_syntax = ExplicitVRLittleEndian

    # ---------------------------------------------------------------- public entry point
    def write_series(self, rendered: RenderedSeries, ctx: StudyContext, out_dir: Path, *, series_number: int,
                     series_uid: str, enhanced: Optional[bool] = None, mosaic: bool = False) -> list[WrittenFile]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        enhanced = self.default_enhanced if enhanced is None else bool(enhanced)
        images = sorted(rendered.images, key=image_sort_key)
        if not images:
            return []
        info = series_info(rendered, images, self._scale(rendered, images, ctx))
        if enhanced:
            return [self._write_enhanced(images, info, ctx, out_dir, series_number, series_uid)]
        if mosaic and self.supports_mosaic and rendered.spec.kind in EPI_KINDS:
            return self._write_mosaics(images, info, ctx, out_dir, series_number, series_uid)
        return self._write_classic(images, info, ctx, out_dir, series_number, series_uid)

    @staticmethod
    def _scale(rendered: RenderedSeries, images: Sequence[RenderedImage], ctx: StudyContext) -> float:
        """The series' stored-value scale: its own (peak at 95 % of the stored range), except that a calculated
        b-value image takes the scale of the DWI acquisition it was computed from."""
        key = rendered.spec.model_dump_json(include=ACQUISITION_FIELDS)
        if rendered.spec.kind == "calc_bvalue" and key in ctx.acquisition_scales:
            return ctx.acquisition_scales[key]
        scale = series_scale(images)
        if rendered.spec.kind == "dwi":
            ctx.acquisition_scales[key] = scale
        return scale

    # ---------------------------------------------------------------- common modules
    def new_dataset(self, sop_class: str, sop_uid: str) -> Dataset:
        ds = Dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = self.transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "SCANSIDE_SIM"
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        return ds

    def series_time(self, ctx: StudyContext, series_number: int) -> str:
        return ctx.time_at(60.0 * series_number)

    def add_common(self, ds: Dataset, ctx: StudyContext, info: SeriesInfo, sop_class: str, sop_uid: str,
                   series_number: int, series_uid: str, image_type: Sequence[str]) -> None:
        spec = info.spec
        stime = self.series_time(ctx, series_number)
        ds.ImageType = list(image_type)
        ds.InstanceCreationDate = ctx.study_date
        ds.InstanceCreationTime = stime
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ctx.study_date
        ds.SeriesDate = ctx.study_date
        ds.AcquisitionDate = ctx.study_date
        ds.ContentDate = ctx.study_date
        ds.StudyTime = ctx.study_time
        ds.SeriesTime = stime
        ds.AcquisitionTime = stime
        ds.ContentTime = stime
        ds.AccessionNumber = ctx.accession_number
        ds.Modality = "MR"
        ds.Manufacturer = self.manufacturer
        ds.InstitutionName = ctx.institution_name
        ds.ReferringPhysicianName = ctx.referring_physician
        ds.StationName = ctx.station_name
        ds.StudyDescription = ctx.study_description
        ds.SeriesDescription = spec.description
        ds.OperatorsName = ctx.operator
        ds.ManufacturerModelName = self.model_name
        ds.PatientName = ctx.patient_name
        ds.PatientID = ctx.patient_id
        ds.PatientBirthDate = ctx.patient_birth_date
        ds.PatientSex = ctx.patient_sex
        ds.PatientAge = ctx.patient_age
        ds.PatientSize = ds_str(ctx.patient_size_m)
        ds.PatientWeight = ds_str(ctx.patient_weight_kg)
        ds.BodyPartExamined = "PROSTATE"
        ds.DeviceSerialNumber = ctx.device_serial_number
        ds.SoftwareVersions = self.software_versions
        ds.ProtocolName = self.protocol_name(spec)
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = ctx.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ctx.study_id
        ds.SeriesNumber = series_number
        ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.MagneticFieldStrength = ds_str(ctx.field_strength_t)

    def add_pixels(self, ds: Dataset, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype="<u2")
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        if arr.ndim == 3:
            ds.NumberOfFrames = arr.shape[0]
        ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = arr.tobytes()

    def add_classic_mr(self, ds: Dataset, info: SeriesInfo, img: RenderedImage, *, rows: int, cols: int) -> None:
        """MR Image module + acquisition parameters of a classic (single-frame) image."""
        spec = info.spec
        ss, sv = self.scanning_sequence(spec)
        ds.ScanningSequence = ss
        ds.SequenceVariant = sv
        ds.ScanOptions = self.scan_options(spec)
        ds.MRAcquisitionType = "3D" if spec.kind == "dce" else "2D"
        ds.SequenceName = self.sequence_name(spec, img)
        ds.AngioFlag = "N"
        ds.SliceThickness = ds_str(spec.slice_thickness_mm)
        ds.RepetitionTime = ds_str(spec.tr_ms)
        ds.EchoTime = ds_str(spec.te_ms)
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = ds_str(42.576 * info_field(self, ds), 9)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.SpacingBetweenSlices = ds_str(spec.slice_thickness_mm + spec.slice_gap_mm)
        ds.NumberOfPhaseEncodingSteps = str(spec.encoding_steps[1])
        ds.EchoTrainLength = str(self.echo_train_length(spec))
        ds.PercentSampling = "100"
        ds.PercentPhaseFieldOfView = ds_str(100.0 * spec.fov_mm[0] / spec.fov_mm[1] if spec.fov_mm[1] else 100.0)
        ds.PixelBandwidth = ds_str(1500.0 if spec.kind in EPI_KINDS else 200.0)
        ds.AcquisitionMatrix = [0, spec.encoding_steps[0], spec.encoding_steps[1], 0]
        ds.InPlanePhaseEncodingDirection = "COL"
        ds.FlipAngle = ds_str(spec.flip_angle_deg)
        ds.VariableFlipAngleFlag = "N"
        ds.SAR = ds_str(0.5)
        ds.dBdt = "0"
        ds.PatientPosition = "FFS"
        if spec.kind == "dce" and info.n_phases > 1:
            ds.TemporalPositionIdentifier = img.temporal_index + 1
            ds.NumberOfTemporalPositions = info.n_phases
            ds.TemporalResolution = ds_str(spec.temporal_resolution_s * 1000.0)
            ds.TriggerTime = ds_str(img.trigger_time_ms)
        ds.ImagesInAcquisition = info.images_in_acquisition

    def add_plane(self, ds: Dataset, img: RenderedImage, position: Optional[Sequence[float]] = None) -> None:
        pos = img.position if position is None else position
        ds.ImagePositionPatient = [ds_str(float(v)) for v in pos]
        ds.ImageOrientationPatient = [ds_str(float(v), 8) for v in img.orientation]
        ds.SliceLocation = ds_str(slice_location(img))
        ds.PixelSpacing = [ds_str(float(v)) for v in img.pixel_spacing]

    def add_window(self, ds: Dataset, arr: np.ndarray) -> None:
        hi = float(np.percentile(arr, 99.5)) if arr.size else 1.0
        hi = max(hi, 1.0)
        ds.WindowCenter = ds_str(round(hi / 2))
        ds.WindowWidth = ds_str(round(hi))

    def save(self, ds: Dataset, path: Path) -> None:
        ds.save_as(path, enforce_file_format=True)

    # ---------------------------------------------------------------- classic / mosaic
    def _write_classic(self, images, info, ctx, out_dir, series_number, series_uid) -> list[WrittenFile]:
        spec = info.spec
        out: list[WrittenFile] = []
        acq_numbers = self.acquisition_numbers(images)
        for n, img in enumerate(images, start=1):
            sop_uid = ctx.uid(series_uid, "sop", n)
            ds = self.new_dataset(MR_IMAGE_STORAGE, sop_uid)
            self.add_common(ds, ctx, info, MR_IMAGE_STORAGE, sop_uid, series_number, series_uid,
                            self.image_type(spec, img))
            arr = to_stored(img.pixels, image_scale(img, info.scale))
            rows, cols = arr.shape
            self.add_classic_mr(ds, info, img, rows=rows, cols=cols)
            ds.AcquisitionNumber = acq_numbers[n - 1]
            ds.InstanceNumber = n
            ds.AcquisitionTime = ctx.time_at(60.0 * series_number + img.trigger_time_ms / 1000.0)
            ds.ContentTime = ds.AcquisitionTime
            self.add_plane(ds, img)
            self.add_classic_private(ds, info, img, ctx)
            self.add_window(ds, arr)
            self.add_pixels(ds, arr)
            path = out_dir / f"{self.file_prefix}_{n:04d}.dcm"
            self.save(ds, path)
            out.append(WrittenFile(path, sop_uid, [img]))
        return out

    def acquisition_numbers(self, images: Sequence[RenderedImage]) -> list[int]:
        keys: dict = {}
        out = []
        for im in images:
            k = (im.temporal_index, derived_rank(im), im.b_value, tuple(im.direction) if is_directional(im) else None)
            keys.setdefault(k, len(keys) + 1)
            out.append(keys[k])
        return out

    def _write_mosaics(self, images, info, ctx, out_dir, series_number, series_uid) -> list[WrittenFile]:
        raise NotImplementedError(f"{self.vendor} does not write mosaics")

    # ---------------------------------------------------------------- enhanced multi-frame
    def _write_enhanced(self, images, info, ctx, out_dir, series_number, series_uid) -> WrittenFile:
        spec = info.spec
        sop_uid = ctx.uid(series_uid, "sop", 1)
        ds = self.new_dataset(ENHANCED_MR_IMAGE_STORAGE, sop_uid)
        first = images[0]
        self.add_common(ds, ctx, info, ENHANCED_MR_IMAGE_STORAGE, sop_uid, series_number, series_uid,
                        self.enhanced_image_type(spec, images))
        ds.InstanceNumber = 1
        ds.AcquisitionNumber = 1
        ds.AcquisitionDateTime = ctx.study_date + self.series_time(ctx, series_number)
        # Enhanced MR Image / MR Pulse Sequence modules
        contrast = self.acquisition_contrast(spec)
        ds.AcquisitionContrast = contrast
        ds.PixelPresentation = "MONOCHROME"
        ds.VolumetricProperties = "VOLUME"
        ds.VolumeBasedCalculationTechnique = "NONE"
        ds.ComplexImageComponent = "MAGNITUDE"
        ds.PulseSequenceName = self.pulse_sequence_name(spec)
        ds.MRAcquisitionType = "3D" if spec.kind == "dce" else "2D"
        ds.EchoPulseSequence = "GRADIENT" if spec.kind in ("dce", "localizer") else "SPIN"
        ds.MultipleSpinEcho = "NO"
        ds.MultiPlanarExcitation = "NO" if spec.kind == "dce" else "YES"
        ds.PhaseContrast = "NO"
        ds.TimeOfFlightContrast = "NO"
        ds.SteadyStatePulseSequence = "NONE"
        ds.EchoPlanarPulseSequence = "YES" if spec.kind in EPI_KINDS else "NO"
        ds.SaturationRecovery = "NO"
        ds.SpectrallySelectedSuppression = "FAT" if spec.fat_sat else "NONE"
        ds.OversamplingPhase = "NONE"
        ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
        ds.SegmentedKSpaceTraversal = "PARTIAL" if spec.kind in EPI_KINDS else "SINGLE"
        ds.RectilinearPhaseEncodeReordering = "LINEAR"
        ds.NumberOfKSpaceTrajectories = 1
        ds.CoverageOfKSpace = "FULL"
        ds.ResonantNucleus = "1H"
        ds.KSpaceFiltering = "NONE"
        ds.ImagingFrequency = ds_str(42.576 * ctx.field_strength_t, 9)
        ds.ApplicableSafetyStandardAgency = "IEC"
        ds.ContentQualification = "PRODUCT"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PresentationLUTShape = "IDENTITY"
        ds.ImagesInAcquisition = len(images)
        ds.NumberOfSlices = len({im.slice_index for im in images})  # (0054,0081): dcm2niix splits volumes by it
        if spec.kind == "dce" and info.n_phases > 1:
            ds.NumberOfTemporalPositions = info.n_phases
            ds.TemporalResolution = ds_str(spec.temporal_resolution_s * 1000.0)
        # dimensions
        dim_uid = ctx.uid(series_uid, "dimension-organization")
        org = Dataset()
        org.DimensionOrganizationUID = dim_uid
        ds.DimensionOrganizationSequence = DSequence([org])
        ds.DimensionOrganizationType = "3D_TEMPORAL" if info.n_phases > 1 else "3D"
        dims = self.dimension_pointers(spec, images, info)
        items = []
        for index_ptr, group_ptr, label in dims:
            it = Dataset()
            it.DimensionOrganizationUID = dim_uid
            it.DimensionIndexPointer = index_ptr
            it.FunctionalGroupPointer = group_ptr
            it.DimensionDescriptionLabel = label
            items.append(it)
        ds.DimensionIndexSequence = DSequence(items)
        # shared functional groups
        shared = Dataset()
        pm = Dataset()
        pm.PixelSpacing = [ds_str(float(v)) for v in first.pixel_spacing]
        pm.SliceThickness = ds_str(spec.slice_thickness_mm)
        pm.SpacingBetweenSlices = ds_str(spec.slice_thickness_mm + spec.slice_gap_mm)
        shared.PixelMeasuresSequence = DSequence([pm])
        po = Dataset()
        po.ImageOrientationPatient = [ds_str(float(v), 8) for v in first.orientation]
        shared.PlaneOrientationSequence = DSequence([po])
        tim = Dataset()
        tim.RepetitionTime = spec.tr_ms
        tim.FlipAngle = spec.flip_angle_deg
        tim.EchoTrainLength = self.echo_train_length(spec)
        tim.RFEchoTrainLength = self.echo_train_length(spec) if spec.kind not in EPI_KINDS else 1
        tim.GradientEchoTrainLength = 1 if spec.kind not in EPI_KINDS else int(spec.matrix[0])
        tim.SpecificAbsorptionRateSequence = DSequence([])
        tim.GradientOutputType = "DB_DT"
        tim.GradientOutput = 50.0
        shared.MRTimingAndRelatedParametersSequence = DSequence([tim])
        echo = Dataset()
        echo.EffectiveEchoTime = spec.te_ms
        shared.MREchoSequence = DSequence([echo])
        fov = Dataset()
        fov.InPlanePhaseEncodingDirection = "COLUMN"
        fov.MRAcquisitionFrequencyEncodingSteps = spec.encoding_steps[0]
        fov.MRAcquisitionPhaseEncodingStepsInPlane = spec.encoding_steps[1]
        fov.PercentSampling = 100.0
        fov.PercentPhaseFieldOfView = 100.0 * spec.fov_mm[0] / spec.fov_mm[1] if spec.fov_mm[1] else 100.0
        shared.MRFOVGeometrySequence = DSequence([fov])
        mod = Dataset()
        mod.InversionRecovery = "NO"
        mod.FlowCompensation = "NONE"
        mod.Spoiling = "RF" if spec.kind in ("dce", "localizer") else "NONE"
        mod.T2Preparation = "NO"
        mod.SpectrallySelectedExcitation = "NONE"
        mod.SpatialPresaturation = "NONE"
        mod.PartialFourier = "NO"
        mod.ParallelAcquisition = "YES"
        mod.ParallelAcquisitionTechnique = "GRAPPA"
        mod.ParallelReductionFactorInPlane = 2.0
        mod.ParallelReductionFactorOutOfPlane = 1.0
        shared.MRModifierSequence = DSequence([mod])
        self._field = ctx.field_strength_t
        shared.MRImagingModifierSequence = DSequence([self._imaging_modifier(spec)])
        shared.MRReceiveCoilSequence = DSequence([self._coil("Body_18")])
        shared.MRTransmitCoilSequence = DSequence([self._tx_coil()])
        ds.SharedFunctionalGroupsSequence = DSequence([shared])
        # per-frame functional groups
        dims_index = self.dimension_index_values(spec, images, info)
        per_frame = []
        frames = []
        for k, img in enumerate(images):
            fg = Dataset()
            fc = Dataset()
            fc.StackID = "1"
            fc.InStackPositionNumber = img.slice_index + 1
            if info.n_phases > 1:
                fc.TemporalPositionIndex = img.temporal_index + 1
            fc.FrameAcquisitionNumber = k + 1
            fc.FrameAcquisitionDateTime = ctx.study_date + ctx.time_at(
                60.0 * series_number + img.trigger_time_ms / 1000.0 + self.slice_time_s(spec, img, info))
            fc.FrameReferenceDateTime = fc.FrameAcquisitionDateTime
            fc.FrameAcquisitionDuration = float(spec.temporal_resolution_s * 1000.0 or 100.0)
            fc.DimensionIndexValues = dims_index[k]
            fg.FrameContentSequence = DSequence([fc])
            pp = Dataset()
            pp.ImagePositionPatient = [ds_str(float(v)) for v in img.position]
            fg.PlanePositionSequence = DSequence([pp])
            ft = Dataset()
            ft.FrameType = self.frame_type(spec, img)
            ft.PixelPresentation = "MONOCHROME"
            ft.VolumetricProperties = "VOLUME"
            ft.VolumeBasedCalculationTechnique = "NONE"
            ft.ComplexImageComponent = "MAGNITUDE"
            ft.AcquisitionContrast = contrast
            fg.MRImageFrameTypeSequence = DSequence([ft])
            if spec.kind in EPI_KINDS:
                fg.MRDiffusionSequence = DSequence([self._diffusion_item(img)])
            pvt = Dataset()
            pvt.RescaleIntercept = "0"
            pvt.RescaleSlope = ds_str(self.rescale_slope(img, info), 8)
            pvt.RescaleType = "US"
            fg.PixelValueTransformationSequence = DSequence([pvt])
            fvl = Dataset()
            arr = to_stored(img.pixels, image_scale(img, info.scale))
            hi = max(float(np.percentile(arr, 99.5)), 1.0)
            fvl.WindowCenter = ds_str(round(hi / 2))
            fvl.WindowWidth = ds_str(round(hi))
            fg.FrameVOILUTSequence = DSequence([fvl])
            self.add_enhanced_frame_private(fg, info, img, ctx)
            per_frame.append(fg)
            frames.append(arr)
        ds.PerFrameFunctionalGroupsSequence = DSequence(per_frame)
        self.add_enhanced_private(ds, info, images, ctx)
        self.add_pixels(ds, np.stack(frames))
        path = out_dir / f"{self.file_prefix}_0001.dcm"
        self.save(ds, path)
        return WrittenFile(path, sop_uid, list(images))

    def slice_time_s(self, spec: SeriesSpec, img: RenderedImage, info: SeriesInfo) -> float:
        """Interleaved slice acquisition offset within one TR (seconds)."""
        n = max(info.slices_per_phase // max(len(info.b_values), 1), 1) if spec.kind in EPI_KINDS else info.slices_per_phase
        n = max(n, img.slice_index + 1)
        order = list(range(0, n, 2)) + list(range(1, n, 2))
        tr = spec.tr_ms / 1000.0 if spec.kind != "dce" else spec.temporal_resolution_s
        return order.index(img.slice_index) * tr / n

    def _imaging_modifier(self, spec: SeriesSpec) -> Dataset:
        m = Dataset()
        m.MagnetizationTransfer = "NONE"
        m.BloodSignalNulling = "NO"
        m.Tagging = "NONE"
        m.TransmitterFrequency = 42.576 * self._field
        m.PixelBandwidth = 1500.0 if spec.kind in EPI_KINDS else 200.0
        return m

    def _coil(self, name: str) -> Dataset:
        c = Dataset()
        c.ReceiveCoilName = name
        c.ReceiveCoilManufacturerName = self.manufacturer
        c.ReceiveCoilType = "MULTICOIL"
        c.QuadratureReceiveCoil = "NO"
        return c

    def _tx_coil(self) -> Dataset:
        c = Dataset()
        c.TransmitCoilName = "Body"
        c.TransmitCoilManufacturerName = self.manufacturer
        c.TransmitCoilType = "BODY"
        return c

    def _diffusion_item(self, img: RenderedImage) -> Dataset:
        d = Dataset()
        if img.derived == "ADC":
            d.DiffusionBValue = 0.0
            d.DiffusionDirectionality = "ISOTROPIC"
            return d
        b = float(img.b_value or 0.0)
        d.DiffusionBValue = b
        if is_directional(img):
            d.DiffusionDirectionality = "DIRECTIONAL"
            g = Dataset()
            g.DiffusionGradientOrientation = [float(v) for v in img.direction]
            d.DiffusionGradientDirectionSequence = DSequence([g])
        elif b > 0:
            d.DiffusionDirectionality = "ISOTROPIC"
        else:
            d.DiffusionDirectionality = "NONE"
        return d

    def dimension_pointers(self, spec: SeriesSpec, images, info: SeriesInfo) -> list[tuple[int, int, str]]:
        dims = [(0x00209056, 0x00209111, "Stack ID"), (0x00209057, 0x00209111, "In-Stack Position Number")]
        if info.n_phases > 1:
            dims.append((0x00209128, 0x00209111, "Temporal Position Index"))
        if spec.kind in EPI_KINDS:
            dims.append((0x00189087, 0x00189117, "Diffusion b-value"))
        return dims

    def dimension_index_values(self, spec: SeriesSpec, images, info: SeriesInfo) -> list[list[int]]:
        bkeys = sorted({(derived_rank(im), im.b_value or 0.0) for im in images})
        bindex = {k: i + 1 for i, k in enumerate(bkeys)}
        out = []
        for im in images:
            v = [1, im.slice_index + 1]
            if info.n_phases > 1:
                v.append(im.temporal_index + 1)
            if spec.kind in EPI_KINDS:
                v.append(bindex[(derived_rank(im), im.b_value or 0.0)])
            out.append(v)
        return out

    # ---------------------------------------------------------------- hooks
    _field = 3.0

    def rescale_slope(self, img: RenderedImage, info: SeriesInfo) -> float:
        """Real-world value per stored unit in the enhanced PixelValueTransformation (1 = raw)."""
        return 1.0

    def protocol_name(self, spec: SeriesSpec) -> str:
        return spec.description

    def image_type(self, spec: SeriesSpec, img: RenderedImage) -> list[str]:
        if img.derived == "ADC":
            return ["DERIVED", "PRIMARY", "ADC", "ADC"]
        return ["ORIGINAL", "PRIMARY", "M", "ND"]

    def enhanced_image_type(self, spec: SeriesSpec, images: Sequence[RenderedImage]) -> list[str]:
        derived = {im.derived for im in images}
        if derived == {"ADC"}:
            return ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        if "CALC_BVALUE" in derived:
            return ["DERIVED", "PRIMARY", "DIFFUSION", "CALC_BVALUE"]
        if spec.kind == "dwi":
            return ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
        return ["ORIGINAL", "PRIMARY", "M", "NONE"]

    def frame_type(self, spec: SeriesSpec, img: RenderedImage) -> list[str]:
        if img.derived == "ADC":
            return ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        if img.derived == "CALC_BVALUE":
            return ["DERIVED", "PRIMARY", "DIFFUSION", "CALC_BVALUE"]
        if spec.kind == "dwi":
            return ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW" if img.derived == "TRACE" or not is_directional(img) else "NONE"]
        return ["ORIGINAL", "PRIMARY", "M", "NONE"]

    def acquisition_contrast(self, spec: SeriesSpec) -> str:
        return {"t2w": "T2", "t2w_fs": "T2", "dwi": "DIFFUSION", "adc": "DIFFUSION", "calc_bvalue": "DIFFUSION",
                "dce": "T1", "t1": "T1", "localizer": "MIXED"}[spec.kind]

    def pulse_sequence_name(self, spec: SeriesSpec) -> str:
        return self.sequence_name(spec, None)

    def sequence_name(self, spec: SeriesSpec, img: Optional[RenderedImage]) -> str:
        return ""

    def scan_options(self, spec: SeriesSpec) -> str:
        return "FS" if spec.fat_sat else ""

    def scanning_sequence(self, spec: SeriesSpec) -> tuple[list[str] | str, list[str] | str]:
        if spec.kind in EPI_KINDS:
            return "EP", ["SK", "SP"]
        if spec.kind in ("dce", "localizer"):
            return "GR", ["SP", "OSP"]
        return "SE", ["SK", "SP", "OSP"]

    def echo_train_length(self, spec: SeriesSpec) -> int:
        if spec.kind in EPI_KINDS:
            return int(spec.matrix[0]) // 2
        if spec.kind in ("t2w", "t2w_fs"):
            return 21
        if spec.kind == "t1":
            return 3
        return 1

    def add_classic_private(self, ds: Dataset, info: SeriesInfo, img: RenderedImage, ctx: StudyContext) -> None:
        pass

    def add_enhanced_frame_private(self, fg: Dataset, info: SeriesInfo, img: RenderedImage, ctx: StudyContext) -> None:
        pass

    def add_enhanced_private(self, ds: Dataset, info: SeriesInfo, images, ctx: StudyContext) -> None:
        pass


def info_field(writer: VendorWriter, ds: Dataset) -> float:
    try:
        return float(ds.MagneticFieldStrength)
    except Exception:
        return 3.0
