"""Typed contracts between the simulator's parts: protocol specs, rendered images, ground truth.

The renderer turns a SeriesSpec into a RenderedSeries (pixels + geometry, vendor-neutral);
the vendor writers turn a RenderedSeries into DICOM files. Coordinates are DICOM patient
coordinates (LPS, millimetres).
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scanside.agent.schema.taxonomy import OtherKind, Plane, SequenceLabel

Vendor = Literal["siemens", "siemens-xa", "ge", "philips"]
SeriesKind = Literal["localizer", "t2w", "t2w_fs", "dwi", "adc", "calc_bvalue", "dce", "t1"]
Derived = Literal["ADC", "TRACE", "CALC_BVALUE"]


class SeriesSpec(BaseModel):
    """One series of an exam protocol, as a technologist would plan it."""

    kind: SeriesKind
    description: str
    plane: Plane = "axial"
    slice_thickness_mm: float = 3.0
    slice_gap_mm: float = 0.0
    n_slices: int = 20
    fov_mm: tuple[float, float] = (180.0, 180.0)  # (rows, columns) extent
    matrix: tuple[int, int] = (256, 256)  # (rows, columns) of the reconstructed image
    # (frequency, phase) encoding steps acquired; None: the reconstructed matrix (columns, rows).
    # Phase is encoded along the columns (InPlanePhaseEncodingDirection COL), as the writers declare.
    acquisition_matrix: Optional[tuple[int, int]] = None
    tr_ms: float = 4000.0
    te_ms: float = 100.0
    flip_angle_deg: float = 90.0
    fat_sat: bool = False
    b_values: list[float] = Field(default_factory=list)  # dwi: acquired; calc_bvalue: the computed one
    n_directions: int = 3  # dwi: directions acquired per b>0 (written only when the vendor keeps them)
    include_trace: bool = True  # dwi: derived isotropic (trace) image per b
    n_phases: int = 1  # dce: temporal positions
    temporal_resolution_s: float = 0.0  # dce
    center_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # slab centre shift (LPS)

    @property
    def encoding_steps(self) -> tuple[int, int]:
        """(frequency, phase) encoding steps written to the header."""
        if self.acquisition_matrix is not None:
            return int(self.acquisition_matrix[0]), int(self.acquisition_matrix[1])
        return int(self.matrix[1]), int(self.matrix[0])


class ExamSpec(BaseModel):
    name: str
    field_strength_t: float = 3.0
    series: list[SeriesSpec]


class RenderedImage(BaseModel):
    """One 2D image (one slice of one b-value/direction/phase)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pixels: np.ndarray  # float32 (rows, cols), non-negative; ADC in 1e-6 mm^2/s
    position: tuple[float, float, float]  # ImagePositionPatient of the first voxel
    orientation: tuple[float, float, float, float, float, float]  # row cosines, column cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    slice_index: int
    b_value: Optional[float] = None
    direction: Optional[tuple[float, float, float]] = None  # None or zeros for trace/b0
    derived: Optional[Derived] = None
    temporal_index: int = 0
    trigger_time_ms: float = 0.0


class RenderedSeries(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    spec: SeriesSpec
    images: list[RenderedImage]


class GroundTruthPart(BaseModel):
    """What the agent should find: one logical series (a multi-b DWI series splits per b-value)."""

    label: SequenceLabel
    other_kind: Optional[OtherKind] = None
    b_value: Optional[float] = None
    derived: Optional[Derived] = None
    n_images: int


class GroundTruthSeries(BaseModel):
    series_uid: str
    series_number: int
    description: str
    kind: SeriesKind
    plane: Plane
    n_files: int
    files: list[str]  # relative to the exam folder
    parts: list[GroundTruthPart]


class GroundTruthLesion(BaseModel):
    center_lps_mm: tuple[float, float, float]
    diameters_mm: tuple[float, float, float]
    zone: Literal["PZ", "TZ"]
    cspca: bool
    adc: float  # 1e-6 mm^2/s


class GroundTruth(BaseModel):
    vendor: Vendor
    seed: int
    field_strength_t: float
    faults: list[str]
    study_uid: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    accession_number: str
    prostate_center_lps_mm: tuple[float, float, float]
    prostate_volume_ml: float
    lesions: list[GroundTruthLesion]
    cspca: bool
    series: list[GroundTruthSeries]
    corrupt_files: list[str] = Field(default_factory=list)  # injected truncations, relative paths
