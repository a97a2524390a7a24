"""The sequence taxonomy shared by the header rules, the image model, the simulator and training.

Seed: the 3D ResNet prostate mpMRI sequence identification study (5 classes) plus `other`.
"""
from __future__ import annotations

from typing import Literal

SequenceLabel = Literal["T2WI_nan", "T2WI_fs", "DWI_Low", "DWI_High", "ADC", "other"]
LABELS: tuple[str, ...] = ("T2WI_nan", "T2WI_fs", "DWI_Low", "DWI_High", "ADC", "other")

# What an `other` series is, when the header can tell.
OtherKind = Literal["DCE", "localizer", "T1", "unknown"]

Plane = Literal["axial", "sagittal", "coronal", "oblique"]

# b-values below this are low-b DWI, at or above it high-b (the seed's split).
DWI_HIGH_MIN_B = 500.0
