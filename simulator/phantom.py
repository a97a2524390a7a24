"""Digital pelvis phantom with a zonal prostate and ground-truth lesions, varied per seed.

Grid and coordinates
--------------------
* ``labels[k, j, i]`` is a uint8 :class:`~scanside.simulator.physics.Tissue` code on an isotropic grid of
  ``voxel_mm`` (default 1 mm). Array axis 0 is z (inferior -> superior), axis 1 is y
  (anterior -> posterior), axis 2 is x (patient right -> patient left), i.e. the array is indexed
  ``[z_index, y_index, x_index]``.
* ``affine`` maps the column vector ``(x_index, y_index, z_index, 1)`` to DICOM patient
  coordinates LPS in mm (+x = patient left, +y = posterior, +z = superior). It is diagonal:
  ``LPS = origin + voxel_mm * (x_index, y_index, z_index)``; voxel centres sit on the indices.
* The grid covers the pelvic core (about 250 x 240 x 200 mm around the prostate). Outside it the
  body continues by a simple analytic rule (:meth:`Phantom.body_labels_at`: subcutaneous fat ring
  over muscle, air outside the skin; along z the grid is extended by its edge slices), so that
  large-FOV series (localizers) still see a body outline.

Anatomy (all varied per seed): elliptic body with a subcutaneous fat layer, pelvic fat, obturator
internus / levator ani / iliopsoas / rectus muscles, femoral heads and necks, acetabula, pubic
symphysis and rami, ischia, sacrum and coccyx (marrow in a cortical shell), iliac/femoral vessels,
bladder (filling varies) with a wall, rectum (wall + gas lumen) posterior to the gland, seminal
vesicles superior-posterior, prostate (20-80 ml) with a TZ centrally/anteriorly (growing with gland
volume, as in BPH) and the PZ as a posterior-lateral crescent.

Lesions and the csPCa rule
--------------------------
Lesions are ellipsoids (diameters 4-20 mm, random in-plane rotation) clipped to the gland, 70% in
the PZ and 30% in the TZ. Each carries its own ADC, T2 and DCE kinetics:

* **A lesion is clinically significant (csPCa) iff its largest diameter is >= 8 mm AND its ADC is
  <= 1100 (x 1e-6 mm^2/s).** The exam is csPCa-positive iff any lesion is.
* Significant lesions are drawn with ADC 700-1050, max diameter 9-20 mm, T2(3 T) 58-80 ms and fast
  enhancement with washout (Ktrans 0.4-0.8 /min).
* Indolent lesions are either ADC 1150-1400 with diameter 4-15 mm, or ADC 750-1100 but small
  (max diameter 4-7 mm); T2(3 T) 72-95 ms; Ktrans 0.18-0.32 /min.

The margins around the thresholds are deliberate so that a model can learn the rule from images.
``make_phantom(seed)`` is deterministic; ``cspca=`` / ``n_lesions=`` force the case.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from scanside.simulator.model import GroundTruthLesion
from scanside.simulator.physics import N_TISSUES, Tissue

CSPCA_MIN_DIAMETER_MM = 8.0
CSPCA_MAX_ADC = 1100.0


def is_cspca(diameters_mm, adc: float) -> bool:
    """The simulator's csPCa rule (see module docstring)."""
    return bool(max(diameters_mm) >= CSPCA_MIN_DIAMETER_MM and adc <= CSPCA_MAX_ADC)


