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
    b_source: str = ""  # which tag gave the b-value
    direction: Optional[tuple[float, float, float]] = None
    directionality: Optional[str] = None  # (0018,9075) or its vendor equivalent: DIRECTIONAL, ISOTROPIC, NONE
    isotropic: bool = False  # derived trace image (b>0 with no direction, or DiffusionDirectionality ISOTROPIC)
    derived: Optional[str] = None  # "ADC", "TRACE", "CALC_BVALUE", "FA" from ImageType / frame type
    position: Optional[tuple[float, float, float]] = None  # ImagePositionPatient
    orientation: Optional[tuple[float, float, float, float, float, float]] = None
    temporal_index: Optional[int] = None
    n_slices: int = 1  # slices packed in this image (Siemens mosaic), else 1
    acquisition_time_s: Optional[float] = None  # AcquisitionTime / FrameAcquisitionDateTime, seconds after midnight
    trigger_time_ms: Optional[float] = None  # (0018,1060): per-phase time of a dynamic series on some scanners


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
    vendor: str = "other"  # siemens | ge | philips | canon | uih | other
    software_versions: str = ""
    series_number: Optional[int] = None
    instance_number: Optional[int] = None
    series_description: str = ""
    protocol_name: str = ""
    image_type: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    scanning_sequence: tuple[str, ...] = ()
    epi: bool = False  # echo-planar, by any vendor's marker (see scanside.agent.dicom.vendor.is_epi)
    sequence_name: str = ""
    spectral_fat_suppression: Optional[str] = None  # (0018,9025) in enhanced MR
    rows: int = 0
    columns: int = 0
    pixel_spacing: Optional[tuple[float, float]] = None
    # (frequency, phase) encoding steps acquired: (0018,1310) AcquisitionMatrix or, in enhanced MR,
    # MRFOVGeometrySequence; and the axis phase was encoded along, "ROW" or "COL" (0018,1312)
    encoding_steps: Optional[tuple[int, int]] = None
    phase_direction: Optional[str] = None
    slice_thickness: Optional[float] = None
    spacing_between_slices: Optional[float] = None
    echo_time: Optional[float] = None
    repetition_time: Optional[float] = None
    flip_angle: Optional[float] = None
    magnetic_field_strength: Optional[float] = None
    images_in_acquisition: Optional[int] = None  # (0020,1002)
    images_in_series: Optional[int] = None  # GE (0025,1007): the series total, where (0020,1002) counts one volume
    number_of_temporal_positions: Optional[int] = None  # (0020,0105)
    acquisition_duration_s: Optional[float] = None
    temporal_resolution_ms: Optional[float] = None  # (0020,0110) of a dynamic series
    acquisition_contrast: str = ""  # enhanced MR (0008,9209): T1, T2, DIFFUSION, ...
    is_enhanced: bool = False
    is_mosaic: bool = False
    pixel_bytes: int = 0  # declared Rows x Columns x Frames x SamplesPerPixel x BitsAllocated/8 (memory accounting)
    frames: tuple[FrameInfo, ...] = Field(default_factory=tuple)

    @property
    def n_images(self) -> int:
        """2D images this file contributes to its series (mosaic slices counted)."""
        return sum(f.n_slices for f in self.frames) or 1


# ---------------------------------------------------------------------------- reading
import os  # noqa: E402
import io  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from typing import Any, BinaryIO  # noqa: E402

import pydicom  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.errors import InvalidDicomError  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian  # noqa: E402

from scanside.agent.dicom import vendor as vd  # noqa: E402
from scanside.agent.dicom.rawdicom import Incomplete, Unsupported, read_part10  # noqa: E402

# pydicom checks each value it converts against its VR and, by default, only warns: the agent acts
# on no such warning, and the checks took a third of the header decoding time (bench/bench_scale.py)
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
ENHANCED_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.3"}  # Enhanced MR, Enhanced MR Color
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
DEFAULT_MAX_IMAGE_BYTES = 512 * 1024**2  # declared decoded pixel bytes of one file ([ingest] max_image_bytes)
MAX_FRAMES = 65536  # frames in one file: more is a lying header (a real enhanced MR file holds a few thousand)
PARSE_DEADLINE_S = 10.0  # a header still being parsed after this is refused (millions of empty elements): no hangs
HEADER_SLACK_BYTES = 64 * 1024**2  # non-pixel bytes a deflated data set may add to its pixels before it is a bomb


