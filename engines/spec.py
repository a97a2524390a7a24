"""How a model wants its input prepared: carried in the model's manifest, executed by
scanside.engines.preprocess, so that training, calibration, evaluation and the agent prepare alike."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field


class WindowSpec(BaseModel):
    """Sliding-window inference over a volume larger than the model's input."""

    roi: tuple[int, int, int]  # in the model's axis order
    overlap: float = 0.5
    blend: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = 0.125  # gaussian importance map sigma, as a fraction of the roi


class DetailView(BaseModel):
    """One more input channel: the first channel again, resampled to a fixed fine spacing and
    cropped to the spec's shape around the grid centre. A whole-field-of-view resize hides how
    finely a series was acquired (a 0.6 mm T2W and a 2 mm EPI look alike at 3 mm); this view
    keeps it, so that the model sees resolution and noise texture as well as contrast."""

    spacing_mm: tuple[float, float, float] = Field(description="voxel size along the model's axes, in that order")


class PreprocessSpec(BaseModel):
    """Reorient -> resample -> crop/pad -> normalise, per channel, then stack channels
    (then the detail views of the first channel, each one more channel)."""

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
    detail_views: list[DetailView] = Field(
        default_factory=list, description="extra channels: the first channel at a fixed fine spacing, centre-cropped "
        "to `shape` (same orientation as the main grid); stacked after `channels`")

    @property
    def n_input_channels(self) -> int:
        return len(self.channels) + len(self.detail_views)
