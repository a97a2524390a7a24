"""How a model wants its input prepared: carried in the model's manifest, executed by
engines.preprocess, so that training, calibration, evaluation and the agent prepare alike."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field


class WindowSpec(BaseModel):
    """Sliding-window inference over a volume larger than the model's input."""

    roi: tuple[int, int, int]  # in the model's axis order
    overlap: float = 0.5
    blend: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = 0.125  # gaussian importance map sigma, as a fraction of the roi


class PreprocessSpec(BaseModel):
    """Reorient -> resample -> crop/pad -> normalise, per channel, then stack channels."""

    channels: list[str] = Field(description="series labels stacked as input channels, e.g. T2WI_nan, ADC, DWI_High")
    axcodes: str = Field("SPL", description="orientation codes of the model's array axes (nibabel style, LPS world)")
    spacing_mm: tuple[float, float, float] = Field(description="voxel size along the model's axes, in that order")
    shape: Optional[tuple[int, int, int]] = Field(None, description="crop/pad target; None keeps the resampled extent (sliding window)")
    crop: Literal["center", "gland", "none"] = "center"
    orientation: Literal["axcodes", "acquisition"] = Field(
        "axcodes", description="axcodes: reorient to `axcodes`; acquisition: keep the series' own array axes "
        "(slice, row, col) whatever its plane (for models that look at contrast, not anatomy)")
    fit: Literal["crop", "resize"] = Field(
        "crop", description="crop: resample to spacing_mm, then crop/pad to shape; resize: the whole field of view "
        "is resampled onto `shape` (spacing = extent / shape per axis; spacing_mm is then only nominal)")
    antialias: bool = Field(
        False, description="gaussian prefilter (sigma = (zoom - 1) / 2 source voxels) along axes that are downsampled")
    normalize: Literal["zscore_percentile", "zscore_nonzero", "none"] = "zscore_percentile"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    window: Optional[WindowSpec] = None
