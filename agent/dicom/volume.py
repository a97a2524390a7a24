"""DICOM frames -> one oriented 3D volume.

Conventions (the contract every consumer relies on):

* ``Volume.array`` is float32 with shape ``(n_slices, rows, cols)``; slices are sorted by
  ascending position along the slice normal ``n = row_cosine x column_cosine`` (the cross
  product of the first and second triplets of ImageOrientationPatient).
* ``Volume.affine`` maps ``(col, row, slice, 1)`` -- the array axes in *reverse* order, as in
  NIfTI/dcm2niix -- to DICOM patient coordinates (LPS, mm). ``Volume.array_affine`` is the same
  mapping with the columns in array-axis order ``(slice, row, col, 1)``.
* Pixel values are modality values: RescaleSlope/Intercept (classic) or the per-frame
  PixelValueTransformationSequence (enhanced) applied.

Supported inputs: classic single-frame series (any transfer syntax pydicom can decode),
Siemens mosaics (CSA header via nibabel.nicom), and enhanced multi-frame files (per-frame
functional groups), or any mix of them that shares one geometry.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from scanside.agent.dicom.header import FrameRef

# Tolerances: direction cosines (unitless) and positions (mm).
_ORIENT_TOL = 1e-3
_POS_TOL = 1e-3
_SPACING_REL_TOL = 0.02  # slice-spacing variation tolerated before it is called irregular
_INPLANE_SHIFT_TOL_MM = 0.1

# LPS world: a positive step along x points to patient Left, y to Posterior, z to Superior.
LPS_LABELS = (("R", "L"), ("A", "P"), ("I", "S"))
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeError(ValueError):
    """The frames cannot be turned into one volume; ``reason`` is a short machine-usable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def int3(values: Iterable[Any]) -> tuple[int, int, int]:
    """Three values (a 3D shape) as a typed triple of ints; ValueError unless there are exactly three."""
    a, b, c = (int(v) for v in values)
    return a, b, c


def float3(values: Iterable[Any]) -> tuple[float, float, float]:
    """Three values (a 3D spacing or point) as a typed triple of floats; ValueError unless exactly three."""
    a, b, c = (float(v) for v in values)
    return a, b, c


