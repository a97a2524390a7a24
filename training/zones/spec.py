"""The zonal model's input contract: one PreprocessSpec shared by training, evaluation and the agent
(written into the manifest; the agent reads it from there).

Grid: 3.0 x 1.0 x 1.0 mm, 24 x 128 x 128 voxels (72 x 128 x 128 mm) in "SPL" order, centred on the
axial T2W slab centre: a PI-RADS axial T2W (3 mm slices, 24 slices, FOV 120-200 mm) centred on the
prostate fits, and the largest simulated gland (80 ml, ~60 mm) with room for a centring error of
~30 mm in-plane. 1 mm in-plane is coarser than the T2W (0.4-0.7 mm) on purpose: zone boundaries are
smooth, and a 2.5D U-Net on 128 x 128 slices trains from scratch on a 2-core CPU in minutes.
"""
from __future__ import annotations

from scanside.engines.spec import PreprocessSpec

CHANNELS = ("T2W",)
#: class index -> label (background, transition zone, peripheral zone)
LABELS = ("background", "TZ", "PZ")

ZONES_SPEC = PreprocessSpec(
    channels=list(CHANNELS),
    axcodes="SPL",
    spacing_mm=(3.0, 1.0, 1.0),
    shape=(24, 128, 128),
    crop="center",
    normalize="zscore_percentile",
    clip_percentiles=(0.5, 99.5),
)