@dataclass(eq=False)
class Phantom:
    labels: np.ndarray = field(repr=False)  # uint8 (z, y, x)
    affine: np.ndarray  # 4x4 (x_index, y_index, z_index, 1) -> LPS mm
    lesions: list[GroundTruthLesion]
    lesion_masks: np.ndarray = field(repr=False)  # int16 (z, y, x); 0 none, k = lesion k (1-based)
    prostate_center_lps_mm: tuple[float, float, float]
    prostate_volume_ml: float
    cspca: bool
    seed: int = 0
    voxel_mm: float = 1.0
    # per lesion (same order as `lesions`): adc, t2_3t_ms, ktrans, ve
    lesion_props: list[dict] = field(default_factory=list)
    # analytic body outside the grid: centre (x, y) LPS, semi-axes, fat thickness, taper
    body: dict = field(default_factory=dict)
    # optional sub-tissue texture (training realism, scanside.training.sequence.realism): texture_map (z, y, x) uint8,
    # 0 none, j = texture class j, whose parameters are its tissue's times the multipliers in texture_props[j - 1]
    # ({"tissue": code, "t2": x, "pd": x, "adc": x}); lesions win over texture
    texture_map: Optional[np.ndarray] = field(default=None, repr=False)
    texture_props: list[dict] = field(default_factory=list)
    _classes: Optional[np.ndarray] = field(default=None, repr=False)

    # ------------------------------------------------------------------ helpers
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3].copy()

    def mask(self, *tissues) -> np.ndarray:
        """Boolean mask of the voxels labelled with any of `tissues` (Tissue or int codes)."""
        if not tissues:
            raise ValueError("mask() needs at least one tissue")
        lut = np.zeros(256, dtype=bool)
        for t in tissues:
            lut[int(t)] = True
        return lut[self.labels]

    def prostate_mask(self) -> np.ndarray:
        return self.mask(Tissue.PZ, Tissue.TZ, Tissue.LESION)

    @property
    def classes(self) -> np.ndarray:
        """uint8 render classes: the tissue code, N_TISSUES + k - 1 for voxels of lesion k, then
        N_TISSUES + len(lesions) + j - 1 for voxels of texture class j."""
        if self._classes is None:
            c = self.labels.copy()
            lm = self.lesion_masks
            if self.texture_map is not None:
                tm = self.texture_map
                sel = tm > 0
                c[sel] = (N_TISSUES + len(self.lesions) - 1 + tm[sel]).astype(np.uint8)
            sel = lm > 0
            c[sel] = (N_TISSUES - 1 + lm[sel]).astype(np.uint8)
            self._classes = c
        return self._classes

    @property
    def n_classes(self) -> int:
        return N_TISSUES + len(self.lesions) + len(self.texture_props)

    def world_to_index(self, lps) -> np.ndarray:
        """LPS mm (..., 3) -> fractional (x_index, y_index, z_index) (..., 3)."""
        return (np.asarray(lps, dtype=np.float64) - self.affine[:3, 3]) / self.voxel_mm

    def index_to_world(self, xyz_index) -> np.ndarray:
        return np.asarray(xyz_index, dtype=np.float64) * self.voxel_mm + self.affine[:3, 3]

    def body_labels_at(self, x, y, z) -> np.ndarray:
        """Analytic body rule (air / subcutaneous fat / muscle) at LPS points (broadcastable)."""
        b = self.body
        return _body_rule(
            np.asarray(x) - b["cx"], np.asarray(y) - b["cy"], np.asarray(z) - b["cz"],
            b["a"], b["b"], b["fat"], b["taper"],
        )


def _body_rule(dx, dy, dz, a, b, fat, taper) -> np.ndarray:
    s = 1.0 + taper * np.clip(dz, -100.0, 100.0) / 100.0
    as_, bs = a * s, b * s
    rho_out = (dx / as_) ** 2 + (dy / bs) ** 2
    rho_in = (dx / np.maximum(as_ - fat, 1.0)) ** 2 + (dy / np.maximum(bs - fat, 1.0)) ** 2
    out = np.full(np.broadcast(dx, dy, dz).shape, Tissue.BACKGROUND, dtype=np.uint8)
    out[rho_out <= 1.0] = Tissue.FAT
    out[rho_in <= 1.0] = Tissue.MUSCLE
    return out