class HeaderError(Exception):
    """A file the agent cannot take as an image.

    reason: a short stable code (not_dicom, truncated, missing_uid, unreadable, dicomdir, no_pixel_data);
    retryable: the file may still be being written, so try again before quarantining it.
    """

    def __init__(self, reason: str, detail: str, retryable: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


def read_header(path: str | os.PathLike[str], max_image_bytes: Optional[int] = None) -> InstanceHeader:
    """Parse one file's header (pixels not decoded) and check that its pixel data is all there.

    A file whose declared pixels (Rows x Columns x Frames x samples x bytes) exceed
    ``max_image_bytes``, or whose deflated data set inflates past that plus HEADER_SLACK_BYTES,
    is rejected with reason ``oversized`` before anything that size is allocated."""
    path = os.fspath(path)
    cap = DEFAULT_MAX_IMAGE_BYTES if max_image_bytes is None else int(max_image_bytes)
    inflated: Optional[int] = None
    try:
        size = os.path.getsize(path)
        # O_NONBLOCK: a FIFO swapped in after the ingest worker's checks opens at once and reads empty
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as fp:
            prefix = fp.read(min(size, PREFIX_BYTES))
            fp.seek(0)
            has_preamble = len(prefix) >= 132 and prefix[128:132] == b"DICM"
            if not has_preamble and size < 132:
                # maybe still being written; if it stays this short it is not DICOM
                raise HeaderError("not_dicom", f"only {size} bytes, too short for a DICOM file", retryable=True)
            source: Any = BoundedFile(fp, size, time.monotonic() + PARSE_DEADLINE_S)
            deflated = has_preamble and DEFLATED_TS.encode() in prefix[132:_meta_group_end(prefix)]
            ds = None if deflated else _parse_prefix(prefix, size, has_preamble, fp)
            if deflated:
                # inflate here, streaming, with a cap (a bomb stops at the cap), then let pydicom parse the
                # inflated bytes through the same bounded, time-limited reader
                inflated, source = inflated_source(fp, path, cap + HEADER_SLACK_BYTES)
            try:
                if ds is None:
                    ds = pydicom.dcmread(source, stop_before_pixels=True, force=not has_preamble)
            except HeaderError:
                raise
            except InvalidDicomError as exc:
                raise HeaderError("not_dicom", str(exc)) from exc
            except (EOFError, struct.error, OSError, zlib.error) as exc:
                raise HeaderError("truncated", f"header ends early ({exc.__class__.__name__}: {exc})", retryable=True) from exc
            except Exception as exc:  # pydicom raises many types on garbage
                raise HeaderError("unreadable", f"{exc.__class__.__name__}: {exc}", retryable=True) from exc
            if not has_preamble and not _looks_like_dicom(ds):
                raise HeaderError("not_dicom", "no DICM preamble and no DICOM data elements")
            sop_class = _text(ds.get("SOPClassUID")) or _text(getattr(ds, "file_meta", _EMPTY).get("MediaStorageSOPClassUID"))
            if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
                raise HeaderError("dicomdir", "a DICOMDIR index, not an image")
            missing = [k for k in REQUIRED_UIDS if not _text(ds.get(k))]
            if missing:
                raise HeaderError("missing_uid", "missing " + ", ".join(missing))
            if inflated is not None:  # parsed as explicit VR little endian: record what the file says
                ds.file_meta.TransferSyntaxUID = DEFLATED_TS
            declared = _native_pixel_bytes(ds)
            if declared > cap:
                raise HeaderError("oversized", f"declared pixel data {declared} bytes exceeds the {cap}-byte cap per file")
            _check_pixel_data(ds, fp, size, inflated, declared)
    except HeaderError:
        raise
    except FileNotFoundError as exc:
        raise HeaderError("vanished", "file disappeared before it could be read", retryable=True) from exc
    except OSError as exc:
        raise HeaderError("unreadable", f"{exc.__class__.__name__}: {exc}", retryable=True) from exc
    except Exception as exc:  # pydicom converts values lazily: a garbage VR or value raises on first access
        raise HeaderError("unreadable", f"malformed header values ({exc.__class__.__name__}: {exc})") from exc
    try:
        return header_from_dataset(ds, path).model_copy(update={"pixel_bytes": declared})
    except HeaderError:
        raise
    except Exception as exc:
        raise HeaderError("unreadable", f"malformed header values ({exc.__class__.__name__}: {exc})") from exc


PREFIX_BYTES = 64 * 1024  # one read that holds 99 % of MR headers (the rest take the file path below)
LONG_PREFIX_BYTES = 1024 * 1024  # a second read for a long header (enhanced MR: 120 kB); longer: pydicom's path
_PIXEL_TAGS = (PIXEL_DATA_TAG, b"\x7f\xe0\x00\x10", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")


def _parse_prefix(prefix: bytes, size: int, has_preamble: bool, fp: BinaryIO) -> Optional[Dataset]:
    """Parse the header from the first bytes of the file, already in memory: pydicom's many small
    reads then cost no system calls or bounds bookkeeping (the parse is the ingest hot path). Taken
    only when the parse stopped at a pixel data element whose 12-byte element header lies inside
    the prefix (so nothing before it was cut off), or when the prefix is the whole file; ``fp`` is
    then left at the pixel data tag, as the file path leaves it. None: use the file path, which
    keeps every check (a header longer than the prefix, a lying length, a broken file)."""
    raw = _raw_prefix(prefix, size, fp)  # the exact, lazy reader first (scanside.agent.dicom.rawdicom)
    if raw is False and size > len(prefix):  # a long header (enhanced MR): once more with more of the file
        fp.seek(len(prefix))
        raw = _raw_prefix(prefix + fp.read(min(size, LONG_PREFIX_BYTES) - len(prefix)), size, fp)
        if not raw:
            fp.seek(0)  # where the file path below starts
    if raw:
        return raw
    buf = io.BytesIO(prefix)
    try:
        ds = pydicom.dcmread(buf, stop_before_pixels=True, force=not has_preamble)
    except Exception:  # the file path below parses it again and names the error
        return None
    pos = buf.tell()
    if len(prefix) < size and (pos + 12 > len(prefix) or prefix[pos:pos + 4] not in _PIXEL_TAGS):
        return None
    fp.seek(pos)
    return ds


def _raw_prefix(prefix: bytes, size: int, fp: BinaryIO) -> Any:
    """The header by scanside.agent.dicom.rawdicom, ``fp`` left at the pixel data tag; None where it does not take the
    file (pydicom reads it), False where more bytes might let it."""
    try:
        raw, pos = read_part10(prefix, whole_file=len(prefix) >= size)
    except Incomplete:
        return False
    except Unsupported:
        return None
    if len(prefix) >= size or (pos + 12 <= len(prefix) and prefix[pos:pos + 4] in _PIXEL_TAGS):
        fp.seek(pos)
        return raw
    return False  # the pixel element's header is cut off by the end of the prefix


class BoundedFile:
    """A binary file whose read(n) never asks for more than the bytes left: a lying element length
    (0xFFFFFFF0 on a short element) would otherwise make the buffered read allocate n bytes up front."""

    def __init__(self, fp: BinaryIO, size: int, deadline: Optional[float] = None):
        self._fp = fp
        self._size = size
        self._deadline = deadline

    def read(self, n: Optional[int] = -1) -> bytes:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise HeaderError("too_complex", f"header not parsed after {PARSE_DEADLINE_S} s (a flood of data elements)")
        if n is None or n < 0:
            return self._fp.read()
        return self._fp.read(min(n, max(self._size - self._fp.tell(), 0)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fp, name)


def _text(value: Any) -> str:
    return vd.as_text(value) if value is not None else ""


def _looks_like_dicom(ds: Dataset) -> bool:
    try:
        return any(k in ds for k in ("SOPInstanceUID", "StudyInstanceUID", "Modality", "SOPClassUID"))
    except Exception:
        return False


def _check_pixel_data(ds: Dataset, fp: BinaryIO, size: int, inflated: Optional[int] = None,
                      declared: Optional[int] = None) -> None:
    """pydicom stopped with the file at the Pixel Data tag: check its declared length against the
    bytes on disk (native) or the closing sequence delimiter (encapsulated)."""
    ts = getattr(ds, "file_meta", _EMPTY).get("TransferSyntaxUID")
    if ts is not None and not isinstance(ts, pydicom.uid.UID):
        ts = pydicom.uid.UID(_text(ts))
    if ts is not None and not ts.is_transfer_syntax:  # pydicom's is_deflated etc. raise on it; nothing could decode it
        raise HeaderError("bad_transfer_syntax", f"file meta names {str(ts)[:64]!r}, not a transfer syntax")
    if ts is not None and ts.is_deflated:
        if inflated is None:  # the meta said otherwise on the first look: measure it now
            inflated = _inflated_size(fp.name if hasattr(fp, "name") else "", MAX_INFLATED_BYTES)
        expected = _native_pixel_bytes(ds) if declared is None else declared
        if expected and inflated < expected:
            raise HeaderError("truncated", f"inflated data set holds {inflated} bytes, image needs {expected}")
        return
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 4 or head[:4] not in (PIXEL_DATA_TAG, b"\x7f\xe0\x00\x10"):
        if "Rows" in ds and not _non_image_class(_text(ds.get("SOPClassUID"))):
            if size - start <= 0:
                raise HeaderError("truncated", "image header present but pixel data missing", retryable=True)
        raise HeaderError("no_pixel_data", "no image pixels (not an image instance)")
    implicit = bool(ts is not None and ts.is_implicit_VR)
    little = not (ts is not None and not ts.is_little_endian)
    order = "<" if little else ">"
    if implicit:
        if len(head) < 8:
            raise HeaderError("truncated", "pixel data element cut short", retryable=True)
        length = struct.unpack(order + "I", head[4:8])[0]
        value_start = start + 8
    else:
        if len(head) < 12:
            raise HeaderError("truncated", "pixel data element cut short", retryable=True)
        length = struct.unpack(order + "I", head[8:12])[0]
        value_start = start + 12
    if length == 0xFFFFFFFF:
        _check_encapsulated(fp, value_start, size, order)
        return
    if value_start + length > size:
        raise HeaderError(
            "truncated", f"pixel data declares {length} bytes, {max(size - value_start, 0)} on disk", retryable=True
        )
    expected = _native_pixel_bytes(ds) if declared is None else declared  # read_header has it already
    if expected and length < expected:
        raise HeaderError("truncated", f"pixel data holds {length} bytes, image needs {expected}")


# Storage classes that never carry pixel data although some files of them have Rows (Philips XX_ files:
# private series/exam-card data; raw data; spectroscopy): without pixels they are complete, not truncated.
NON_IMAGE_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.4.2"}  # Raw Data, MR Spectroscopy
PHILIPS_PRIVATE_NON_IMAGE = "1.3.46.670589.11.0.0.12."


def _non_image_class(sop_class: str) -> bool:
    return sop_class in NON_IMAGE_SOP_CLASSES or sop_class.startswith(PHILIPS_PRIVATE_NON_IMAGE)


MAX_INFLATED_BYTES = 2 * 1024**3  # a deflated file that inflates past this is a deflate bomb


def meta_is_deflated(fp: BinaryIO) -> bool:
    """Whether the file meta group (read raw, bounded) names a deflated transfer syntax."""
    fp.seek(0)
    head = fp.read(132 + 64 * 1024)
    fp.seek(0)
    meta = head[132:_meta_group_end(head)]
    return b"1.2.840.10008.1.2.1.99" in meta


DEFLATED_TS = DeflatedExplicitVRLittleEndian  # a UID ("1.2.840.10008.1.2.1.99"): file_meta takes it as is


def inflated_source(fp: BinaryIO, path: str, cap: int) -> tuple[int, BoundedFile]:
    """The file with its data set inflated (at most ``cap`` bytes held) and the meta group naming
    explicit VR little endian (same length: UI values drop trailing nulls), as a bounded reader
    under the parse deadline."""
    fp.seek(0)
    head = fp.read(132 + 64 * 1024)
    end = _meta_group_end(head)
    meta = head[:end].replace(DEFLATED_TS.encode(), b"1.2.840.10008.1.2.1\0\0\0")
    chunks: list[bytes] = [meta]
    total = _inflated_size(path, cap, chunks)
    data = b"".join(chunks)
    del chunks
    return total, BoundedFile(io.BytesIO(data), len(data), time.monotonic() + PARSE_DEADLINE_S)


def _inflated_size(path: str, cap: int, keep: Optional[list[bytes]] = None) -> int:
    """Inflate the data set after the meta group in bounded chunks, counting bytes, never holding
    more than one chunk: past ``cap`` it is a deflate bomb (``oversized``)."""
    chunk = 1024 * 1024
    with open(path, "rb") as fp:
        head = fp.read(132 + 64 * 1024)
        fp.seek(_meta_group_end(head))
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while not inflater.eof:
                data = inflater.unconsumed_tail or fp.read(chunk)
                if not data:
                    raise HeaderError("truncated", "deflated data set ends early", retryable=True)
                out = inflater.decompress(data, chunk)
                total += len(out)
                if keep is not None and total <= cap:
                    keep.append(out)
                if total > cap:
                    raise HeaderError("oversized", f"deflated data set inflates past {cap} bytes (deflate bomb)")
        except zlib.error as exc:
            raise HeaderError("truncated", f"deflated data set is corrupt ({exc})", retryable=True) from exc
    return total


def _meta_group_end(raw: bytes) -> int:
    """Offset just past the file meta group (group 0002 is always explicit VR little endian)."""
    pos = 132
    while pos + 8 <= len(raw):
        group, _element = struct.unpack("<HH", raw[pos:pos + 4])
        if group != 0x0002:
            return pos
        vr = raw[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            if pos + 12 > len(raw):
                return len(raw)
            length = struct.unpack("<I", raw[pos + 8:pos + 12])[0]
            pos += 12 + length
        else:
            length = struct.unpack("<H", raw[pos + 6:pos + 8])[0]
            pos += 8 + length
    return pos


def _check_encapsulated(fp: BinaryIO, offset: int, size: int, order: str) -> None:
    """Walk the fragment items: each must fit in the file; the sequence delimiter, or the last item
    ending exactly at the end of the file, closes it. A file cut mid-fragment is truncated."""
    fragments = 0
    fp.seek(offset)
    while True:
        item = fp.read(8)
        if len(item) == 0 and fragments > 1:
            return  # no delimiter, but every fragment is whole (pydicom tolerates this too)
        if len(item) < 8:
            raise HeaderError("truncated", "encapsulated pixel data ends inside an item header", retryable=True)
        group, element, item_len = struct.unpack(order + "HHI", item)
        if (group, element) == (0xFFFE, 0xE0DD):
            if fragments < 2:
                raise HeaderError("truncated", "encapsulated pixel data has no image fragment")
            return
        if (group, element) != (0xFFFE, 0xE000):
            raise HeaderError("unreadable", f"unexpected tag ({group:04X},{element:04X}) in encapsulated pixel data")
        if fp.tell() + item_len > size:
            raise HeaderError("truncated", "encapsulated pixel data fragment runs past the end of the file", retryable=True)
        fp.seek(item_len, os.SEEK_CUR)
        fragments += 1  # the first item is the basic offset table


def _native_pixel_bytes(ds: Dataset) -> int:
    """Declared decoded pixel bytes (0 when the file declares no image size). Values are read the
    way header_from_dataset reads them, so a count it would act on is the count checked here."""
    try:
        if "Rows" not in ds or "Columns" not in ds:
            return 0
        rows, cols = _opt_int(ds.get("Rows")) or 0, _opt_int(ds.get("Columns")) or 0
        frames = _opt_int(ds.get("NumberOfFrames")) or 1
        spp = _opt_int(ds.get("SamplesPerPixel")) or 1
        bits = _opt_int(ds.get("BitsAllocated")) or 16
    except Exception as exc:  # a wrong VR or garbage value: the image size is unknown, so it cannot be capped
        raise HeaderError("unreadable", f"image size unreadable ({exc.__class__.__name__})") from exc
    if min(rows, cols, frames, spp, bits) < 0:
        raise HeaderError("unreadable", f"negative image dimension ({rows}x{cols}x{frames}, {spp} samples, {bits} bits)")
    if frames > MAX_FRAMES:
        raise HeaderError("oversized", f"{frames} frames declared (more than {MAX_FRAMES})")
    return rows * cols * frames * spp * max(bits, 8) // 8


_EMPTY = Dataset()  # what an absent item reads as (only ever read; a new Dataset per lookup cost 30 us)


def _first_item(ds: Dataset, keyword: str) -> Dataset:
    seq = ds.get(keyword)
    return seq[0] if seq else _EMPTY


def _floats(value: Any) -> list[float]:
    return vd.as_floats(value)


def _opt_float(value: Any) -> Optional[float]:
    return vd.first_float(value)


def _opt_int(value: Any) -> Optional[int]:
    f = vd.first_float(value)
    return int(f) if f is not None else None


def _seconds_of_day(tm: str) -> Optional[float]:
    """DICOM TM (HHMMSS.ffffff, HH:MM:SS in old files) -> seconds after midnight; None when unreadable."""
    tm = tm.strip().replace(":", "").split("+")[0].split("-")[0]
    try:
        hh, mm, ss = int(tm[0:2]), int(tm[2:4] or 0), float(tm[4:] or 0)
    except ValueError:
        return None
    if not (0 <= hh < 24 and 0 <= mm < 60 and 0 <= ss < 61):
        return None
    return hh * 3600.0 + mm * 60.0 + ss


def _vec(value: Any, n: int) -> Optional[tuple[float, ...]]:
    vals = _floats(value)
    return tuple(vals) if len(vals) == n else None


def _steps(freq: Any, phase: Any) -> Optional[tuple[int, int]]:
    f, p = _opt_int(freq), _opt_int(phase)
    return (f, p) if f and p and f > 0 and p > 0 else None


def _acquisition_matrix(value: Any) -> Optional[tuple[int, int]]:
    """(0018,1310) is frequency rows \\ frequency columns \\ phase rows \\ phase columns, one of each
    pair zero: (frequency steps, phase steps), or None when absent or malformed."""
    try:
        m = [int(v) for v in value] if value is not None else []
    except (TypeError, ValueError):
        return None
    if len(m) != 4:
        return None
    return _steps(max(m[0], m[1]), max(m[2], m[3]))


def _phase_direction(value: Any) -> Optional[str]:
    v = _text(value).upper()
    return {"ROW": "ROW", "COL": "COL", "COLUMN": "COL"}.get(v)


def header_from_dataset(ds: Dataset, path: str) -> InstanceHeader:
    manufacturer = _text(ds.get("Manufacturer"))
    vendor = vd.vendor_of(manufacturer)
    sop_class = _text(ds.get("SOPClassUID"))
    enhanced = sop_class in ENHANCED_SOP_CLASSES or "PerFrameFunctionalGroupsSequence" in ds
    image_type = vd.tokens(ds.get("ImageType"))
    csa = vd.LazyCSA(ds) if vendor == "siemens" else None
    mosaic = "MOSAIC" in image_type
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    seq_name = vd.sequence_name(ds, vendor)
    epi_marker = vd.is_epi(ds, vendor)  # asked twice below: its private lookups are a tenth of the header time

    if enhanced:
        frames = tuple(_enhanced_frames(ds, shared, vendor))
        measures = _first_item(shared, "PixelMeasuresSequence")
        echo = _first_item(shared, "MREchoSequence")
        timing = _first_item(shared, "MRTimingAndRelatedParametersSequence")
        first_pf = ds.PerFrameFunctionalGroupsSequence[0] if ds.get("PerFrameFunctionalGroupsSequence") else Dataset()
        measures = measures or _first_item(first_pf, "PixelMeasuresSequence")
        echo = echo or _first_item(first_pf, "MREchoSequence")
        timing = timing or _first_item(first_pf, "MRTimingAndRelatedParametersSequence")
        frame_type = _first_item(shared, "MRImageFrameTypeSequence") or _first_item(first_pf, "MRImageFrameTypeSequence")
        pixel_spacing = _vec(measures.get("PixelSpacing"), 2)
        slice_thickness = _opt_float(measures.get("SliceThickness"))
        spacing_between = _opt_float(measures.get("SpacingBetweenSlices")) or _opt_float(ds.get("SpacingBetweenSlices"))
        echo_time = _opt_float(echo.get("EffectiveEchoTime"))
        repetition_time = _opt_float(timing.get("RepetitionTime"))
        flip_angle = _opt_float(timing.get("FlipAngle"))
        scanning = tuple(
            t for t, on in (
                ("SE", _text(ds.get("EchoPulseSequence")).upper() in {"SPIN", "BOTH"}),
                ("GR", _text(ds.get("EchoPulseSequence")).upper() in {"GRADIENT", "BOTH"}),
                ("EP", _text(ds.get("EchoPlanarPulseSequence")).upper() == "YES"),
            ) if on
        )
        acquisition_contrast = _text(frame_type.get("AcquisitionContrast") or ds.get("AcquisitionContrast")).upper()
        fov_geom = _first_item(shared, "MRFOVGeometrySequence") or _first_item(first_pf, "MRFOVGeometrySequence")
        encoding_steps = _steps(fov_geom.get("MRAcquisitionFrequencyEncodingSteps"),
                                fov_geom.get("MRAcquisitionPhaseEncodingStepsInPlane"))
        phase_direction = _phase_direction(fov_geom.get("InPlanePhaseEncodingDirection"))
    else:
        frames = (_classic_frame(ds, vendor, csa, image_type, seq_name, mosaic, epi_marker),)
        pixel_spacing = _vec(ds.get("PixelSpacing"), 2)
        slice_thickness = _opt_float(ds.get("SliceThickness"))
        spacing_between = _opt_float(ds.get("SpacingBetweenSlices"))
        echo_time = _opt_float(ds.get("EchoTime"))
        repetition_time = _opt_float(ds.get("RepetitionTime"))
        flip_angle = _opt_float(ds.get("FlipAngle"))
        scanning = vd.tokens(ds.get("ScanningSequence"))
        acquisition_contrast = _text(ds.get("AcquisitionContrast")).upper()
        encoding_steps = _acquisition_matrix(ds.get("AcquisitionMatrix"))
        phase_direction = _phase_direction(ds.get("InPlanePhaseEncodingDirection"))

    return InstanceHeader(
        path=path,
        sop_instance_uid=_text(ds.SOPInstanceUID),
        sop_class_uid=sop_class,
        study_uid=_text(ds.StudyInstanceUID),
        series_uid=_text(ds.SeriesInstanceUID),
        transfer_syntax_uid=_text(getattr(ds, "file_meta", _EMPTY).get("TransferSyntaxUID")),
        modality=_text(ds.get("Modality")).upper(),
        manufacturer=manufacturer,
        vendor=vendor,
        software_versions="\\".join(vd.tokens(ds.get("SoftwareVersions"))),
        series_number=_opt_int(ds.get("SeriesNumber")),
        instance_number=_opt_int(ds.get("InstanceNumber")),
        series_description=_text(ds.get("SeriesDescription")),
        protocol_name=_text(ds.get("ProtocolName")),
        image_type=image_type,
        scan_options=vd.tokens(ds.get("ScanOptions")),
        scanning_sequence=scanning,
        epi="EP" in scanning or epi_marker,
        sequence_name=seq_name,
        spectral_fat_suppression=_text(ds.get("SpectrallySelectedSuppression")).upper() or None,
        rows=int(_opt_int(ds.get("Rows")) or 0),
        columns=int(_opt_int(ds.get("Columns")) or 0),
        pixel_spacing=pixel_spacing,
        encoding_steps=encoding_steps,
        phase_direction=phase_direction,
        slice_thickness=slice_thickness,
        spacing_between_slices=spacing_between,
        echo_time=echo_time,
        repetition_time=repetition_time,
        flip_angle=flip_angle,
        magnetic_field_strength=_opt_float(ds.get("MagneticFieldStrength")),
        images_in_acquisition=_opt_int(ds.get("ImagesInAcquisition")),
        images_in_series=_opt_int(vd.private_value(ds, 0x0025, 0x07, vd.GE_SERS)) if vendor == "ge" else None,
        number_of_temporal_positions=_opt_int(ds.get("NumberOfTemporalPositions")),
        acquisition_duration_s=_opt_float(ds.get("AcquisitionDuration")),
        temporal_resolution_ms=_opt_float(ds.get("TemporalResolution")),
        acquisition_contrast=acquisition_contrast,
        is_enhanced=enhanced,
        is_mosaic=mosaic,
        frames=frames,
    )


def _classic_frame(ds: Dataset, vendor: str, csa: Optional[vd.LazyCSA], image_type: tuple[str, ...], seq_name: str,
                   mosaic: bool, epi: bool) -> FrameInfo:
    # the CSA fallback only matters for diffusion: don't parse it for every T2 or DCE image
    diffusion_csa: Any = csa if ("DIFFUSION" in image_type or epi) else {}
    b, b_source = vd.b_value(ds, vendor, diffusion_csa)
    direction = vd.diffusion_direction(ds, vendor, diffusion_csa)
    derived = vd.derived_type(image_type) or vd.derived_from_description(image_type, _text(ds.get("SeriesDescription")))
    directionality = vd.directionality(ds, vendor)
    n_slices = 1
    if mosaic:
        n = _opt_int(vd.private_value(ds, 0x0019, 0x0A, vd.SIEMENS_MR)) or (_opt_int(csa.get("NumberOfImagesInMosaic")) if csa else None)
        n_slices = max(int(n or 1), 1)
    return FrameInfo(
        frame_index=0,
        b_value=b,
        b_source=b_source,
        direction=direction,
        directionality=directionality,
        isotropic=vd.is_isotropic(b, direction, directionality, derived, seq_name),
        derived=derived,
        position=_vec(ds.get("ImagePositionPatient"), 3),
        orientation=_vec(ds.get("ImageOrientationPatient"), 6),
        temporal_index=_opt_int(ds.get("TemporalPositionIdentifier")),
        acquisition_time_s=_seconds_of_day(_text(ds.get("AcquisitionTime"))),
        trigger_time_ms=_opt_float(ds.get("TriggerTime")),
        n_slices=n_slices,
    )


def _enhanced_frames(ds: Dataset, shared: Dataset, vendor: str) -> list[FrameInfo]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n_frames = int(_opt_int(ds.get("NumberOfFrames")) or len(per_frame) or 1)
    top_type = vd.tokens(ds.get("ImageType"))
    shared_orient = _first_item(shared, "PlaneOrientationSequence").get("ImageOrientationPatient")
    shared_diff = _first_item(shared, "MRDiffusionSequence")
    shared_ftype = _first_item(shared, "MRImageFrameTypeSequence").get("FrameType")
    frames = []
    for i in range(n_frames):
        item = per_frame[i] if i < len(per_frame) else Dataset()
        diff = _first_item(item, "MRDiffusionSequence") or shared_diff
        ftype = vd.tokens(_first_item(item, "MRImageFrameTypeSequence").get("FrameType") or shared_ftype) or top_type
        b = direction = None
        directionality = None
        b_source = ""
        if diff:
            b, b_source = vd.b_value(diff, vendor)
            direction = vd.diffusion_direction(diff, vendor)
            directionality = vd.directionality(diff, vendor)
        derived = vd.derived_type(ftype)
        content = _first_item(item, "FrameContentSequence")
        frames.append(FrameInfo(
            frame_index=i,
            b_value=b,
            b_source=b_source,
            direction=direction,
            isotropic=vd.is_isotropic(b, direction, directionality, derived, ""),
            derived=derived,
            position=_vec(_first_item(item, "PlanePositionSequence").get("ImagePositionPatient"), 3),
            orientation=_vec(_first_item(item, "PlaneOrientationSequence").get("ImageOrientationPatient") or shared_orient, 6),
            temporal_index=_opt_int(content.get("TemporalPositionIndex")),
            acquisition_time_s=_seconds_of_day(_text(content.get("FrameAcquisitionDateTime"))[8:]),
        ))
    return frames


def read_bounded_dataset(path: str | os.PathLike, size: int, specific_tags: Optional[list] = None) -> Any:
    """A header (no pixels) read as read_header reads it, for callers outside ingest (the quarantine
    index, a quarantined file's study): opened without blocking, through the bounded, time-limited
    reader, so a FIFO swapped in or a flood of empty elements cannot hold the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fp:
        return pydicom.dcmread(BoundedFile(fp, size, time.monotonic() + PARSE_DEADLINE_S),
                               stop_before_pixels=True, force=True, specific_tags=specific_tags)
