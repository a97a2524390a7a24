"""What the agent keeps of one DICOM file: its header, decoded once, vendor conventions resolved.

A file holds one image (classic), one mosaic of slices (Siemens), or many frames (enhanced
multi-frame); every image the file carries is one FrameInfo so that series assembly, splitting
by b-value and volume building treat them alike.
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class FrameInfo(BaseModel):
    """One 2D image inside a file (frame_index 0 for a classic single-frame file)."""

    model_config = ConfigDict(frozen=True)

    frame_index: int = 0
    b_value: Optional[float] = None  # s/mm^2, vendor-decoded and rounded to 10; None when not diffusion
    direction: Optional[tuple[float, float, float]] = None
    isotropic: bool = False  # derived trace image (b>0 with no direction, or DiffusionDirectionality ISOTROPIC)
    derived: Optional[str] = None  # "ADC", "TRACE", "CALC_BVALUE", "FA" from ImageType / frame type
    position: Optional[tuple[float, float, float]] = None  # ImagePositionPatient
    orientation: Optional[tuple[float, float, float, float, float, float]] = None
    temporal_index: Optional[int] = None
    n_slices: int = 1  # slices packed in this image (Siemens mosaic), else 1


class FrameRef(BaseModel):
    """Where one frame's pixels live."""

    model_config = ConfigDict(frozen=True)

    path: str
    frame_index: int = 0


class InstanceHeader(BaseModel):
    """The header of one DICOM instance. No patient identifiers are kept."""

    model_config = ConfigDict(frozen=True)

    path: str
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str = ""
    modality: str = ""
    manufacturer: str = ""
    vendor: str = "other"  # siemens | ge | philips | uih | other
    software_versions: str = ""
    series_number: Optional[int] = None
    instance_number: Optional[int] = None
    series_description: str = ""
    protocol_name: str = ""
    image_type: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    scanning_sequence: tuple[str, ...] = ()
    sequence_name: str = ""
    spectral_fat_suppression: Optional[str] = None  # (0018,9025) in enhanced MR
    rows: int = 0
    columns: int = 0
    pixel_spacing: Optional[tuple[float, float]] = None
    slice_thickness: Optional[float] = None
    spacing_between_slices: Optional[float] = None
    echo_time: Optional[float] = None
    repetition_time: Optional[float] = None
    flip_angle: Optional[float] = None
    magnetic_field_strength: Optional[float] = None
    images_in_acquisition: Optional[int] = None  # (0020,1002)
    number_of_temporal_positions: Optional[int] = None  # (0020,0105)
    acquisition_duration_s: Optional[float] = None
    is_enhanced: bool = False
    is_mosaic: bool = False
    frames: tuple[FrameInfo, ...] = Field(default_factory=tuple)

    @property
    def n_images(self) -> int:
        """2D images this file contributes to its series (mosaic slices counted)."""
        return sum(f.n_slices for f in self.frames) or 1
