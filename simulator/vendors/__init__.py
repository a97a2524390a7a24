"""Vendor DICOM writers of the virtual scanner (Siemens VE / XA, GE, Philips)."""
from __future__ import annotations

from scanside.simulator.vendors.common import StudyContext, VendorWriter, WrittenFile, make_study_context

VENDORS = ("siemens", "siemens-xa", "ge", "philips")


def get_writer(vendor: str) -> VendorWriter:
    """A fresh writer for one vendor (writers keep small per-series caches)."""
    if vendor == "siemens":
        from scanside.simulator.vendors.siemens import SiemensWriter
        return SiemensWriter()
    if vendor == "siemens-xa":
        from scanside.simulator.vendors.siemens_xa import SiemensXAWriter
        return SiemensXAWriter()
    if vendor == "ge":
        from scanside.simulator.vendors.ge import GEWriter
        return GEWriter()
    if vendor == "philips":
        from scanside.simulator.vendors.philips import PhilipsWriter
        return PhilipsWriter()
    raise ValueError(f"unknown vendor {vendor!r}; expected one of {VENDORS}")


__all__ = ["VENDORS", "StudyContext", "VendorWriter", "WrittenFile", "get_writer", "make_study_context"]
