"""Time load_volume and prepare() on synthetic series of realistic size.

T2W: 24 classic files, 320x320, 0.5625 mm, 3 mm slices, 10 deg oblique axial.
DWI: 3 b-values x 20 classic files, 128x128, 1.5625 mm, 3.6 mm slices (and the same as one
enhanced multi-frame file of 60 frames, loaded per b-value with a shared decode cache).
prepare(): PI-CAI-like spec (T2W, ADC, HBV -> SPL, 3.0x0.5x0.5 mm, 20x256x256, zscore_percentile).

    .venv/bin/python bench/bench_preprocess.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from scanside.agent.dicom.header import FrameRef  # noqa: E402
from scanside.agent.dicom.volume import load_volume  # noqa: E402
from scanside.engines.preprocess import prepare  # noqa: E402
from scanside.engines.spec import PreprocessSpec  # noqa: E402


def _iop(deg: float) -> np.ndarray:
    a = np.radians(deg)
    r = np.array([1.0, 0, 0])
    c = np.array([0, np.cos(a), -np.sin(a)])
    return np.concatenate([r, c])


def _base(sop_class: str, rows: int, cols: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    return ds


def write_series(folder: Path, n: int, rows: int, cols: int, ps: float, step: float, deg: float, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    iop = _iop(deg)
    normal = np.cross(iop[:3], iop[3:])
    origin = -(iop[:3] * ps * (cols - 1) / 2 + iop[3:] * ps * (rows - 1) / 2 + normal * step * (n - 1) / 2)
    paths = []
    for k in range(n):
        ds = _base("1.2.840.10008.5.1.4.1.1.4", rows, cols)
        ds.ImagePositionPatient = [float(x) for x in origin + k * step * normal]
        ds.ImageOrientationPatient = [float(x) for x in iop]
        ds.PixelSpacing = [ps, ps]
        ds.SliceThickness = step
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
        ds.PixelData = rng.integers(0, 4000, (rows, cols), dtype=np.uint16).tobytes()
        p = folder / f"IM{k:04d}.dcm"
        ds.save_as(str(p), enforce_file_format=True)
        paths.append(str(p))
    return paths


def write_enhanced(path: Path, n_per_b: int, n_b: int, rows: int, cols: int, ps: float, step: float, deg: float) -> str:
    rng = np.random.default_rng(7)
    iop = _iop(deg)
    normal = np.cross(iop[:3], iop[3:])
    n = n_per_b * n_b
    ds = _base("1.2.840.10008.5.1.4.1.1.4.1", rows, cols)
    ds.NumberOfFrames = n
    shared = Dataset()
    po = Dataset()
    po.ImageOrientationPatient = [float(x) for x in iop]
    shared.PlaneOrientationSequence = Sequence([po])
    pm = Dataset()
    pm.PixelSpacing = [ps, ps]
    pm.SliceThickness = step
    shared.PixelMeasuresSequence = Sequence([pm])
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1.0, 0.0, "US"
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for f in range(n):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [float(x) for x in (f % n_per_b) * step * normal]
        item.PlanePositionSequence = Sequence([pp])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = rng.integers(0, 4000, (n, rows, cols), dtype=np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def _median_time(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "preprocess.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t2_paths = write_series(tmp / "t2", 24, 320, 320, 0.5625, 3.0, 10.0, 1)
        dwi_paths = [write_series(tmp / f"dwi_b{b}", 20, 128, 128, 1.5625, 3.6, 12.0, 10 + b) for b in range(3)]
        enh = write_enhanced(tmp / "dwi_enh.dcm", 20, 3, 128, 128, 1.5625, 3.6, 12.0)

        t2_frames = [FrameRef(path=p) for p in t2_paths]
        t_t2, t2 = _median_time(lambda: load_volume(t2_frames), args.repeat)
        dwi_frames = [[FrameRef(path=p) for p in ps] for ps in dwi_paths]
        t_dwi, dwis = _median_time(lambda: [load_volume(f) for f in dwi_frames], args.repeat)

        def load_enh():
            cache: dict = {}
            return [load_volume([FrameRef(path=enh, frame_index=b * 20 + k) for k in range(20)], cache=cache) for b in range(3)]

        t_enh, _ = _median_time(load_enh, args.repeat)
        vols = {"T2WI_nan": t2, "ADC": dwis[0], "DWI_High": dwis[2]}  # type: ignore[index]
        spec = PreprocessSpec(channels=["T2WI_nan", "ADC", "DWI_High"], axcodes="SPL", spacing_mm=(3.0, 0.5, 0.5), shape=(20, 256, 256))
        t_prep, (x, grid) = _median_time(lambda: prepare(vols, spec), args.repeat)  # type: ignore[misc]
        spec_full = spec.model_copy(update={"shape": None})
        t_prep_full, (xf, _g) = _median_time(lambda: prepare(vols, spec_full), args.repeat)  # type: ignore[misc]

    res = {
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "repeat": args.repeat,
        "load_volume_t2_320x320x24_s": round(t_t2, 4),
        "load_volume_dwi_3x_128x128x20_classic_s": round(t_dwi, 4),
        "load_volume_dwi_3x_128x128x20_enhanced_shared_cache_s": round(t_enh, 4),
        "prepare_3ch_20x256x256_s": round(t_prep, 4),
        "prepare_3ch_full_extent_s": round(t_prep_full, 4),
        "prepare_full_extent_shape": list(xf.shape),  # type: ignore[union-attr]
        "prepare_output_shape": list(x.shape),  # type: ignore[union-attr]
        "grid_axcodes": grid.axcodes,  # type: ignore[union-attr]
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for k, v in res.items():
        print(f"{k}: {v}")
    return res


if __name__ == "__main__":
    main()