@dataclass
class Volume:
    array: np.ndarray  # float32 (n_slices, rows, cols)
    affine: np.ndarray  # 4x4 float64: (col, row, slice, 1) -> LPS mm
    slice_positions: Optional[np.ndarray] = None  # mm along the slice normal, per slice (sorted)
    irregular_spacing: bool = False  # slice spacing not uniform (gaps, missing slices)
    warnings: list[str] = field(default_factory=list)
    slice_thickness: Optional[float] = None  # SliceThickness (mm), for gap checks; not used for geometry

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got {self.affine.shape}")

    # -- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return int3(self.array.shape)

    @property
    def array_affine(self) -> np.ndarray:
        """(slice, row, col, 1) -> LPS: columns of ``affine`` in array-axis order."""
        return self.affine[:, [2, 1, 0, 3]]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (slice, row, col) in mm, i.e. along the array axes."""
        return float3(np.linalg.norm(self.array_affine[:3, :3], axis=0))

    @property
    def direction(self) -> np.ndarray:
        """3x3 unit direction cosines of the array axes (columns: slice, row, col) in LPS."""
        a = self.array_affine[:3, :3]
        return a / np.linalg.norm(a, axis=0)

    @property
    def normal(self) -> np.ndarray:
        """Unit vector of array axis 0 (the slice axis) in LPS."""
        return self.direction[:, 0]

    @property
    def axcodes(self) -> str:
        """Orientation codes of the array axes (axis0, axis1, axis2) in the LPS world.

        A straight axial stack (rows run posterior, columns run left, slices run superior) is
        "SPL"."""
        return axcodes_of(self.array_affine)

    @property
    def plane(self) -> str:
        return plane_of(self.normal)

    @property
    def obliquity_deg(self) -> float:
        """Angle between the slice normal and the nearest patient axis."""
        return float(np.degrees(np.arccos(min(1.0, float(np.max(np.abs(self.normal)))))))

    def center_lps(self) -> np.ndarray:
        """LPS coordinate of the centre of the voxel grid."""
        c = (np.asarray(self.array.shape, dtype=float) - 1.0) / 2.0
        return (self.array_affine @ np.append(c, 1.0))[:3]

    def to_nifti(self):
        """A nibabel Nifti1Image in RAS (array stored as (col, row, slice)), for debugging."""
        import nibabel as nib

        img = nib.Nifti1Image(np.ascontiguousarray(self.array.transpose(2, 1, 0)), LPS_TO_RAS @ self.affine)
        img.header.set_xyzt_units("mm")
        return img

    @classmethod
    def from_array_affine(cls, array: np.ndarray, array_affine: np.ndarray, **kw: Any) -> "Volume":
        """Build from an array and a (axis0, axis1, axis2, 1) -> LPS affine."""
        return cls(array=array, affine=np.asarray(array_affine, dtype=np.float64)[:, [2, 1, 0, 3]], **kw)


def axcodes_of(array_affine: np.ndarray) -> str:
    import nibabel.orientations as nio

    return "".join(nio.aff2axcodes(array_affine, labels=LPS_LABELS))


def plane_of(normal: np.ndarray, oblique_deg: float = 45.0) -> str:
    """axial / sagittal / coronal by the dominant component of the slice normal;
    "oblique" only when the normal is more than ``oblique_deg`` from every patient axis."""
    n = np.abs(np.asarray(normal, dtype=float))
    n = n / (np.linalg.norm(n) or 1.0)
    k = int(np.argmax(n))
    if np.degrees(np.arccos(min(1.0, n[k]))) > oblique_deg:
        return "oblique"
    return ("sagittal", "coronal", "axial")[k]


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


@dataclass
class _Slices:
    """Per-2D-slice records gathered from all files before sorting (vectorised afterwards)."""

    pixels: list  # 2D arrays (views into the decoded file arrays)
    ipp: list
    iop: list
    spacing: list  # (row spacing, col spacing)
    slope: list
    intercept: list
    thickness: list
    between: list  # SpacingBetweenSlices (single-slice fallback only)


def _floats(v: Any, n: int) -> Optional[np.ndarray]:
    if v is None:
        return None
    try:
        a = np.asarray([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a if a.size == n else None


def _float(v: Any, default: Optional[float] = None) -> Optional[float]:
    if v is None or v == "":
        return default
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


DEFAULT_MAX_VOLUME_BYTES = 2 * 1024**3  # declared pixel bytes one load_volume call may decode ([ingest] max_series_bytes)


def _declared_bytes(ds, path: str) -> int:
    """Rows x Columns x Frames x samples x bytes per sample, as the header declares them."""
    try:
        dims = [int(float(str(ds.get(k) if ds.get(k) not in (None, "") else d)))
                for k, d in (("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1), ("SamplesPerPixel", 1), ("BitsAllocated", 16))]
    except (TypeError, ValueError, OverflowError) as e:
        raise VolumeError("unreadable_pixel_data", f"{path}: image size unreadable ({e})") from e
    if min(dims) < 0:
        raise VolumeError("unreadable_pixel_data", f"{path}: negative image size {dims}")
    rows, cols, frames, spp, bits = dims
    return rows * cols * frames * spp * max(bits, 8) // 8


_IN_MEMORY_BYTES = 64 * 1024**2


def _read(path: str, cap: int):
    import io
    import os

    import pydicom

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise VolumeError("unreadable_file", f"{path}: {e}") from e
    if size > cap + 64 * 1024**2:  # dcmread holds the whole file
        raise VolumeError("oversized", f"{path}: {size} bytes on disk, cap {cap}")
    import time

    from scanside.agent.dicom import header as hdr

    try:
        with open(path, "rb") as disk:
            # files up to 64 MB: one read, parsed from memory (pydicom's thousands of small reads then
            # cost no system calls); larger ones are parsed from the file as they are
            fp: Any = disk
            if size <= _IN_MEMORY_BYTES:
                fp = io.BytesIO(disk.read(size))
                fp.name = path
            # read_header's guards: bounded reads, its parse deadline (the whole file is parsed here, also
            # what follows Pixel Data), a deflated data set inflated with a cap and parsed through them
            src = hdr.BoundedFile(fp, size, time.monotonic() + hdr.PARSE_DEADLINE_S)
            deflated = hdr.meta_is_deflated(fp)
            if deflated:
                _, src = hdr.inflated_source(fp, path, cap + hdr.HEADER_SLACK_BYTES)
            ds = pydicom.dcmread(src)
            if deflated:
                ds.file_meta.TransferSyntaxUID = hdr.DEFLATED_TS
            return ds
    except hdr.HeaderError as e:
        raise VolumeError("oversized" if e.reason == "oversized" else "unreadable_file", f"{path}: {e}") from e
    except Exception as e:  # pragma: no cover - message path
        raise VolumeError("unreadable_file", f"{path}: {e}") from e


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit / explicit VR little endian


def _native_fast(ds) -> Optional[np.ndarray]:
    """Uncompressed little-endian 8/16-bit monochrome pixels straight from the bytes (a read-only view,
    no copy): what pydicom's pixel_array returns for them, without its per-file decoder set-up (about
    8 ms a 256 x 256 frame here).  None for anything else (pydicom decodes it): other transfer syntaxes,
    float pixels, 32-bit, signed data whose BitsStored < BitsAllocated (sign extension), unsigned data
    with bits set above BitsStored (pydicom's handling applies), odd lengths."""
    try:
        ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
        if ts not in _NATIVE_LE or "PixelData" not in ds:
            return None
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
        stored = int(ds.get("BitsStored", bits) or bits)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or bits not in (8, 16) or not (0 < stored <= bits):
            return None
        if signed and stored != bits:
            return None
        raw = ds.PixelData
        n = rows * cols * frames
        if not isinstance(raw, (bytes, bytearray)) or n <= 0 or len(raw) < n * bits // 8:
            return None
        dt = np.dtype(("<i" if signed else "<u") + str(bits // 8))
        arr = np.frombuffer(raw, dtype=dt, count=n).reshape(frames, rows, cols)
        if not signed and stored < bits and int(arr.max(initial=0)) >> stored:
            return None
        return arr if frames > 1 else arr[0]
    except Exception:  # anything unusual: pydicom's own decoder decides
        return None


def _decode(ds, path: str) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise VolumeError("no_pixel_data", f"{path} has no pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError("unsupported_pixels", f"{path}: SamplesPerPixel={ds.SamplesPerPixel} (colour)")
    arr = _native_fast(ds)
    if arr is None:
        try:
            arr = ds.pixel_array
        except Exception as e:
            raise VolumeError("unreadable_pixel_data", f"{path}: {type(e).__name__}: {e}") from e
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape[0] != n_frames:
        raise VolumeError("unreadable_pixel_data", f"{path}: decoded {arr.shape[0]} frames, header says {n_frames}")
    return arr


def _is_mosaic(ds) -> bool:
    it = [str(t).upper() for t in (ds.get("ImageType") or [])]
    return "MOSAIC" in it


def _n_mosaic(ds) -> Optional[int]:
    from nibabel.nicom import csareader as csar

    try:
        csa = csar.get_csa_header(ds)
        if csa:
            n = csar.get_n_mosaic(csa)
            if n:
                return int(n)
    except Exception:
        pass
    try:  # Siemens private (0019,100A) NumberOfImagesInMosaic
        el = ds.get((0x0019, 0x100A))
        if el is not None:
            v = el.value
            if isinstance(v, (bytes, bytearray)):
                v = int.from_bytes(bytes(v[:2]), "little")
            return int(v) if int(v) > 0 else None
    except Exception:
        pass
    return None


def _add_classic(ds, arr: np.ndarray, frame_index: int, path: str, out: _Slices) -> None:
    if arr.shape[0] > 1:
        raise VolumeError("missing_geometry", f"{path}: {arr.shape[0]} frames but no functional groups (per-frame geometry)")
    if frame_index != 0:
        raise VolumeError("bad_frame_index", f"{path} is single-frame; frame_index {frame_index}")
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ps = _floats(ds.get("PixelSpacing"), 2)
    if ipp is None or iop is None or ps is None:
        raise VolumeError("missing_geometry", f"{path} lacks ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    out.pixels.append(arr[0])
    out.ipp.append(ipp)
    out.iop.append(iop)
    out.spacing.append(ps)
    out.slope.append(_float(ds.get("RescaleSlope"), 1.0) or 1.0)
    out.intercept.append(_float(ds.get("RescaleIntercept"), 0.0))
    out.thickness.append(_float(ds.get("SliceThickness")))
    out.between.append(_float(ds.get("SpacingBetweenSlices")))


def _add_mosaic(ds, arr: np.ndarray, path: str, out: _Slices) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns on import that its DICOM readers are experimental
        from nibabel.nicom import csareader as csar
        from nibabel.nicom.dicomwrappers import MosaicWrapper

    n = _n_mosaic(ds)
    if not n:
        raise VolumeError("missing_geometry", f"{path}: MOSAIC without NumberOfImagesInMosaic (CSA or 0019,100A)")
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ps = _floats(ds.get("PixelSpacing"), 2)
    if ipp is None or iop is None or ps is None:
        raise VolumeError("missing_geometry", f"{path} lacks ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel: "DICOM readers are highly experimental"
            w = MosaicWrapper(ds, n_mosaic=n)
        first = np.asarray(w.image_position, dtype=float)  # corrected to the first tile's voxel (0,0)
    except Exception as e:
        raise VolumeError("missing_geometry", f"{path}: mosaic geometry: {e}") from e
    # Tiles are stored in order along the CSA SliceNormalVector; without a CSA header assume the
    # DICOM normal row_cosine x column_cosine (nibabel's fallback is the opposite sign).
    snorm = None
    try:
        snorm = csar.get_slice_normal(w.csa_header) if w.csa_header else None
    except Exception:
        snorm = None
    if snorm is None:
        snorm = np.cross(iop[:3], iop[3:])
    snorm = np.asarray(snorm, dtype=float)
    snorm = snorm / np.linalg.norm(snorm)
    step = _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness"))
    if not step:
        raise VolumeError("missing_geometry", f"{path}: mosaic without SpacingBetweenSlices/SliceThickness")
    m = int(np.ceil(np.sqrt(n)))
    R, C = arr.shape[1:]
    if R % m or C % m:
        raise VolumeError("bad_mosaic", f"{path}: {R}x{C} mosaic not divisible into {m}x{m} tiles")
    r, c = R // m, C // m
    tiles = arr[0].reshape(m, r, m, c).transpose(0, 2, 1, 3).reshape(m * m, r, c)[:n]
    slope = _float(ds.get("RescaleSlope"), 1.0) or 1.0
    inter = _float(ds.get("RescaleIntercept"), 0.0)
    th = _float(ds.get("SliceThickness"))
    for k in range(n):  # per slice (not per voxel): records only
        out.pixels.append(tiles[k])
        out.ipp.append(first + k * step * snorm)
        out.iop.append(iop)
        out.spacing.append(ps)
        out.slope.append(slope)
        out.intercept.append(inter)
        out.thickness.append(th)
        out.between.append(step)


def _fg(ds, frame_index: int, seq_name: str):
    """The functional group item `seq_name` for a frame: per-frame first, then shared."""
    pf = ds.get("PerFrameFunctionalGroupsSequence")
    if pf is not None and frame_index < len(pf):
        s = pf[frame_index].get(seq_name)
        if s:
            return s[0]
    sh = ds.get("SharedFunctionalGroupsSequence")
    if sh:
        s = sh[0].get(seq_name)
        if s:
            return s[0]
    return None


def _add_enhanced(ds, arr: np.ndarray, frame_index: int, path: str, out: _Slices) -> None:
    if not 0 <= frame_index < arr.shape[0]:
        raise VolumeError("bad_frame_index", f"{path}: frame_index {frame_index} of {arr.shape[0]} frames")
    pos = _fg(ds, frame_index, "PlanePositionSequence")
    ori = _fg(ds, frame_index, "PlaneOrientationSequence")
    pm = _fg(ds, frame_index, "PixelMeasuresSequence")
    ipp = _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None
    iop = _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None
    ps = _floats(pm.get("PixelSpacing"), 2) if pm is not None else None
    if ipp is None or iop is None or ps is None:
        raise VolumeError(
            "missing_geometry",
            f"{path} frame {frame_index} lacks PlanePosition/PlaneOrientation/PixelMeasures functional groups",
        )
    pvt = _fg(ds, frame_index, "PixelValueTransformationSequence")
    slope = _float(pvt.get("RescaleSlope"), 1.0) if pvt is not None else _float(ds.get("RescaleSlope"), 1.0)
    inter = _float(pvt.get("RescaleIntercept"), 0.0) if pvt is not None else _float(ds.get("RescaleIntercept"), 0.0)
    out.pixels.append(arr[frame_index])
    out.ipp.append(ipp)
    out.iop.append(iop)
    out.spacing.append(ps)
    out.slope.append(slope or 1.0)
    out.intercept.append(inter or 0.0)
    out.thickness.append(_float(pm.get("SliceThickness")))
    out.between.append(_float(pm.get("SpacingBetweenSlices")) or _float(ds.get("SpacingBetweenSlices")))


def load_volume(frames: Sequence[FrameRef], cache: Optional[dict] = None, max_bytes: Optional[int] = None) -> Volume:
    """Decode the frames (each file once), sort them along the slice normal, build the affine.

    ``cache`` (optional, path -> (dataset, decoded array)) lets a caller share decoded files
    across calls, e.g. the b-values of one enhanced multi-frame DWI file; by default files
    are cached for this call only.

    Raises VolumeError (``reason`` in: no_frames, unreadable_file, no_pixel_data,
    unreadable_pixel_data, unsupported_pixels, missing_geometry, mixed_orientation,
    mixed_size, mixed_spacing, duplicate_position, bad_frame_index, bad_mosaic, oversized).

    ``max_bytes`` caps the declared pixel bytes (Rows x Columns x Frames x bytes per sample) of
    the files this call decodes (default DEFAULT_MAX_VOLUME_BYTES): it is checked from the header
    before any pixels are decoded, so a lying header cannot make it allocate more."""
    frames = list(frames)
    if not frames:
        raise VolumeError("no_frames", "no frames given")
    if cache is None:
        cache = {}
    cap = DEFAULT_MAX_VOLUME_BYTES if max_bytes is None else int(max_bytes)
    budget = 0  # declared pixel bytes decoded by this call: checked before each decode
    out = _Slices([], [], [], [], [], [], [], [])
    for fr in frames:
        path = str(fr.path)
        try:
            if path not in cache:
                ds = _read(path, cap)
                budget += _declared_bytes(ds, path)
                if budget > cap:
                    raise VolumeError("oversized", f"declared pixel data reaches {budget} bytes, cap {cap}")
                cache[path] = (ds, _decode(ds, path))
            ds, arr = cache[path]
            if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
                _add_enhanced(ds, arr, int(fr.frame_index), path, out)
            elif _is_mosaic(ds):
                if fr.frame_index != 0:
                    raise VolumeError("bad_frame_index", f"{path} is a mosaic; frame_index {fr.frame_index}")
                _add_mosaic(ds, arr, path, out)
            else:
                _add_classic(ds, arr, int(fr.frame_index), path, out)
        except VolumeError:
            raise
        except Exception as e:  # pydicom converts values lazily: a malformed value raises on first access
            raise VolumeError("unreadable_file", f"{path}: malformed header value ({type(e).__name__}: {e})") from e
    try:
        return _assemble(out)
    except VolumeError:
        raise
    except Exception as e:  # non-finite or degenerate geometry values
        raise VolumeError("missing_geometry", f"geometry unusable ({type(e).__name__}: {e})") from e


def _assemble(s: _Slices) -> Volume:
    warnings: list[str] = []
    shapes = {p.shape for p in s.pixels}
    if len(shapes) != 1:
        raise VolumeError("mixed_size", f"frames differ in size: {sorted(shapes)}")
    iop = np.asarray(s.iop)
    if np.max(np.abs(iop - iop[0])) > _ORIENT_TOL:
        k = int(np.argmax(np.max(np.abs(iop - iop[0]), axis=1)))
        raise VolumeError("mixed_orientation", f"frame orientations differ: {iop[0].round(4).tolist()} vs {iop[k].round(4).tolist()}")
    sp = np.asarray(s.spacing)
    if np.max(np.abs(sp - sp[0])) > 1e-3:
        raise VolumeError("mixed_spacing", f"frames differ in PixelSpacing: {np.unique(sp, axis=0).tolist()}")
    row_cos = iop[0, :3] / np.linalg.norm(iop[0, :3])  # direction of increasing column index
    col_cos = iop[0, 3:] / np.linalg.norm(iop[0, 3:])  # direction of increasing row index
    if abs(float(row_cos @ col_cos)) > 1e-3:
        warnings.append(f"ImageOrientationPatient not orthogonal (dot={float(row_cos @ col_cos):.2e})")
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    ipp = np.asarray(s.ipp)
    d = ipp @ normal
    order = np.argsort(d, kind="stable")
    d = d[order]
    ipp = ipp[order]
    n = len(d)
    irregular = False
    thickness = next((t for t in s.thickness if t), None)
    if n > 1:
        diffs = np.diff(d)
        if np.min(diffs) < _POS_TOL:
            n_pos = len(np.unique(np.round(d / _POS_TOL)))
            raise VolumeError(
                "duplicate_position",
                f"{n} frames at {n_pos} distinct slice positions (several b-values/phases/echoes in one stack?)",
            )
        step = float(np.median(diffs))
        if np.max(np.abs(diffs - step)) > _SPACING_REL_TOL * step:
            irregular = True
            warnings.append(
                f"irregular slice spacing: {diffs.min():.3f}-{diffs.max():.3f} mm (median {step:.3f}); affine uses the median"
            )
        # slices should lie on one line along the normal
        inplane = (ipp - ipp[0]) - np.outer(d - d[0], normal)
        shift = float(np.max(np.linalg.norm(inplane, axis=1)))
        if shift > _INPLANE_SHIFT_TOL_MM:
            warnings.append(f"in-plane shift between slices up to {shift:.2f} mm (stacked or tilted slices)")
    else:  # one slice: the header's spacing, else thickness, else 1 mm
        step = next((b for b in s.between if b), None) or thickness or 1.0
    rows_sp, cols_sp = float(sp[0, 0]), float(sp[0, 1])
    aff = np.eye(4)
    aff[:3, 0] = row_cos * cols_sp  # column index
    aff[:3, 1] = col_cos * rows_sp  # row index
    aff[:3, 2] = normal * step  # slice index
    aff[:3, 3] = ipp[0]
    slope = np.asarray(s.slope, dtype=np.float64)[order]
    inter = np.asarray(s.intercept, dtype=np.float64)[order]
    array = np.empty((n,) + s.pixels[0].shape, dtype=np.float32)
    for i, k in enumerate(order):  # one copy per slice
        array[i] = s.pixels[k]
    if np.any(slope != 1.0) or np.any(inter != 0.0):
        if np.all(slope == slope[0]) and np.all(inter == inter[0]):
            array *= np.float32(slope[0])
            array += np.float32(inter[0])
        else:
            array *= slope.astype(np.float32)[:, None, None]
            array += inter.astype(np.float32)[:, None, None]
    return Volume(
        array=array,
        affine=aff,
        slice_positions=d,
        irregular_spacing=irregular,
        warnings=warnings,
        slice_thickness=thickness,
    )
