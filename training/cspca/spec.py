"""The csPCa model's input contract: one PreprocessSpec shared by training, evaluation and the agent
(it is written into the manifest; the agent reads it from there).

Grid: 3.0 x 1.5 x 1.5 mm, 20 x 64 x 64 voxels (60 x 96 x 96 mm) in "SPL" order, centred on the
axial T2W slab centre (or the gland centroid when given). Coarser in-plane than PI-CAI's
3.0 x 0.5 x 0.5 mm (20 x 256 x 256) on purpose: the DWI/ADC channels are acquired at ~1.6 mm
in-plane anyway, a csPCa lesion (>= 8 mm) still spans >= 5 voxels in-plane, and the grid has 36x
fewer voxels than PI-CAI's crop, which is what makes training from scratch on a 2-core CPU fit in
minutes. 96 mm in-plane and 60 mm cranio-caudal cover the largest simulated gland (80 ml).
"""
from __future__ import annotations

from scanside.engines.spec import PreprocessSpec

#: the channel keys the runtime passes to scanside.engines.preprocess.prepare (volumes dict keys)
CHANNELS = ("T2W", "ADC", "HBV")

CSPCA_SPEC = PreprocessSpec(
    channels=list(CHANNELS),
    axcodes="SPL",
    spacing_mm=(3.0, 1.5, 1.5),
    shape=(20, 64, 64),
    crop="center",
    normalize="zscore_percentile",
    clip_percentiles=(0.5, 99.5),
)
