"""scanside.agent.dicom.rawdicom reads what pydicom reads: every element (value and VR, sequences item by item) and
the InstanceHeader built from it, on every file of ../shared/realdata and pydicom's test files; what
it cannot read exactly it refuses (Unsupported), and read_header then takes pydicom's path."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import generate_uid

from scanside.agent.dicom import header as hdr
from scanside.agent.dicom.header import header_from_dataset, read_header
from scanside.agent.dicom.rawdicom import Incomplete, RawDataset, Unsupported, read_part10
from tests.agent.factory import mr_dataset, write
from tests.agent.realdata import REALDATA, dicom_files, need

PYDICOM_FILES = sorted(p for p in get_testdata_files() if os.path.isfile(p))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if not isinstance(b, (str, bytes)) and hasattr(b, "__len__") and not hasattr(b, "keys"):  # MultiValue, list
        return not isinstance(a, (str, bytes)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b) and isinstance(a, bytes) == isinstance(b, bytes)


def _differences(raw: RawDataset, ds: Any, where: str = "") -> list[str]:
    """Every element of pydicom's data set against the raw reader's (empty: they agree)."""
    if sorted(int(t) for t in ds.keys()) != sorted(int(t) for t in raw.keys()):
        return [f"{where}: tags differ"]
    out: list[str] = []
    for elem in ds:
        mine = raw[int(elem.tag)]
        if " or " in mine.VR:  # pydicom's Dataset resolves US-or-SS from other elements; no header field reads one
            continue
        if mine.VR != elem.VR:
            out.append(f"{where}{elem.tag}: VR {mine.VR} != {elem.VR}")
        elif elem.VR == "SQ":
            if len(mine.value) != len(elem.value):
                out.append(f"{where}{elem.tag}: {len(mine.value)} items != {len(elem.value)}")
            for i, (a, b) in enumerate(zip(mine.value, elem.value)):
                out += _differences(a, b, f"{where}{elem.tag}[{i}]")
        elif not _same(mine.value, elem.value):
            out.append(f"{where}{elem.tag} {elem.VR}: {mine.value!r:.60} != {elem.value!r:.60}")
    return out


def _compare(path: str) -> str:
    """'same', 'refused' (the raw reader declined: pydicom reads it) or 'pydicom cannot read it'."""
    data = Path(path).read_bytes()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:
        with pytest.raises(Exception):  # nothing pydicom refuses is taken here
            read_part10(data[:hdr.PREFIX_BYTES], len(data) <= hdr.PREFIX_BYTES)
        return "pydicom cannot read it"
    try:
        raw, _ = read_part10(data[:hdr.PREFIX_BYTES], len(data) <= hdr.PREFIX_BYTES)
    except Incomplete:  # a long header: read_header reads more of the file and tries again
        try:
            raw, _ = read_part10(data[:hdr.LONG_PREFIX_BYTES], len(data) <= hdr.LONG_PREFIX_BYTES)
        except Unsupported:
            return "refused"
    except Unsupported:
        return "refused"
    assert not _differences(raw, ds), (path, _differences(raw, ds)[:5])
    assert raw.file_meta is not None and not _differences(raw.file_meta, ds.file_meta), path

    def header(d: Any) -> Any:
        try:
            return header_from_dataset(d, path)
        except Exception as exc:  # the same refusal either way (a DICOMDIR has no SOP Instance UID)
            return type(exc).__name__

    assert header(raw) == header(ds), path
    return "same"


def test_every_real_file_reads_as_pydicom_reads_it() -> None:
    files = dicom_files(need(REALDATA))
    outcomes = [_compare(str(p)) for p in files]
    assert len(files) > 1000
    assert outcomes.count("same") == len(files)  # every real scanner file takes the fast path


def test_pydicom_test_files_read_as_pydicom_reads_them() -> None:
    outcomes = [_compare(p) for p in PYDICOM_FILES]
    assert outcomes.count("same") > 0.7 * len(PYDICOM_FILES)  # the rest: big endian, deflated, odd: pydicom's path
    assert outcomes.count("refused") > 0


def _file(tmp_path: Path, **kw: Any) -> Path:
    return write(mr_dataset(generate_uid(), generate_uid(), **kw), tmp_path / "x.dcm")


def test_refuses_what_it_cannot_read_exactly(tmp_path: Path) -> None:
    data = _file(tmp_path).read_bytes()
    with pytest.raises(Unsupported):
        read_part10(data[128:], True)  # no preamble
    cut = data.index(hdr.PIXEL_DATA_TAG) - 10
    with pytest.raises(Unsupported):
        read_part10(data[:cut], False)  # the header runs past the bytes read
    big = Path(get_testdata_file("MR_small_bigendian.dcm"))  # type: ignore[arg-type]
    with pytest.raises(Unsupported):
        read_part10(big.read_bytes(), True)
    assert read_header(big).sop_instance_uid == pydicom.dcmread(big).SOPInstanceUID  # pydicom's path reads it


def test_read_header_takes_the_raw_reader_and_keeps_the_pixel_check(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, rows=64, cols=64)
    calls: list[int] = []
    real = hdr.read_part10
    monkeypatch.setattr(hdr, "read_part10", lambda *a, **k: calls.append(1) or real(*a, **k))
    h = read_header(path)
    assert calls and h.rows == 64
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # pixels cut short: found from the pixel element's offset and length
    with pytest.raises(hdr.HeaderError) as exc:
        read_header(path)
    assert exc.value.reason == "truncated"
