"""GE Signa (software 27, "RX27.0_R02") classic MR Image Storage writer.

Conventions written (design.md section 3):
* (0043,0010) "GEMS_PARM_01": (0043,1039) IS VM 4 "b+1000000000\\0\\0\\0" on multi-b DWI
  (the 1e9 bias; decode with value % 1e9). The trap is reproduced: GE also writes
  (0043,1039) on NON-diffusion series (T2 FSE "1000000000\\0\\0\\0", other series small
  nonzero values), so only EPI series may be called diffusion.
* (0018,9087) DiffusionBValue is OMITTED at b=0 and written at b>0 (software 27 behaviour).
* (0019,0010) "GEMS_ACQU_01": (0019,109C) pulse sequence name ("epi2" DWI, "fse-xl" T2,
  "fgre" localizer, "lava" DCE), (0019,10BB/BC/BD) DS gradient direction (0 for trace).
* ScanningSequence "EP" for DWI, "SE" for FSE, "GR" for gradient echo; ScanOptions tokens,
  with "FS" when fat suppressed ("FAST_GEMS\\EDR_GEMS\\FS", "EPI_GEMS\\ACC_GEMS\\FS").
* ADC: ImageType "DERIVED\\PRIMARY\\ADC\\ADC" in its own series.
* Counting as real GE software does: (0020,1002) = slice locations per volume (not the series
  total), (0021,104F) "GEMS_RELA_01" locations in acquisition, and (0025,1007) "GEMS_SERS_01"
  images in series = all 2D images (all b-values / phases). DCE also has (0020,0105) phases
  and (0020,0100) per image.
Transfer syntax: implicit VR little endian.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from scanside.simulator.model import RenderedImage, RenderedSeries, SeriesSpec
from scanside.simulator.vendors.common import EPI_KINDS, SeriesInfo, StudyContext, VendorWriter, WrittenFile, ds_str, is_directional

GE_B_BIAS = 1_000_000_000


class GEWriter(VendorWriter):
    vendor = "ge"
    manufacturer = "GE MEDICAL SYSTEMS"
    model_name = "SIGNA Premier"
    software_versions = "27\\LX\\MR Software release:RX27.0_R02_2012.a"
    file_prefix = "IM"
    transfer_syntax = ImplicitVRLittleEndian

    def __init__(self) -> None:
        pass

    def image_type(self, spec: SeriesSpec, img: RenderedImage) -> list[str]:
        if img.derived == "ADC":
            return ["DERIVED", "PRIMARY", "ADC", "ADC"]
        if img.derived == "CALC_BVALUE":
            return ["DERIVED", "PRIMARY", "DIFFUSION", "CALC_BVALUE"]
        return ["ORIGINAL", "PRIMARY", "OTHER"]

    def sequence_name(self, spec: SeriesSpec, img: Optional[RenderedImage]) -> str:
        return {"dwi": "epi2", "adc": "epi2", "calc_bvalue": "epi2", "t2w": "fse-xl", "t2w_fs": "fse-xl",
                "t1": "fse-xl", "localizer": "fgre", "dce": "lava"}.get(spec.kind, "")

    def scan_options(self, spec: SeriesSpec) -> str:
        if spec.kind in EPI_KINDS:
            tokens = ["EPI_GEMS", "ACC_GEMS"]
        elif spec.kind in ("dce",):
            tokens = ["FAST_GEMS", "ACC_GEMS", "MP_GEMS"]
        elif spec.kind == "localizer":
            tokens = ["FAST_GEMS"]
        else:
            tokens = ["FAST_GEMS", "EDR_GEMS", "TRF_GEMS", "FILTERED_GEMS", "ACC_GEMS"]
        if spec.fat_sat:
            tokens.append("FS")
        return "\\".join(tokens)

    def scanning_sequence(self, spec: SeriesSpec):
        if spec.kind in EPI_KINDS:
            return "EP", "NONE"
        if spec.kind in ("dce", "localizer"):
            return "GR", ["SS", "SK"]
        return "SE", ["SK", "OSP"]

    def _slop(self, info: SeriesInfo, img: RenderedImage) -> list[str]:
        spec = info.spec
        if spec.kind in EPI_KINDS:
            if img.derived == "ADC":
                return ["0", "0", "0", "0"]
            b = int(round(img.b_value or 0.0))
            # multi-b / synthetic-b DWI carry the 1e9 bias
            bias = GE_B_BIAS if (len(spec.b_values) > 1 or img.derived == "CALC_BVALUE") else 0
            return [str(b + bias), "0", "0", "0"]
        if spec.kind in ("t2w", "t2w_fs"):
            return [str(GE_B_BIAS), "0", "0", "0"]
        return ["8", "0", "0", "0"]  # small nonzero junk on other non-diffusion series

    def add_classic_private(self, ds: Dataset, info: SeriesInfo, img: RenderedImage, ctx: StudyContext) -> None:
        spec = info.spec
        if spec.kind in EPI_KINDS and img.derived != "ADC":
            b = float(img.b_value or 0.0)
            if b > 0:  # software 27 omits (0018,9087) at b=0
                ds.DiffusionBValue = b
        ds.ReceiveCoilName = "32Ch Body"
        acq = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        acq.add_new(0x9C, "LO", self.sequence_name(spec, img))
        acq.add_new(0x9E, "LO", {"dwi": "EPI", "adc": "EPI", "calc_bvalue": "EPI"}.get(spec.kind, "SE"))
        if spec.kind in EPI_KINDS:
            d = [float(v) for v in img.direction] if img.direction is not None and is_directional(img) else [0.0, 0.0, 0.0]
            acq.add_new(0xBB, "DS", ds_str(d[0]))
            acq.add_new(0xBC, "DS", ds_str(d[1]))
            acq.add_new(0xBD, "DS", ds_str(d[2]))
        parm = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
        parm.add_new(0x2C, "SS", 0)
        parm.add_new(0x39, "IS", self._slop(info, img))
        parm.add_new(0x6F, "DS", ["0", "0", "0", "0"])
        ds.private_block(0x0027, "GEMS_IMAG_01", create=True).add_new(0x35, "SS", 16)
        ds.ImagesInAcquisition = spec.n_slices
        ds.private_block(0x0021, "GEMS_RELA_01", create=True).add_new(0x4F, "SS", spec.n_slices)
        ds.private_block(0x0025, "GEMS_SERS_01", create=True).add_new(0x07, "SL", info.n_images)


def write_series(rendered: RenderedSeries, ctx: StudyContext, out_dir: Path, *, series_number: int, series_uid: str,
                 enhanced: Optional[bool] = None, mosaic: bool = False) -> list[WrittenFile]:
    return GEWriter().write_series(rendered, ctx, out_dir, series_number=series_number, series_uid=series_uid,
                                   enhanced=enhanced, mosaic=mosaic)
