"""Diffusion physics across the series that share one image grid: which is the ADC map, and which
diffusion-weighted images hang on it, from pixels alone (no header field).

A diffusion-weighted signal decays as S(b) = S0 exp(-b D), and an ADC map holds D voxel by voxel. So
for two images of one acquisition, ln(S_i / S_j) = (b_j - b_i) D: against the ADC map, a straight line
through the origin, whatever the anatomy, field strength, coil or vendor. No simulator enters this; it
is why it holds on real scans where the sequence classifier (trained on phantoms) does not (issue 18:
three real Siemens ADC maps read as low-b DWI, a calculated b1600 as fat-suppressed T2W).

* **ADC map**: a series for which some pair of other series on its grid gives ln(S_i / S_j) with a
  correlation of at least ``ADC_MIN_FIT`` and an intercept within ``ADC_MAX_INTERCEPT`` of the line's
  height (measured on the real ProstateX exam: 0.998-0.999 for its two ADC maps, at most 0.78 for any
  other series; a map of another quantity, an FA map or a DCE phase, does not follow the decay).
* **its ladder**: the brighter image of that pair (the least diffusion-weighted, the reference) and every
  image X whose ln(S_ref / S_X) follows the map (correlation >= ``MEMBER_MIN_FIT``, intercept within
  ``MEMBER_MAX_INTERCEPT`` in log units: an image of another acquisition, scaled differently, has an
  offset and is left out). Its b-value above the reference's is the median of ln(S_ref / S_X) / D.
  An image a small b-step above the reference (b0 -> b100: r 0.30 on ProstateX, the step drowned in
  noise) cannot reach that correlation: with a positive slope, the same scale (the intercept test) and
  r >= ``WEAK_MIN_FIT`` it is a *weak* member, which says "a diffusion-weighted image" only where the
  classifier says so too (scanside.engines.tasks.image_label.ImageClassifier.with_diffusion).
* **units**: ADC maps are stored in 10^-3, 10^-5 or 10^-6 mm^2/s and so on; the power of ten that puts
  the map's median inside tissue near 1e-3 mm^2/s (pelvic tissue 0.8-2e-3, urine 3e-3) is the unit.

What the b-value step measures is not exact: decay is not mono-exponential (perfusion at low b, kurtosis
at high b), so an ADC map fitted on other b-values over-estimates the step, by +4 % at b0->b800 and +24 %
at b0->b400 on ProstateX's 4-b map, +74 % at b100->b500 on its map fitted at high b. An image is therefore
called high-b from the physics alone only when its step is at least ``HIGH_B_STEP`` (2x the 500 s/mm^2
boundary: the reference's own b-value is at least 0); below that the physics says only "a
diffusion-weighted image of this ladder" and leaves low vs high b to the classifier.
Numpy only (runtime path).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Literal, Mapping, Optional

import numpy as np

ADC_MIN_FIT = 0.9  # real maps 0.998-0.999, the best non-map 0.78: lower-SNR maps (a 2-b fit at 1.5 T) keep room
ADC_MAX_INTERCEPT = 0.1  # of the line's height at the map's mean
MEMBER_MIN_FIT = 0.9
WEAK_MIN_FIT = 0.2
MEMBER_MAX_INTERCEPT = 0.2  # log units: another acquisition's scale sits 0.35-0.44 off on ProstateX
HIGH_B_STEP = 1000.0
TISSUE_ADC = 1e-3  # mm^2/s, the unit's anchor
MIN_STEP, MAX_STEP = 50.0, 5000.0  # s/mm^2: an ADC pair's implied b-step outside this is not diffusion
MAX_VOXELS = 60_000  # evenly spaced voxels per fit: enough for a correlation, fast on a CPU
MIN_VOXELS = 500
MAX_SERIES = 16  # per grid: the pair search is cubic in it (a DWI acquisition and its maps are 3-12 series)


@dataclass(frozen=True)
class DiffusionRole:
    """What the physics says of one series of a grid."""

    kind: Literal["ADC", "DWI"]
    fit: float  # correlation of the fit that placed it
    adc: str  # key of the ADC map (itself for kind ADC)
    reference: str  # key of the ladder's least diffusion-weighted image
    b_step: float = 0.0  # DWI: its b-value above the reference's, s/mm^2 (0 for the reference)
    unit: float = 1e6  # ADC map value per mm^2/s
    weak: bool = False  # DWI: on the ladder by its scale and slope only (fit below MEMBER_MIN_FIT)

    @property
    def high_b(self) -> bool:
        return self.kind == "DWI" and not self.weak and self.b_step >= HIGH_B_STEP

    def evidence(self, names: Optional[Mapping[str, str]] = None) -> str:
        n = (names or {}).get
        ref, adc = n(self.reference) or self.reference, n(self.adc) or self.adc
        if self.kind == "ADC":
            return (f"diffusion physics: ln(S/S') of the series' diffusion images follows this map voxel by voxel "
                    f"(r={self.fit:.3f}, against {ref}): an ADC map")
        if self.b_step == 0.0 and not self.weak:
            return f"diffusion physics: the least diffusion-weighted image of the ladder the ADC map {adc} was fitted on"
        if self.weak:
            return (f"diffusion physics: on the scale of {ref} and darker, decaying along ADC map {adc} as far as the "
                    f"noise shows (r={self.fit:.2f}): a diffusion-weighted image")
        return (f"diffusion physics: decays from {ref} as ADC map {adc} says (r={self.fit:.3f}), "
                f"b about {self.b_step:.0f} s/mm^2 above it")


def _sample(a: np.ndarray) -> np.ndarray:
    """Evenly spaced voxels, as float64: taken before the cast, so a large 3D series costs no full copy."""
    flat = np.asarray(a).reshape(-1)
    step = max(1, flat.size // MAX_VOXELS)
    return np.nan_to_num(flat[::step].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Correlation, slope and intercept of y against x."""
    sx, sy = float(x.std()), float(y.std())
    if sx <= 0 or sy <= 0:
        return 0.0, 0.0, 0.0
    r = float(np.mean((x - x.mean()) * (y - y.mean())) / (sx * sy))
    slope = r * sy / sx
    return r, slope, float(y.mean() - slope * x.mean())


