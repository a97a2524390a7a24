"""load_volume's fast paths (native pixels straight from the bytes, whole-file read) give exactly what
pydicom's own decoder gives: on pydicom's bundled test files and on simulated series of every vendor style."""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

import scanside.agent.dicom.volume as av
from scanside.agent.dicom.header import read_header
from scanside.agent.dicom.series import split_parts


def _bundled() -> list:
    import pydicom.data

    root = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
    return sorted(glob.glob(os.path.join(root, "**", "*.dcm"), recursive=True))


def test_native_fast_equals_pixel_array_on_pydicom_test_files() -> None:
    fast = 0
    for path in _bundled():
        try:
            ds = pydicom.dcmread(path)
            ref = ds.pixel_array
        except Exception:
            continue  # pydicom cannot decode it here (missing plug-in, no pixels): nothing to compare
        got = av._native_fast(ds)
        if got is None:
            continue
        fast += 1
        assert got.dtype == ref.dtype and got.shape == ref.shape, path
        np.testing.assert_array_equal(got, ref, err_msg=path)
    assert fast >= 5  # the fast path was actually exercised on real files


def test_native_fast_declines_what_it_cannot_do_exactly() -> None:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 2, 2, 16, 1
    ds.BitsStored, ds.PixelRepresentation = 12, 1  # signed 12-bit: sign extension is pydicom's job
    ds.PixelData = np.array([1, 2, 3, 4], "<i2").tobytes()
    assert av._native_fast(ds) is None
    ds.PixelRepresentation = 0
    assert av._native_fast(ds).tolist() == [[1, 2], [3, 4]]
    ds.PixelData = np.array([1, 2, 3, 0x1000], "<u2").tobytes()  # a bit above BitsStored set
    assert av._native_fast(ds) is None
    ds.PixelData = b"\x00" * 6  # short pixel data
    assert av._native_fast(ds) is None
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
    ds.PixelData = np.array([1, 2, 3, 4], "<u2").tobytes()
    assert av._native_fast(ds) is None


@pytest.fixture(scope="module")
def exams(tmp_path_factory):
    from scanside.simulator.scanner import simulate_exam

    out = []
    for i, (vendor, kw) in enumerate([("siemens", {"mosaic": True}), ("ge", {}), ("philips", {"enhanced": True}),
                                      ("siemens-xa", {})]):
        d = tmp_path_factory.mktemp(f"exam{i}")
        simulate_exam(vendor, d, seed=700 + i, profile="prostate-bpmri", **kw)
        out.append(d)
    return out


def _parts(folder: Path) -> list:
    by: dict = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix != ".json":
            h = read_header(p)
            by.setdefault(h.series_uid, []).append(h)
    return [part for hs in by.values() for part in split_parts(hs)]


def test_volumes_unchanged_by_the_fast_paths(exams, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = [p for d in exams for p in _parts(d)]
    fast = []
    for part in parts:
        try:
            fast.append(av.load_volume(part.refs))
        except av.VolumeError as e:
            fast.append(e.reason)
    with monkeypatch.context() as mp:  # pydicom's decoder, file parsed from disk: the way it was
        mp.setattr(av, "_native_fast", lambda ds: None)
        mp.setattr(av, "_IN_MEMORY_BYTES", -1)
        slow = []
        for part in parts:
            try:
                slow.append(av.load_volume(part.refs))
            except av.VolumeError as e:
                slow.append(e.reason)
    loaded = 0
    for a, b in zip(fast, slow):
        if isinstance(b, str):
            assert a == b
            continue
        loaded += 1
        assert a.array.dtype == b.array.dtype == np.float32
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_array_equal(a.affine, b.affine)
        np.testing.assert_array_equal(a.slice_positions, b.slice_positions)
    assert loaded >= 12