def _rot(axis: str, deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


class _Grid:
    """Grid relative to the prostate centre (coordinates in mm relative to it)."""

    def __init__(self, lo, n, v):
        self.lo = np.asarray(lo, dtype=np.float64)
        self.n = tuple(int(k) for k in n)  # (nx, ny, nz)
        self.v = float(v)
        self.x = (self.lo[0] + v * np.arange(self.n[0])).astype(np.float32)
        self.y = (self.lo[1] + v * np.arange(self.n[1])).astype(np.float32)
        self.z = (self.lo[2] + v * np.arange(self.n[2])).astype(np.float32)

    def block(self, center, half):
        """Index slices (z, y, x) of the box center +- half and broadcastable offsets dx, dy, dz."""
        sl = []
        offs = []
        for ax, arr in ((2, self.z), (1, self.y), (0, self.x)):
            lo = int(np.floor((center[ax] - half[ax] - self.lo[ax]) / self.v))
            hi = int(np.ceil((center[ax] + half[ax] - self.lo[ax]) / self.v)) + 1
            lo, hi = max(lo, 0), min(hi, self.n[ax])
            if hi <= lo:
                return None
            sl.append(slice(lo, hi))
            offs.append(arr[lo:hi] - np.float32(center[ax]))
        dz = offs[0][:, None, None]
        dy = offs[1][None, :, None]
        dx = offs[2][None, None, :]
        return tuple(sl), dx, dy, dz

    def ellipsoid(self, center, radii, rot=None):
        """(slices, rho2) for an ellipsoid; rot maps world offsets into the ellipsoid frame."""
        r = float(max(radii))
        blk = self.block(center, (r, r, r) if rot is not None else radii)
        if blk is None:
            return None
        sl, dx, dy, dz = blk
        if rot is not None:
            R = np.asarray(rot, dtype=np.float32)
            lx = R[0, 0] * dx + R[0, 1] * dy + R[0, 2] * dz
            ly = R[1, 0] * dx + R[1, 1] * dy + R[1, 2] * dz
            lz = R[2, 0] * dx + R[2, 1] * dy + R[2, 2] * dz
        else:
            lx, ly, lz = dx, dy, dz
        rho2 = (lx / np.float32(radii[0])) ** 2 + (ly / np.float32(radii[1])) ** 2 + (lz / np.float32(radii[2])) ** 2
        return sl, rho2


def _paint(labels, grid: _Grid, center, radii, value, rot=None, only=None, shell=None):
    """Paint an ellipsoid; `only`: tissue codes that may be overwritten; `shell`: (mm, code) cortex."""
    e = grid.ellipsoid(center, radii, rot)
    if e is None:
        return
    sl, rho2 = e
    sub = labels[sl]
    m = rho2 <= 1.0
    if only is not None:
        m &= np.isin(sub, np.asarray(only, dtype=np.uint8))
    sub[m] = value
    if shell is not None:
        t, code = shell
        inner = [max(rr - t, 0.5) for rr in radii]
        e2 = grid.ellipsoid(center, inner, rot)
        if e2 is None:
            return
        # rho of the inner ellipsoid over the same block
        sl2, rho2_in = e2
        full_in = np.zeros_like(m)
        # map inner block into the outer block
        o = [s2.start - s1.start for s1, s2 in zip(sl, sl2)]
        full_in[o[0]:o[0] + rho2_in.shape[0], o[1]:o[1] + rho2_in.shape[1], o[2]:o[2] + rho2_in.shape[2]] = rho2_in <= 1.0
        sub[m & ~full_in] = code


def make_phantom(
    seed: int,
    *,
    n_lesions: int | None = None,
    cspca: bool | None = None,
    voxel_mm: float = 1.0,
) -> Phantom:
    """Build a phantom deterministically from `seed`.

    n_lesions: force the number of lesions (default: 0-3, drawn).
    cspca: force the exam-level truth (True: at least one significant lesion; False: none).
    """
    if cspca is True and n_lesions == 0:
        raise ValueError("cspca=True needs at least one lesion")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5CA9]))
    v = float(voxel_mm)
    U = rng.uniform

    # prostate centre in LPS (near isocentre, as a technologist would position the patient)
    c = np.array([U(-8, 8), U(-12, 12), U(-15, 15)])
    lo = np.array([-126.0, -112.0, -96.0])
    hi = np.array([126.0, 128.0, 104.0])
    n = np.floor((hi - lo) / v).astype(int) + 1
    grid = _Grid(lo, n, v)
    nx, ny, nz = grid.n

    # ------------------------------------------------------------------ body
    body = dict(a=U(150, 182), b=U(105, 130), cy_rel=U(12, 28), fat=U(10, 40), taper=U(0.0, 0.12))
    labels = _body_rule(
        grid.x[None, None, :], grid.y[None, :, None] - np.float32(body["cy_rel"]), grid.z[:, None, None],
        body["a"], body["b"], body["fat"], body["taper"],
    )
    # pelvic (perivesical / ischiorectal) fat
    _paint(labels, grid, (0, 8, 10), (U(55, 65), U(58, 68), 115), Tissue.FAT, only=[Tissue.MUSCLE])

    # ------------------------------------------------------------------ prostate geometry
    vol_target = float(np.exp(U(np.log(22.0), np.log(75.0))))  # ml
    asp = np.array([1.2 * U(0.9, 1.1), 0.85 * U(0.9, 1.1), 1.0 * U(0.9, 1.1)])
    k = (vol_target * 1000.0 / (4.0 / 3.0 * np.pi * np.prod(asp))) ** (1.0 / 3.0)
    pa, pb, pc = (k * asp).tolist()

    # ------------------------------------------------------------------ muscles
    for sx in (-1, 1):
        _paint(labels, grid, (sx * (pa + U(22, 30)), U(-5, 5), 0), (U(8, 11), U(28, 36), U(34, 42)), Tissue.MUSCLE)
        _paint(labels, grid, (sx * (pa * 0.8 + 8), pb + 12, -pc - 5), (6, U(18, 24), U(18, 24)), Tissue.MUSCLE,
               rot=_rot("x", 30))
        _paint(labels, grid, (sx * U(65, 75), U(-45, -35), 50), (U(20, 25), U(22, 27), 70), Tissue.MUSCLE)
        _paint(labels, grid, (sx * 35, body["cy_rel"] - body["b"] + body["fat"] + 6, 40), (30, 7, 110), Tissue.MUSCLE,
               only=[Tissue.FAT, Tissue.MUSCLE])
        # vessels (external iliac / femoral artery and vein)
        vx = U(58, 66)
        _paint(labels, grid, (sx * (vx + 12), -42, 10), (4.5, 4.5, 140), Tissue.VESSEL)
        _paint(labels, grid, (sx * vx, -40, 10), (6.5, 6.0, 140), Tissue.VESSEL)

    # ------------------------------------------------------------------ bones (marrow in a cortex)
    shell = (2.5, Tissue.BONE_CORTEX)
    for sx in (-1, 1):
        hx = U(88, 100)
        _paint(labels, grid, (sx * (hx - 12), 5, 32), (18, 38, 45), Tissue.BONE_MARROW, shell=shell)  # acetabulum/ilium
        _paint(labels, grid, (sx * 55, 32, -28), (13, 20, 26), Tissue.BONE_MARROW, shell=shell)  # ischium
        _paint(labels, grid, (sx * 45, -38, 12), (35, 10, 10), Tissue.BONE_MARROW, shell=shell)  # superior ramus
        _paint(labels, grid, (sx * 11, -pb - U(22, 30), 2), (9, 11, 22), Tissue.BONE_MARROW, shell=shell)  # symphysis
        rh = U(22, 26)
        _paint(labels, grid, (sx * hx, -5, 5), (rh, rh, rh), Tissue.BONE_MARROW, shell=shell)  # femoral head
        _paint(labels, grid, (sx * (hx + 28), 0, -18), (32, 15, 15), Tissue.BONE_MARROW, shell=shell,
               rot=_rot("y", sx * 35))  # femoral neck
    _paint(labels, grid, (0, U(82, 95), 60), (45, 16, 55), Tissue.BONE_MARROW, shell=shell, rot=_rot("x", 25))  # sacrum
    _paint(labels, grid, (0, U(58, 66), -5), (9, 8, 18), Tissue.BONE_MARROW, shell=shell, rot=_rot("x", 30))  # coccyx

    # ------------------------------------------------------------------ bladder
    fill = U(0.15, 1.0)
    br = (28 + 32 * fill, 22 + 26 * fill, 18 + 28 * fill)
    bc = (U(-5, 5), -12 + U(-5, 5), pc + 0.85 * br[2] + 2)
    wall = U(2.5, 4.0)
    _paint(labels, grid, bc, (br[0] + wall, br[1] + wall, br[2] + wall), Tissue.MUSCLE,
           only=[Tissue.FAT, Tissue.MUSCLE, Tissue.VESSEL])
    _paint(labels, grid, bc, br, Tissue.BLADDER, only=[Tissue.FAT, Tissue.MUSCLE, Tissue.VESSEL])

    # ------------------------------------------------------------------ rectum (tube along z)
    rr = U(11, 18)
    rw = U(2.5, 4.0)
    lumen = rr * (U(0.25, 0.45) if U() < 0.35 else U(0.55, 0.9))
    y0 = pb * 0.92 + rw + rr + 1.0
    blk = grid.block((0, y0, 5), (rr * 1.2 + rw + 2, rr + rw + 27, 85))
    if blk is not None:
        sl, dx, dy, dz = blk
        zrel = dz + np.float32(5)
        # rectum hugs the gland, curves posteriorly above it (sacrum) and below it (anal canal)
        yc = np.float32(0.28) * np.maximum(zrel, 0) - np.float32(0.1) * np.minimum(zrel, 0)
        rho_o = (dx / np.float32((rr + rw) * 1.15)) ** 2 + ((dy - yc) / np.float32(rr + rw)) ** 2
        rho_i = (dx / np.float32(lumen * 1.15)) ** 2 + ((dy - yc) / np.float32(lumen)) ** 2
        sub = labels[sl]
        m_o = (rho_o <= 1.0) & np.isin(sub, [Tissue.FAT, Tissue.MUSCLE])
        sub[m_o] = Tissue.RECTUM
        sub[(rho_i <= 1.0) & m_o] = Tissue.RECTAL_GAS

    # ------------------------------------------------------------------ seminal vesicles
    for sx in (-1, 1):
        _paint(labels, grid, (sx * (0.42 * pa + 9), 0.55 * pb + 4, pc + 3), (U(16, 22), U(5.5, 7.5), U(7, 9)),
               Tissue.SEMINAL_VESICLE, rot=_rot("y", sx * U(15, 30)), only=[Tissue.FAT, Tissue.MUSCLE])

    # ------------------------------------------------------------------ prostate (deformed ellipsoid)
    blk = grid.block((0, 0, 0), (pa * 1.3, pb * 1.3, pc * 1.3))
    sl, dx, dy, dz = blk
    taper = U(0.15, 0.35)
    sx_ = np.float32(pa) * (1.0 - np.float32(taper) * np.clip(-dz / np.float32(pc), 0, 1))  # narrower apex
    sy_ = np.where(dy > 0, np.float32(pb * U(0.8, 0.92)), np.float32(pb))  # flatter posteriorly
    rho2 = (dx / sx_) ** 2 + (dy / sy_) ** 2 + (dz / np.float32(pc)) ** 2
    theta = np.arctan2(dy, dx)
    amp = rng.uniform(0.0, 0.06, size=3)
    ph = rng.uniform(0, 2 * np.pi, size=3)
    bump = 1.0 + amp[0] * np.cos(2 * theta + ph[0]) + amp[1] * np.cos(3 * theta + ph[1]) \
        + amp[2] * np.cos(np.pi * dz / np.float32(pc) + ph[2])
    prost = rho2 <= bump.astype(np.float32) ** 2
    # TZ: central/anterior, grows with gland volume (BPH)
    s_tz = 0.45 + 0.3 * float(np.clip((vol_target - 20.0) / 60.0, 0.0, 1.0))
    tz_c = (0.0, -0.22 * pb, 0.12 * pc)
    rho_tz = (dx / np.float32(s_tz * pa * 1.05)) ** 2 + ((dy - np.float32(tz_c[1])) / np.float32(s_tz * pb * 1.1)) ** 2 \
        + ((dz - np.float32(tz_c[2])) / np.float32(s_tz * pc * 1.15)) ** 2
    tz = prost & ((rho_tz <= 1.0) | (dy < np.float32(-0.4 * pb)))
    sub = labels[sl]
    sub[prost] = Tissue.PZ
    sub[tz] = Tissue.TZ

    # ------------------------------------------------------------------ lesions
    if n_lesions is None:
        n_les = int(rng.choice([0, 1, 2, 3], p=[0.35, 0.4, 0.18, 0.07]))
        if cspca is True:
            n_les = max(n_les, 1)
    else:
        n_les = int(n_lesions)
    lesion_masks = np.zeros(labels.shape, dtype=np.int16)
    lm_sub = lesion_masks[sl]
    zone_masks = {"PZ": sub == Tissue.PZ, "TZ": sub == Tissue.TZ}
    prost_sub = prost
    lesions: list[GroundTruthLesion] = []
    props: list[dict] = []
    origin = c + lo  # LPS of voxel index 0
    block_origin = origin + v * np.array([sl[2].start, sl[1].start, sl[0].start])
    for li in range(n_les):
        if cspca is True:
            significant = li == 0 or U() < 0.4
        elif cspca is False:
            significant = False
        else:
            significant = U() < 0.45
        if significant:
            adc = U(700, 1050)
            dmax = U(9, 20)
            t2 = 58 + 22 * (adc - 700) / 350 + U(-3, 3)
            ktrans, ve = U(0.4, 0.8), U(0.3, 0.45)
        else:
            if U() < 0.7:
                adc, dmax = U(1150, 1400), U(4, 15)
            else:
                adc, dmax = U(750, 1100), U(4, 7)
            t2 = 72 + 23 * np.clip((adc - 750) / 650, 0, 1) + U(-3, 3)
            ktrans, ve = U(0.18, 0.32), U(0.3, 0.45)
        diam = np.array([dmax, dmax * U(0.6, 1.0), dmax * U(0.6, 1.0)])
        zone = "PZ" if U() < 0.7 else "TZ"
        zmask = zone_masks[zone] & (lm_sub == 0)
        cand = np.flatnonzero(zmask)
        if cand.size == 0:
            zone = "TZ" if zone == "PZ" else "PZ"
            cand = np.flatnonzero(zone_masks[zone] & (lm_sub == 0))
        placed = False
        for attempt in range(120):
            if attempt and attempt % 30 == 0:  # gland too small: shrink, keeping the lesion's class
                floor = 9.0 if significant else 4.0
                diam = np.maximum(diam * 0.85, [floor, floor * 0.6, floor * 0.6])
            kz, ky, kx = np.unravel_index(int(cand[rng.integers(cand.size)]), zmask.shape)
            ctr = np.array([dx[0, 0, kx], dy[0, ky, 0], dz[kz, 0, 0]], dtype=np.float64)
            R = _rot("z", U(0, 180))
            lx = np.float32(R[0, 0]) * (dx - np.float32(ctr[0])) + np.float32(R[1, 0]) * (dy - np.float32(ctr[1]))
            ly = np.float32(R[0, 1]) * (dx - np.float32(ctr[0])) + np.float32(R[1, 1]) * (dy - np.float32(ctr[1]))
            lz = dz - np.float32(ctr[2])
            ell = (lx / np.float32(diam[0] / 2)) ** 2 + (ly / np.float32(diam[1] / 2)) ** 2 \
                + (lz / np.float32(diam[2] / 2)) ** 2 <= 1.0
            nominal = int(ell.sum())
            m = ell & prost_sub & (lm_sub == 0)
            if nominal == 0 or m.sum() < 0.6 * nominal:
                continue
            idx = np.argwhere(m)
            cz, cy, cx = idx.mean(axis=0)
            if not prost_sub[int(round(cz)), int(round(cy)), int(round(cx))]:
                continue
            lm_sub[m] = len(lesions) + 1
            centre_lps = block_origin + v * np.array([cx, cy, cz])
            lesions.append(GroundTruthLesion(
                center_lps_mm=tuple(float(t) for t in centre_lps),
                diameters_mm=tuple(float(t) for t in diam),
                zone=zone,  # type: ignore[arg-type]
                cspca=is_cspca(diam, adc),
                adc=float(adc),
            ))
            props.append(dict(adc=float(adc), t2_3t_ms=float(t2), ktrans=float(ktrans), ve=float(ve)))
            placed = True
            break
        if not placed:
            raise RuntimeError(f"could not place lesion {li} in phantom seed {seed}")
    sub[lm_sub > 0] = Tissue.LESION

    pm = np.isin(sub, [Tissue.PZ, Tissue.TZ, Tissue.LESION])
    cnt = int(pm.sum())
    ci = np.argwhere(pm).mean(axis=0)
    centre = block_origin + v * np.array([ci[2], ci[1], ci[0]])

    affine = np.eye(4)
    affine[:3, :3] *= v
    affine[:3, 3] = origin
    body_abs = dict(cx=float(c[0]), cy=float(c[1] + body["cy_rel"]), cz=float(c[2]),
                    a=body["a"], b=body["b"], fat=body["fat"], taper=body["taper"])
    return Phantom(
        labels=labels,
        affine=affine,
        lesions=lesions,
        lesion_masks=lesion_masks,
        prostate_center_lps_mm=tuple(float(t) for t in centre),
        prostate_volume_ml=cnt * v**3 / 1000.0,
        cspca=any(les.cspca for les in lesions),
        seed=int(seed),
        voxel_mm=v,
        lesion_props=props,
        body=body_abs,
    )
