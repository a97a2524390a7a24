"""Minimal, valid MR files written with pydicom for rule-level tests (exact, controllable headers)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def mr_dataset(series_uid: str, study_uid: str, *, instance: int = 1, rows: int = 8, cols: int = 8,
               position: tuple[float, float, float] = (0.0, 0.0, 0.0), orientation=(1, 0, 0, 0, 1, 0),
               manufacturer: str = "SIEMENS", te: float = 100.0, tr: float = 4000.0, scanning: str = "SE",
               description: str = "t2_tse_tra", image_type=("ORIGINAL", "PRIMARY", "M", "ND"),
               images_in_acquisition: Optional[int] = None, **extra: Any) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.PatientName = "FACTORY^PATIENT"
    ds.PatientID = "FACTORY-ID-1"
    ds.SeriesNumber, ds.InstanceNumber = 3, instance
    ds.SeriesDescription = description
    ds.ImageType = list(image_type)
    ds.ScanningSequence = scanning
    ds.EchoTime, ds.RepetitionTime = te, tr
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 3.0
    if images_in_acquisition is not None:
        ds.ImagesInAcquisition = images_in_acquisition
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16) % 100).tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def series_files(folder: Path, n: int, *, series_uid: Optional[str] = None, study_uid: Optional[str] = None,
                 **kw: Any) -> list[Path]:
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    return [write(mr_dataset(series_uid, study_uid, instance=i + 1, position=(0.0, 0.0, 3.0 * i), **kw),
                  folder / f"IM{i + 1:04d}.dcm") for i in range(n)]
