"""Vendor DICOM conventions: b-value, diffusion direction and directionality, fat suppression,
sequence name, derived-image type and plane.

Sources: dcm2niix (nii_dicom.cpp and its GE/Siemens/Philips READMEs), dcm-classifier, heudiconv,
as summarised in the design sheet, section 3. Every decoder returns None when the file does not say,
so that the caller can tell "absent" from "zero".
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Iterable, Optional

import numpy as np
from pydicom.dataset import Dataset

from scanside.agent.dicom.rawdicom import RawDataset

log = logging.getLogger(__name__)

MAX_PLAUSIBLE_B = 5000.0  # larger values are vendor noise (dcm2niix rejects them too)
GE_B_BIAS = 1_000_000_000  # GE (0043,1039)[0] carries b + 1e9 on multi-b and synthetic-b DWI

SIEMENS_MR = "SIEMENS MR HEADER"
SIEMENS_CSA = "SIEMENS CSA HEADER"
GE_PARM = "GEMS_PARM_01"
GE_ACQU = "GEMS_ACQU_01"
GE_SERS = "GEMS_SERS_01"
PHILIPS_IMAGING = "Philips Imaging DD 001"
PHILIPS_MR = "Philips MR Imaging DD 001"
UIH_IMAGE = "Image Private Header"

FAT_SAT_TOKENS = {"FS", "SFS", "FAT_SAT", "FATSAT", "FSS", "SPAIR", "SPIR", "CHESS"}
DERIVED_TOKENS = {"ADC": "ADC", "EADC": "ADC", "FA": "FA", "CALC_BVALUE": "CALC_BVALUE", "TRACEW": "TRACE", "TRACE": "TRACE"}


def vendor_of(manufacturer: str) -> str:
    m = manufacturer.lower()
    if "siemens" in m:
        return "siemens"
    if m.startswith("ge ") or "ge medical" in m or "ge healthcare" in m or m == "ge":
        return "ge"
    if "philips" in m:
        return "philips"
    if "uih" in m or "united imaging" in m:
        return "uih"
    if "canon" in m or "toshiba" in m:  # Toshiba Medical became Canon Medical (2018): one set of conventions
        return "canon"
    return "other"


# ---------------------------------------------------------------- value coercion
def as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1", errors="replace").strip("\x00 ")
    return str(value).strip()


def as_floats(value: Any) -> list[float]:
    """Numbers from a DS/IS/FL/FD/UN value, a MultiValue, or backslash-separated bytes."""
    if value is None:
        return []
    if isinstance(value, (float, int)):  # the common case: one number already decoded
        f = float(value)
        return [f] if math.isfinite(f) else []
    if isinstance(value, bytes):
        text = as_text(value)
        if not text:
            return []
        if all(32 <= ord(c) < 127 for c in text):
            parts = text.split("\\")
        else:  # binary FL/FD stored as UN
            size = 8 if len(value) % 8 == 0 and len(value) >= 8 else 4
            dtype = "<f8" if size == 8 else "<f4"
            return [float(v) for v in np.frombuffer(value[: len(value) // size * size], dtype=dtype)]
    elif isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        parts = list(value)
    else:
        parts = [value]
    out = []
    for p in parts:
        try:
            f = float(as_text(p) if isinstance(p, (bytes, str)) else p)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def tokens(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (bytes, str)):
        parts = as_text(value).split("\\")
    else:
        parts = [as_text(v) for v in value]
    return tuple(p.strip().upper() for p in parts if p.strip())


def private_value(ds: Dataset, group: int, element: int, creator: str) -> Any:
    """A private element by its creator, falling back to the usual block 0x10 when the creator
    element is missing (some exports strip it; dcm2niix reads the fixed tag)."""
    # the creator's block, found by probing the creator elements (gggg,0010-00FF) that exist: pydicom's
    # get_private_item slices and sorts the whole group on every call (a fifth of the header time)
    keys = ds.keys()
    base = group << 16
    if isinstance(ds, RawDataset):  # it knows its creator elements: no probing of the 240 slots
        creators: Any = ds.private_creators(group)
    else:
        creators = ((slot, ds[base | slot].value) for slot in range(0x10, 0x100) if (base | slot) in keys)
    for slot, name in creators:
        if as_text(name) == creator:
            tag = base | (slot << 8) | element
            if tag in keys:
                return ds[tag].value
            break
    tag = (group << 16) | (0x1000 | element)
    if tag in ds:
        return ds[tag].value
    return None


def first_float(value: Any) -> Optional[float]:
    vals = as_floats(value)
    return vals[0] if vals else None


def clean_b(b: Optional[float]) -> Optional[float]:
    """Round to 10 s/mm^2 and reject implausible values."""
    if b is None or not math.isfinite(b) or b < 0:
        return None
    if b > MAX_PLAUSIBLE_B:
        log.debug("b-value %s rejected as implausible", b)
        return None
    return float(round(b / 10.0) * 10)


# ---------------------------------------------------------------- Siemens CSA
def csa_image_header(ds: Dataset) -> dict[str, Any]:
    """The Siemens CSA image header (0029,1010) as {name: value}, read with nibabel."""
    raw = private_value(ds, 0x0029, 0x10, SIEMENS_CSA)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 16:
        return {}
    import warnings

    with warnings.catch_warnings():  # nibabel.nicom warns on import that its readers are experimental
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader

    try:
        tags = csareader.read(bytes(raw))["tags"]
    except Exception as exc:  # a damaged CSA header is not a reason to drop the image
        log.debug("CSA header unreadable: %s", exc)
        return {}
    out: dict[str, Any] = {}
    for name, tag in tags.items():
        items = tag.get("items") or []
        if not items:
            continue
        out[name] = items[0] if tag.get("n_items", len(items)) == 1 or len(items) == 1 else items
    return out


class LazyCSA:
    """The CSA header parsed on first use: most Siemens files answer from (0019,xxxx) and never need it."""

    def __init__(self, ds: Dataset):
        self._ds = ds
        self._tags: Optional[dict[str, Any]] = None

    def get(self, name: str, default: Any = None) -> Any:
        if self._tags is None:
            self._tags = csa_image_header(self._ds)
        return self._tags.get(name, default)


# ---------------------------------------------------------------- decoders
def is_epi(ds: Dataset, vendor: str) -> bool:
    """Echo-planar: ScanningSequence EP, enhanced EchoPlanarPulseSequence YES, or an EPI sequence name."""
    if "EP" in tokens(ds.get("ScanningSequence")):
        return True
    if as_text(ds.get("EchoPlanarPulseSequence", "")).upper() == "YES":
        return True
    if vendor == "philips":  # classic Philips DWI says ScanningSequence SE; (2001,1020) says DwiSE / EPI
        technique = as_text(private_value(ds, 0x2001, 0x20, PHILIPS_IMAGING) or "").upper()
        if "DWI" in technique or "EPI" in technique:
            return True
    name = sequence_name(ds, vendor).lower().lstrip("*")
    return name.startswith("ep") or "epi" in name or "ep2d" in name or "ep_b" in name


def sequence_name(ds: Dataset, vendor: str) -> str:
    for value in (ds.get("SequenceName"), ds.get("PulseSequenceName")):
        if value:
            return as_text(value)
    if vendor == "ge":
        v = private_value(ds, 0x0019, 0x9C, GE_ACQU)
        if v:
            return as_text(v)
    return ""


def b_value(ds: Dataset, vendor: str, csa: Optional[Any] = None) -> tuple[Optional[float], str]:
    """(b, source) for a classic image (or an enhanced frame's MRDiffusion item passed as ds)."""
    std = first_float(ds.get("DiffusionBValue"))
    if std is not None:
        return clean_b(std), "(0018,9087) DiffusionBValue"
    if vendor == "ge":
        raw = as_floats(private_value(ds, 0x0043, 0x39, GE_PARM))
        if raw and is_epi(ds, vendor):
            return clean_b(raw[0] % GE_B_BIAS), "GE (0043,1039) modulo 1e9"
    if vendor == "philips":
        v = first_float(private_value(ds, 0x2001, 0x03, PHILIPS_IMAGING))
        if v is not None:
            return clean_b(v), "Philips (2001,1003) DiffusionBFactor"
    if vendor == "siemens":
        v = first_float(private_value(ds, 0x0019, 0x0C, SIEMENS_MR))
        if v is not None:
            return clean_b(v), "Siemens (0019,100C)"
        csa = csa if csa is not None else LazyCSA(ds)
        v = first_float(csa.get("B_value"))
        if v is not None:
            return clean_b(v), "Siemens CSA B_value"
    if vendor == "uih":
        v = first_float(private_value(ds, 0x0065, 0x09, UIH_IMAGE))
        if v is not None:
            return clean_b(v), "UIH (0065,1009)"
    return None, ""


def _vec3(vec: list[float]) -> Optional[tuple[float, float, float]]:
    return (vec[0], vec[1], vec[2]) if len(vec) == 3 else None


def diffusion_direction(ds: Dataset, vendor: str, csa: Optional[Any] = None) -> Optional[tuple[float, float, float]]:
    seq = ds.get("DiffusionGradientDirectionSequence")
    if seq:
        vec = as_floats(seq[0].get("DiffusionGradientOrientation"))
        if len(vec) == 3:
            return _vec3(vec)
    vec = as_floats(ds.get("DiffusionGradientOrientation"))
    if len(vec) == 3:
        return _vec3(vec)
    if vendor == "siemens":
        vec = as_floats(private_value(ds, 0x0019, 0x0E, SIEMENS_MR))
        # an intact SIEMENS MR HEADER block without (0019,100E) means "no direction" (trace, b0);
        # only a stripped block sends us to the CSA header
        if len(vec) != 3 and private_value(ds, 0x0019, 0x0C, SIEMENS_MR) is None:
            csa = csa if csa is not None else LazyCSA(ds)
            vec = as_floats(csa.get("DiffusionGradientDirection"))
    elif vendor == "philips":
        parts = [first_float(private_value(ds, 0x2005, e, PHILIPS_MR)) for e in (0xB0, 0xB1, 0xB2)]
        vec = [v for v in parts if v is not None]
    elif vendor == "ge":
        parts = [first_float(private_value(ds, 0x0019, e, GE_ACQU)) for e in (0xBB, 0xBC, 0xBD)]
        vec = [v for v in parts if v is not None]
    return _vec3(vec)


def directionality(ds: Dataset, vendor: str) -> Optional[str]:
    v = ds.get("DiffusionDirectionality")
    if v:
        return as_text(v).upper()
    if vendor == "siemens":
        v = private_value(ds, 0x0019, 0x0D, SIEMENS_MR)
        if v:
            return as_text(v).upper()
    if vendor == "philips":
        v = as_text(private_value(ds, 0x2001, 0x04, PHILIPS_IMAGING) or "").upper()
        if v == "I":
            return "ISOTROPIC"
        if v in {"O", "R", "P", "S", "A", "L", "H", "F"}:
            return "DIRECTIONAL"
    return None


def derived_type(image_type: Iterable[str]) -> Optional[str]:
    """ADC / FA / CALC_BVALUE / TRACE from ImageType (or an enhanced FrameType), most specific first."""
    tokens = {t.upper() for t in image_type}
    for token in ("ADC", "EADC", "FA", "CALC_BVALUE", "TRACEW", "TRACE"):
        if token in tokens:
            return DERIVED_TOKENS[token]
    return None


# A scanner-computed ADC map that ImageType does not name (GE FuncTool writes DERIVED\SECONDARY\PROCESSED,
# "Apparent Diffusion Coefficient (mm2/s)", and keeps the source b-value in (0043,1039)).
ADC_DESCRIPTION = re.compile(r"(?<!exponential )apparent diffusion coefficient|(?<![a-z0-9])ADC(?![a-z0-9])", re.I)


def derived_from_description(image_type: Iterable[str], description: str) -> Optional[str]:
    """ADC for a DERIVED image whose series description names an ADC map; None otherwise."""
    if "DERIVED" in {t.upper() for t in image_type} and ADC_DESCRIPTION.search(description or ""):
        return "ADC"
    return None


def is_isotropic(b: Optional[float], direction: Optional[tuple[float, float, float]], directionality_: Optional[str],
                 derived: Optional[str], seq_name: str) -> bool:
    """A derived trace image: ISOTROPIC directionality, a TRACE ImageType, Siemens' trailing `t`
    (ep_b1400t), or b>0 with an explicit zero gradient vector."""
    if directionality_ == "ISOTROPIC" or derived == "TRACE":
        return True
    if seq_name.rstrip().lower().endswith("t") and "ep_b" in seq_name.lower():
        return True
    if b and direction is not None and all(abs(c) < 1e-6 for c in direction):
        return True
    return False


def fat_suppressed(spectral: Optional[str], scan_options: Iterable[str]) -> tuple[Optional[bool], str]:
    """(fat-suppressed?, evidence) from (0018,9025) or ScanOptions. None means the header does not
    say (Philips keeps it in private fields)."""
    spectral = (spectral or "").upper()
    if spectral:
        return spectral in {"FAT", "FAT_AND_WATER"}, f"(0018,9025) SpectrallySelectedSuppression {spectral}"
    options = [t.upper() for t in scan_options]
    hits = [t for t in options if t in FAT_SAT_TOKENS or t.startswith("FS_") or t.endswith("_FS")]
    if hits:
        return True, f"ScanOptions {'/'.join(hits)}"
    if options:
        return False, f"ScanOptions {'/'.join(options)} has no fat-suppression token"
    return None, ""


def plane_of(orientation: Optional[Iterable[float]]) -> Optional[str]:
    """axial / sagittal / coronal from ImageOrientationPatient's slice normal; oblique beyond 45 degrees
    from every axis. Axial-oblique (PI-RADS' 'straight or oblique') stays axial."""
    if orientation is None:
        return None
    o = np.asarray(list(orientation), dtype=float)
    if o.shape != (6,):
        return None
    normal = np.cross(o[:3], o[3:])
    n = np.linalg.norm(normal)
    if n < 1e-6:
        return None
    normal = np.abs(normal / n)
    axis = int(np.argmax(normal))
    if normal[axis] < math.cos(math.radians(45)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]
