"""Siemens syngo MR XA30 writer: Enhanced MR Image Storage, one multi-frame file per series.

Conventions written (design.md section 3):
* SOP class 1.2.840.10008.5.1.4.1.1.4.1, SoftwareVersions "syngo MR XA30", NumberOfFrames.
* Shared functional groups: PixelMeasures, PlaneOrientation, MRTimingAndRelatedParameters,
  MREcho, MRFOVGeometry, MRModifier, MRImagingModifier, coils.
* Per-frame: FrameContent (StackID, InStackPositionNumber, TemporalPositionIndex for DCE,
  DimensionIndexValues against the DimensionIndexSequence: StackID, InStackPosition,
  [TemporalPositionIndex], [DiffusionBValue]), PlanePosition, MRImageFrameType (FrameType),
  MRDiffusion (0018,9117) with DiffusionBValue (0018,9087), DiffusionDirectionality (0018,9075)
  ISOTROPIC (trace, ADC) / DIRECTIONAL / NONE (b0), and DiffusionGradientDirectionSequence
  (0018,9076)/(0018,9089) for directional frames, PixelValueTransformation (slope 1).
* ImageType "DERIVED\\PRIMARY\\DIFFUSION\\ADC" for ADC, "...\\CALC_BVALUE" for calculated b,
  "ORIGINAL\\PRIMARY\\DIFFUSION\\NONE" for DWI; PulseSequenceName (0018,9005) "*ep_b" /
  "*tse2d1_21" ...; fat suppression as (0018,9025) SpectrallySelectedSuppression "FAT".
* Counting: NumberOfFrames = (0020,1002) = all 2D frames in the file/series; DCE also
  (0020,0105) NumberOfTemporalPositions and TemporalPositionIndex per frame.
Transfer syntax: explicit VR little endian.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydicom.dataset import Dataset

from scanside.simulator.model import RenderedImage, RenderedSeries, SeriesSpec
from scanside.simulator.vendors.common import EPI_KINDS, SeriesInfo, StudyContext, VendorWriter, WrittenFile
from scanside.simulator.vendors.siemens import SiemensWriter


class SiemensXAWriter(VendorWriter):
    vendor = "siemens-xa"
    manufacturer = "Siemens Healthineers"
    model_name = "MAGNETOM Vida"
    software_versions = "syngo MR XA30"
    default_enhanced = True
    file_prefix = "IM"

    def __init__(self) -> None:
        self._ve = SiemensWriter()

    def pulse_sequence_name(self, spec: SeriesSpec) -> str:
        if spec.kind in EPI_KINDS:
            return "*ep_b"
        return self._ve.sequence_name(spec, None)

    def sequence_name(self, spec: SeriesSpec, img: Optional[RenderedImage]) -> str:
        return self._ve.sequence_name(spec, img)

    def image_type(self, spec: SeriesSpec, img: RenderedImage) -> list[str]:
        return self._ve.image_type(spec, img)

    def scan_options(self, spec: SeriesSpec) -> str:
        return self._ve.scan_options(spec)

    def enhanced_image_type(self, spec: SeriesSpec, images) -> list[str]:
        derived = {im.derived for im in images}
        if derived == {"ADC"}:
            return ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        if "CALC_BVALUE" in derived:
            return ["DERIVED", "PRIMARY", "DIFFUSION", "CALC_BVALUE"]
        if spec.kind == "dwi":
            return ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
        return ["ORIGINAL", "PRIMARY", "M", "NONE"]

    def add_enhanced_private(self, ds: Dataset, info: SeriesInfo, images, ctx: StudyContext) -> None:
        ds.SequenceName = self.pulse_sequence_name(info.spec)
        ds.ScanningSequence, ds.SequenceVariant = self.scanning_sequence(info.spec)
        ds.ScanOptions = self.scan_options(info.spec)
        ds.EchoTime = info.spec.te_ms  # handy top-level copies XA also writes in its private sequences
        ds.RepetitionTime = info.spec.tr_ms


def write_series(rendered: RenderedSeries, ctx: StudyContext, out_dir: Path, *, series_number: int, series_uid: str,
                 enhanced: Optional[bool] = None, mosaic: bool = False) -> list[WrittenFile]:
    return SiemensXAWriter().write_series(rendered, ctx, out_dir, series_number=series_number, series_uid=series_uid,
                                          enhanced=enhanced, mosaic=mosaic)
