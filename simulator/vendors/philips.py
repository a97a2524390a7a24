"""Philips Ingenia (software 5.6.1) writer: classic MR Image Storage by default, optionally
Enhanced MR (one multi-frame file per series).

Conventions written (design.md section 3):
* (2001,0010) "Philips Imaging DD 001": (2001,1003) FL DiffusionBFactor, (2001,1004) CS
  diffusion direction ("I" isotropic, "O" for b0 / ADC), (2001,100A) IS slice number,
  (2001,100B) CS slice orientation, (2001,1020) LO scanning technique ("DwiSE", "TSE", "FFE"),
  (2001,1081) IS number of dynamics for DCE.
* (2005,0010) "Philips MR Imaging DD 001": (2005,10B0/B1/B2) FL gradient direction (0 for
  trace), (2005,100E) FL scale slope.
* Standard (0018,9087) DiffusionBValue and (0018,9075) DiffusionDirectionality
  (ISOTROPIC for trace and ADC, NONE for b0) on every DWI image.
* ALL b-values of the DWI in ONE series, AND the isotropic ADC map appended inside that same
  series (ImageType "DERIVED\\PRIMARY\\ADC\\ADC", (0018,9075) ISOTROPIC); the scanner merges
  the ADC rendering into the DWI series before calling the writer.
* No fat suppression in ScanOptions (blank); "SPAIR" only appears in the series description.
* RescaleIntercept/RescaleSlope/RescaleType "normalized" on every image (ADC slope 1).
* Counting: (0020,1002) = all 2D images of the series (all b-values + appended ADC);
  DCE: (0020,1002) = slices per dynamic, (0020,0105) dynamics, (0020,0100) per image.
Transfer syntax: explicit VR little endian.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydicom.dataset import Dataset

from scanside.simulator.model import RenderedImage, RenderedSeries, SeriesSpec
from scanside.simulator.vendors.common import (EPI_KINDS, SeriesInfo, StudyContext, VendorWriter, WrittenFile, ds_str, image_scale,
                                      is_directional)

_ORIENT = {"axial": "TRANSVERSAL", "sagittal": "SAGITTAL", "coronal": "CORONAL"}


class PhilipsWriter(VendorWriter):
    vendor = "philips"
    manufacturer = "Philips Medical Systems"
    model_name = "Ingenia"
    software_versions = "5.6.1\\5.6.1.2"
    file_prefix = "IM"

    def image_type(self, spec: SeriesSpec, img: RenderedImage) -> list[str]:
        if img.derived == "ADC":
            return ["DERIVED", "PRIMARY", "ADC", "ADC"]
        if img.derived == "CALC_BVALUE":
            return ["DERIVED", "PRIMARY", "DIFFUSION", "CALC_BVALUE"]
        if spec.kind in ("dce", "localizer"):
            return ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
        return ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]

    def technique(self, spec: SeriesSpec) -> str:
        return {"dwi": "DwiSE", "adc": "DwiSE", "calc_bvalue": "DwiSE", "t2w": "TSE", "t2w_fs": "TSE", "t1": "TSE",
                "dce": "FFE", "localizer": "FFE"}.get(spec.kind, "SE")

    def sequence_name(self, spec: SeriesSpec, img: Optional[RenderedImage]) -> str:
        return ""  # Philips classic leaves (0018,0024) empty

    def pulse_sequence_name(self, spec: SeriesSpec) -> str:
        return {"DwiSE": "DwiSE", "TSE": "TSE", "FFE": "T1FFE"}[self.technique(spec)]

    def scan_options(self, spec: SeriesSpec) -> str:
        return ""  # Philips does not flag fat suppression here

    def scanning_sequence(self, spec: SeriesSpec):
        if spec.kind in ("dce", "localizer"):
            return "GR", "SP"
        return "SE", "SK"

    def rescale_slope(self, img: RenderedImage, info: SeriesInfo) -> float:
        return 1.0 / image_scale(img, info.scale)

    def _diffusion_std(self, ds: Dataset, info: SeriesInfo, img: RenderedImage) -> None:
        if info.spec.kind not in EPI_KINDS:
            return
        if img.derived == "ADC":
            ds.DiffusionBValue = 0.0
            ds.DiffusionDirectionality = "ISOTROPIC"
            return
        b = float(img.b_value or 0.0)
        ds.DiffusionBValue = b
        ds.DiffusionDirectionality = "DIRECTIONAL" if is_directional(img) else ("ISOTROPIC" if b > 0 else "NONE")

    def add_classic_private(self, ds: Dataset, info: SeriesInfo, img: RenderedImage, ctx: StudyContext) -> None:
        spec = info.spec
        slope = self.rescale_slope(img, info)
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = ds_str(slope, 8)
        ds.RescaleType = "normalized"
        self._diffusion_std(ds, info, img)
        blk = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
        if spec.kind in EPI_KINDS:
            b = 0.0 if img.derived == "ADC" else float(img.b_value or 0.0)
            blk.add_new(0x03, "FL", b)
            blk.add_new(0x04, "CS", "I" if (b > 0 and not is_directional(img)) else ("O" if img.derived == "ADC" or b == 0 else "P"))
        blk.add_new(0x08, "IS", str(img.temporal_index + 1))
        blk.add_new(0x0A, "IS", str(img.slice_index + 1))
        blk.add_new(0x0B, "CS", _ORIENT.get(spec.plane, "TRANSVERSAL"))
        blk.add_new(0x20, "LO", self.technique(spec))
        if spec.kind == "dce":
            blk.add_new(0x81, "IS", str(info.n_phases))
        p = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        p.add_new(0x0E, "FL", float(1.0 / slope) if slope else 1.0)
        if spec.kind in EPI_KINDS:
            d = [float(v) for v in img.direction] if is_directional(img) else [0.0, 0.0, 0.0]
            p.add_new(0xB0, "FL", d[0])
            p.add_new(0xB1, "FL", d[1])
            p.add_new(0xB2, "FL", d[2])

    def add_enhanced_frame_private(self, fg: Dataset, info: SeriesInfo, img: RenderedImage, ctx: StudyContext) -> None:
        if info.spec.kind in EPI_KINDS:
            blk = fg.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
            blk.add_new(0x0E, "FL", float(image_scale(img, info.scale)))

    def add_enhanced_private(self, ds: Dataset, info: SeriesInfo, images, ctx: StudyContext) -> None:
        blk = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
        blk.add_new(0x20, "LO", self.technique(info.spec))
        ds.ScanOptions = ""


def write_series(rendered: RenderedSeries, ctx: StudyContext, out_dir: Path, *, series_number: int, series_uid: str,
                 enhanced: Optional[bool] = None, mosaic: bool = False) -> list[WrittenFile]:
    return PhilipsWriter().write_series(rendered, ctx, out_dir, series_number=series_number, series_uid=series_uid,
                                        enhanced=enhanced, mosaic=mosaic)
