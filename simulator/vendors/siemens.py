"""Siemens syngo MR E11 (VE) classic MR Image Storage writer, optional DWI mosaics.

Conventions written (design.md section 3):
* (0019,0010) "SIEMENS MR HEADER": (0019,100C) IS B_value, (0019,100D) CS DiffusionDirectionality
  (DIRECTIONAL for single-direction images, NONE for b0 and trace), (0019,100E) FD gradient
  direction (directional images only), (0019,100A) US NumberOfImagesInMosaic (mosaics),
  (0019,100B) DS slice duration, (0019,1029) FD MosaicRefAcqTimes (mosaics).
* (0029,0010) "SIEMENS CSA HEADER": (0029,1010) CSA image header (SV10) with B_value,
  DiffusionGradientDirection, NumberOfImagesInMosaic, SliceNormalVector, MosaicRefAcqTimes;
  (0029,1020) CSA series header with an ASCCONV MrPhoenixProtocol.
* (0051,0010) "SIEMENS MR HEADER": AcquisitionMatrixText "128p*128" etc.
* SequenceName "*ep_b50t"/"*ep_b800t" (trace), "*ep_b800#1" (directional), "*tse2d1_21" (T2),
  ScanOptions "PFP\\FS" when fat suppressed, ImageType TRACEW / ADC / CALC_BVALUE tokens.
* Mosaic: one file per b-value (per direction); tiles of ceil(sqrt(n))^2; ImageType gets
  MOSAIC; ImagePositionPatient is Siemens' (top-left of the whole mosaic), which readers
  (nibabel MosaicWrapper, dcm2niix) correct back to the first slice.
* Counting: (0020,1002) = all 2D images of the series (mosaic: tiles, i.e. slices, summed);
  DCE: (0020,1002) = slices per phase, (0020,0105) phases, (0020,0100) per image.
Transfer syntax: implicit VR little endian, as syngo exports.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from scanside.simulator.model import RenderedImage, RenderedSeries, SeriesSpec
from scanside.simulator.vendors import csa
from scanside.simulator.vendors.common import (EPI_KINDS, MR_IMAGE_STORAGE, SeriesInfo, StudyContext, VendorWriter, WrittenFile,
                                      derived_rank, ds_str, image_scale, is_directional, slice_normal, to_stored)


def _mosaic_key(im: RenderedImage):
    return (im.temporal_index, derived_rank(im), im.b_value, tuple(im.direction) if is_directional(im) else None)


class SiemensWriter(VendorWriter):
    vendor = "siemens"
    manufacturer = "SIEMENS"
    model_name = "Prisma_fit"
    software_versions = "syngo MR E11"
    supports_mosaic = True
    file_prefix = "IM"
    transfer_syntax = ImplicitVRLittleEndian

    def __init__(self) -> None:
        self._dir_numbers: dict = {}

    # ------------------------------------------------------------------ naming
    def image_type(self, spec: SeriesSpec, img: RenderedImage) -> list[str]:
        if img.derived == "ADC":
            return ["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"]
        if img.derived == "CALC_BVALUE":
            return ["DERIVED", "PRIMARY", "DIFFUSION", "CALC_BVALUE", "TRACEW", "ND"]
        if spec.kind == "dwi":
            if is_directional(img):
                return ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND"]
            return ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"]
        return ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]

    def sequence_name(self, spec: SeriesSpec, img: Optional[RenderedImage]) -> str:
        if spec.kind in EPI_KINDS:
            if spec.kind == "adc" or (img is not None and img.derived == "ADC"):
                bs = [int(round(b)) for b in spec.b_values] or [50, 800]
                return f"*ep_b{min(bs)}_{max(bs)}"
            if img is None:
                return "*ep_b"
            b = int(round(img.b_value or 0))
            if b == 0:
                return "*ep_b0"
            if is_directional(img):
                return f"*ep_b{b}#{self._dir_number(img)}"
            return f"*ep_b{b}t"
        return {"t2w": "*tse2d1_21", "t2w_fs": "*tse2d1_21", "t1": "*tse2d1_3", "localizer": "*fl2d1",
                "dce": "*fl3d1"}.get(spec.kind, "*tse2d1_1")

    def _dir_number(self, img: RenderedImage) -> int:
        key = tuple(round(v, 4) for v in img.direction)  # type: ignore[arg-type]
        return self._dir_numbers.setdefault(key, len(self._dir_numbers) + 1)

    def scan_options(self, spec: SeriesSpec) -> str:
        return "PFP\\FS" if spec.fat_sat else "PFP"

    def scanning_sequence(self, spec: SeriesSpec):
        if spec.kind in EPI_KINDS:
            return "EP", ["SK", "SP"]
        if spec.kind in ("dce", "localizer"):
            return "GR", ["SP", "OSP"]
        return "SE", ["SK", "SP", "OSP"]

    # ------------------------------------------------------------------ private tags
    def _protocol_text(self, info: SeriesInfo, n_slices: int) -> str:
        spec = info.spec
        lines = ["### ASCCONV BEGIN ###", f'tProtocolName\t = ""{spec.description}""',
                 f"sSliceArray.lSize\t = {n_slices}", "sSliceArray.ucMode\t = 0x4",
                 f"sKSpace.lBaseResolution\t = {int(spec.matrix[1])}",
                 f"sKSpace.lPhaseEncodingLines\t = {int(spec.matrix[0])}",
                 f"alTR[0]\t = {int(spec.tr_ms * 1000)}", f"alTE[0]\t = {int(spec.te_ms * 1000)}",
                 f"sFastImaging.lEPIFactor\t = {int(spec.matrix[0]) if spec.kind in EPI_KINDS else 1}"]
        if spec.kind == "dwi":
            lines.append(f"sDiffusion.lDiffWeightings\t = {len(spec.b_values)}")
            for i, b in enumerate(spec.b_values):
                lines.append(f"sDiffusion.alBValue[{i}]\t = {int(round(b))}")
        lines.append("### ASCCONV END ###")
        return "\n".join(lines)

    def _csa_series(self, info: SeriesInfo, n_slices: int) -> bytes:
        key = (id(info), n_slices)
        if getattr(self, "_csa_series_key", None) != key:
            self._csa_series_key = key
            self._csa_series_bytes = csa.series_header(protocol_text=self._protocol_text(info, n_slices))
        return self._csa_series_bytes

    def _add_private(self, ds: Dataset, info: SeriesInfo, img: RenderedImage, *, n_mosaic: Optional[int] = None,
                     tile_shape: Optional[tuple[int, int]] = None) -> None:
        spec = info.spec
        diffusion = spec.kind in EPI_KINDS and img.derived != "ADC"
        b = float(img.b_value or 0.0) if diffusion else None
        direction = tuple(float(v) for v in img.direction) if (diffusion and is_directional(img)) else None
        acq_times = None
        if n_mosaic:
            order = list(range(0, n_mosaic, 2)) + list(range(1, n_mosaic, 2))  # interleaved
            per = spec.tr_ms / max(n_mosaic, 1)
            t = [0.0] * n_mosaic
            for rank, s in enumerate(order):
                t[s] = round(rank * per, 4)
            acq_times = t
        blk = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        blk.add_new(0x08, "CS", "IMAGE NUM 4")
        blk.add_new(0x09, "LO", "1.0")
        if n_mosaic:
            blk.add_new(0x0A, "US", n_mosaic)
        blk.add_new(0x0B, "DS", ds_str(spec.tr_ms / max(n_mosaic or 1, 1)))
        if diffusion:
            blk.add_new(0x0C, "IS", str(int(round(b))))
            blk.add_new(0x0D, "CS", "DIRECTIONAL" if direction else "NONE")
            if direction:
                blk.add_new(0x0E, "FD", list(direction))
        blk.add_new(0x0F, "SH", "Fast")
        blk.add_new(0x11, "SH", "No")
        blk.add_new(0x12, "SL", [0, 0, -1260])
        blk.add_new(0x13, "SL", [0, 0, 0])
        blk.add_new(0x14, "IS", ["0", "0", "-1260"])
        blk.add_new(0x15, "FD", [float(v) for v in img.position])
        blk.add_new(0x17, "DS", "1")
        blk.add_new(0x18, "IS", "2700")
        blk.add_new(0x28, "FD", 20.0)
        if acq_times:
            blk.add_new(0x29, "FD", acq_times)
        normal = [float(v) for v in slice_normal(img.orientation)]
        image_csa = csa.image_header(b_value=b, direction=direction, slice_normal=normal, n_mosaic=n_mosaic,
                                     mosaic_ref_acq_times=acq_times, protocol_slice_number=img.slice_index)
        c = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        c.add_new(0x08, "CS", "IMAGE NUM 4")
        c.add_new(0x09, "LO", "20160527")
        c.add_new(0x10, "OB", image_csa)
        c.add_new(0x18, "CS", "MR")
        c.add_new(0x19, "LO", "20160527")
        c.add_new(0x20, "OB", self._csa_series(info, n_mosaic or spec.n_slices))
        rows, cols = tile_shape or img.pixels.shape
        h = ds.private_block(0x0051, "SIEMENS MR HEADER", create=True)
        h.add_new(0x08, "CS", "IMAGE NUM 4")
        h.add_new(0x09, "LO", "1.0")
        h.add_new(0x0A, "LO", "TA 02:31")
        h.add_new(0x0B, "SH", f"{rows}p*{cols}")
        h.add_new(0x0C, "LO", f"FoV {int(round(spec.fov_mm[0]))}*{int(round(spec.fov_mm[1]))}")
        h.add_new(0x0D, "SH", f"SP F{float(np.dot(slice_normal(img.orientation), img.position)):.1f}")
        h.add_new(0x0E, "LO", {"axial": "Tra", "sagittal": "Sag", "coronal": "Cor"}.get(spec.plane, "Tra>Cor"))
        h.add_new(0x0F, "LO", "BO1,2;SP3-5")
        h.add_new(0x11, "LO", "p2")
        h.add_new(0x12, "SH", "TP 0")
        h.add_new(0x13, "SH", "+LPH")
        h.add_new(0x16, "LO", "p2 M/DIS2D")
        h.add_new(0x17, "SH", f"SL {spec.slice_thickness_mm:.1f}")
        h.add_new(0x19, "LO", "A1/PFP/FS" if spec.fat_sat else "A1/PFP")

    def add_classic_private(self, ds: Dataset, info: SeriesInfo, img: RenderedImage, ctx: StudyContext) -> None:
        self._add_private(ds, info, img)

    # ------------------------------------------------------------------ mosaic
    def _write_mosaics(self, images, info, ctx, out_dir: Path, series_number: int, series_uid: str) -> list[WrittenFile]:
        spec = info.spec
        groups: dict = {}
        for im in images:
            groups.setdefault(_mosaic_key(im), []).append(im)
        out: list[WrittenFile] = []
        for n, (key, group) in enumerate(groups.items(), start=1):
            group = sorted(group, key=lambda im: im.slice_index)
            n_sl = len(group)
            across = int(math.ceil(math.sqrt(n_sl)))
            r, c = group[0].pixels.shape
            scale = image_scale(group[0], info.scale)
            mosaic = np.zeros((across * r, across * c), dtype="<u2")
            for k, im in enumerate(group):
                i, j = divmod(k, across)
                mosaic[i * r:(i + 1) * r, j * c:(j + 1) * c] = to_stored(im.pixels, scale)
            first = group[0]
            # Siemens' mosaic position: top-left of the whole mosaic, same spacing/orientation
            row_cos = np.asarray(first.orientation[:3], float)
            col_cos = np.asarray(first.orientation[3:], float)
            ps_r, ps_c = first.pixel_spacing
            md_r, md_c = mosaic.shape
            ipp = (np.asarray(first.position, float) - col_cos * ps_r * (md_r - r) / 2.0
                   - row_cos * ps_c * (md_c - c) / 2.0)
            sop_uid = ctx.uid(series_uid, "sop", n)
            ds = self.new_dataset(MR_IMAGE_STORAGE, sop_uid)
            itype = self.image_type(spec, first) + ["MOSAIC"]
            self.add_common(ds, ctx, info, MR_IMAGE_STORAGE, sop_uid, series_number, series_uid, itype)
            self.add_classic_mr(ds, info, first, rows=md_r, cols=md_c)
            ds.AcquisitionMatrix = [0, int(c), int(r), 0]
            ds.NumberOfPhaseEncodingSteps = str(int(r))
            ds.AcquisitionNumber = n
            ds.InstanceNumber = n
            self.add_plane(ds, first, position=ipp)
            self._add_private(ds, info, first, n_mosaic=n_sl, tile_shape=(r, c))
            self.add_window(ds, mosaic)
            self.add_pixels(ds, mosaic)
            path = out_dir / f"{self.file_prefix}_{n:04d}.dcm"
            self.save(ds, path)
            out.append(WrittenFile(path, sop_uid, list(group)))
        return out


def write_series(rendered: RenderedSeries, ctx: StudyContext, out_dir: Path, *, series_number: int, series_uid: str,
                 enhanced: Optional[bool] = None, mosaic: bool = False) -> list[WrittenFile]:
    return SiemensWriter().write_series(rendered, ctx, out_dir, series_number=series_number, series_uid=series_uid,
                                        enhanced=enhanced, mosaic=mosaic)