class _Samples:
    """The sampled voxels of each series, with what every fit needs computed once: logs, and the masks of
    voxels above each series' median (a bright image's tissue) and above half of it (signal in a dark one)."""

    def __init__(self, images: Mapping[str, np.ndarray], keys: list[str]):
        self.v = {k: _sample(images[k]) for k in keys}
        self.mean = {k: float(v.mean()) for k, v in self.v.items()}
        self.positive = {k: v > 0 for k, v in self.v.items()}
        self.log = {k: np.log(np.where(self.positive[k], v, 1.0)) for k, v in self.v.items()}
        p50 = {k: float(np.percentile(v, 50)) for k, v in self.v.items()}
        self.bright = {k: (v > p50[k]) & self.positive[k] for k, v in self.v.items()}
        self.signal = {k: (v > 0.5 * p50[k]) & self.positive[k] for k, v in self.v.items()}

    def decay(self, adc: str, bright: str, dark: str) -> Optional[tuple[float, float, float, np.ndarray, np.ndarray]]:
        """ln(bright / dark) against the map over the voxels where both carry signal: (correlation, slope,
        intercept, the map's values there, the log-ratios), None with too few voxels."""
        m = self.bright[bright] & self.signal[dark] & self.positive[adc]
        if int(m.sum()) < MIN_VOXELS:
            return None
        a, r = self.v[adc][m], self.log[bright][m] - self.log[dark][m]
        c, slope, icpt = _line(a, r)
        return c, slope, icpt, a, r


def _firmness(role: DiffusionRole) -> tuple[int, float]:
    return (2 if role.b_step > 0 and not role.weak else 1 if role.weak else 0), role.fit


def unit_of(adc_values: np.ndarray) -> float:
    """Map value per mm^2/s: the power of ten that puts the median near TISSUE_ADC."""
    med = float(np.median(adc_values))
    return float(10.0 ** round(np.log10(max(med, 1e-12) / TISSUE_ADC)))


def diffusion_roles(images: Mapping[str, np.ndarray]) -> Dict[str, DiffusionRole]:
    """Roles of the series of one grid (arrays of one shape, keyed by the caller). Series the physics
    says nothing of are left out."""
    keys = [k for k, a in images.items() if np.asarray(a).size >= MIN_VOXELS][:MAX_SERIES]
    if len(keys) < 3 or len({np.asarray(images[k]).shape for k in keys}) != 1:
        return {}
    s = _Samples(images, keys)
    best: Dict[str, tuple[float, str]] = {}  # candidate map -> (fit, the brighter image of its best pair)
    for i, j in itertools.permutations(keys, 2):
        if s.mean[i] <= s.mean[j]:
            continue
        for cand in keys:
            if cand in (i, j):
                continue
            fit = s.decay(cand, i, j)
            if fit is None:
                continue
            c, slope, icpt, a, _ = fit
            if c < ADC_MIN_FIT or slope <= 0 or abs(icpt) > ADC_MAX_INTERCEPT * slope * float(a.mean()):
                continue
            if MIN_STEP <= slope * unit_of(a) <= MAX_STEP and (cand not in best or c > best[cand][0]):
                best[cand] = (c, i)
    maps: Dict[str, tuple[float, str, float]] = {}  # ADC map -> (fit, reference, unit)
    for cand, (c, ref) in best.items():
        valid = s.positive[cand] & s.bright[ref]
        maps[cand] = (c, ref, unit_of(s.v[cand][valid]) if valid.any() else 1e6)
    roles: Dict[str, DiffusionRole] = {k: DiffusionRole("ADC", fit, k, ref, unit=u) for k, (fit, ref, u) in maps.items()}
    for adc, (_, ref, unit) in maps.items():
        ladder = {ref: DiffusionRole("DWI", 1.0, adc, ref, 0.0, unit)}
        for x in keys:
            if x in maps or x == ref:
                continue
            fit = s.decay(adc, ref, x)
            if fit is None:
                continue
            c, slope, icpt, a, r = fit
            if c < WEAK_MIN_FIT or slope <= 0 or abs(icpt) > MEMBER_MAX_INTERCEPT or s.mean[x] >= s.mean[ref]:
                continue
            step = float(np.median(r / (a / unit)))
            ladder[x] = DiffusionRole("DWI", c, adc, ref, max(step, 0.0), unit, weak=c < MEMBER_MIN_FIT)
        for x, role in ladder.items():
            # an image on two ladders keeps the firmest place: a fitted step, then a weak one, then the reference
            held = roles.get(x)
            if x not in maps and (held is None or _firmness(role) > _firmness(held)):
                roles[x] = role
    return roles
