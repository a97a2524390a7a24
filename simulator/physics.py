"""MR physics for the virtual scanner: tissue codes, tissue constants, signal equations, DCE kinetics.

Units: T1/T2 in ms, PD relative (urine = 1), ADC in 1e-6 mm^2/s (1.5e-3 mm^2/s -> 1500),
Ktrans and kep in 1/min, ve/vp fractions, time in seconds unless a name says otherwise.

Tissue constants (rounded; the renderer needs plausible contrast, not a quantitative atlas):
  * de Bazelaire et al., Radiology 2004;230:652 "MR imaging relaxation times of abdominal and pelvic
    tissues measured in vivo at 3.0 T: preliminary results": prostate T1 1317/1597 ms, T2 88/74 ms
    (1.5/3 T); subcutaneous fat T1 343/382, T2 58/68; bone marrow T1 549/586, T2 49/49.
  * Stanisz et al., MRM 2005;54:507 "T1, T2 relaxation and magnetization transfer in tissue at 3T":
    skeletal muscle T1 1008/1412 ms, T2 44/50 ms (1.5/3 T); blood T1 1441/1932, T2 290/275.
  * Prostate zones: Gibbs et al., MRM 2001 (1.5 T, PZ T2 ~ 170-190 ms, central gland ~ 100-120 ms,
    tumour ~ 80-100 ms); Liu et al., JMRI 2012 / Chatterjee et al., Radiology 2015 (3 T: PZ ~ 130-150,
    TZ ~ 80-90, cancer ~ 70-80 ms).
  * ADC: Tamada et al., JMRI 2008 (normal PZ ~ 1.6-1.8e-3, TZ ~ 1.3-1.4e-3, cancer 0.7-1.1e-3 mm^2/s);
    free water at 37 C ~ 3.0e-3 (urine ~ 2.8e-3); fatty marrow ~ 0.3-0.5e-3.
  * Fat in turbo spin echo: J-coupling is broken by the echo train (Henkelman et al., JMRI 1992), so
    fat is bright on TSE T2W; the effective T2 used for SE-type sequences is therefore longer than the
    CPMG value above.
  * DCE: Tofts model with the Parker population AIF (Parker et al., MRM 2006;56:993); prostate
    Ktrans ~ 0.1-0.2 /min in normal PZ, 0.2-0.3 in TZ/BPH, 0.3-0.8 in cancer, ve ~ 0.3-0.45
    (Franiel et al., Radiology 2011; Langer et al., JMRI 2009); gadolinium relaxivity r1 ~ 4.5
    (1.5 T) / 4.0 (3 T) L/mmol/s (Rohrer et al., Invest Radiol 2005).
Values between 1.5 T and 3 T are interpolated linearly in field strength (clipped at the ends).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    BACKGROUND = 0  # air outside the body
    FAT = 1
    MUSCLE = 2
    BLADDER = 3  # urine
    RECTUM = 4  # rectal wall
    RECTAL_GAS = 5
    BONE_CORTEX = 6
    BONE_MARROW = 7
    PZ = 8  # prostate peripheral zone
    TZ = 9  # prostate transition zone (incl. anterior gland)
    SEMINAL_VESICLE = 10
    LESION = 11  # lesion voxels; each lesion carries its own parameters (see lesion_params)
    VESSEL = 12  # iliac/femoral vessels (blood)


TISSUES: tuple[Tissue, ...] = tuple(Tissue)
N_TISSUES = len(TISSUES)
PROSTATE_TISSUES = (Tissue.PZ, Tissue.TZ, Tissue.LESION)
FAT_SUPPRESSED = (Tissue.FAT, Tissue.BONE_MARROW)  # tissues whose signal fat saturation removes


@dataclass(frozen=True)
class TissueParams:
    t1_ms: float
    t2_ms: float  # effective T2 for (turbo) spin echo
    pd: float
    adc: float  # 1e-6 mm^2/s
    ktrans: float = 0.0  # 1/min (Tofts)
    ve: float = 0.2  # extravascular extracellular volume fraction
    vp: float = 0.0  # plasma volume fraction (1.0 for blood in a vessel)
    t2star_ms: float | None = None  # for gradient echo; None -> t2_ms / 2
    flow_void: float = 1.0  # signal factor on spin-echo images (flowing blood is dark)

    @property
    def t2s(self) -> float:
        return self.t2star_ms if self.t2star_ms is not None else self.t2_ms / 2.0


# (1.5 T, 3 T) pairs: T1, T2; PD, ADC and kinetics field-independent.
_TABLE: dict[Tissue, dict] = {
    Tissue.BACKGROUND: dict(t1=(1000, 1000), t2=(1, 1), pd=0.0, adc=0.0),
    Tissue.FAT: dict(t1=(343, 382), t2=(150, 135), pd=1.0, adc=30.0, ktrans=0.01, ve=0.05, vp=0.01),
    Tissue.MUSCLE: dict(t1=(1008, 1412), t2=(44, 50), pd=0.75, adc=1450.0, ktrans=0.06, ve=0.12, vp=0.02),
    Tissue.BLADDER: dict(t1=(3000, 3300), t2=(1500, 1300), pd=1.0, adc=2900.0),
    Tissue.RECTUM: dict(t1=(1000, 1300), t2=(65, 60), pd=0.75, adc=1250.0, ktrans=0.15, ve=0.25, vp=0.04),
    Tissue.RECTAL_GAS: dict(t1=(1000, 1000), t2=(1, 1), pd=0.0, adc=0.0),
    Tissue.BONE_CORTEX: dict(t1=(300, 300), t2=(2, 2), pd=0.05, adc=0.0),
    Tissue.BONE_MARROW: dict(t1=(549, 586), t2=(120, 110), pd=0.9, adc=450.0, ktrans=0.04, ve=0.1, vp=0.02),
    Tissue.PZ: dict(t1=(1317, 1597), t2=(170, 140), pd=0.85, adc=1650.0, ktrans=0.12, ve=0.30, vp=0.02),
    Tissue.TZ: dict(t1=(1317, 1597), t2=(105, 85), pd=0.82, adc=1300.0, ktrans=0.22, ve=0.35, vp=0.03),
    Tissue.SEMINAL_VESICLE: dict(t1=(2500, 2800), t2=(400, 300), pd=0.95, adc=2000.0, ktrans=0.03, ve=0.1),
    # generic lesion (lesions override t2/adc/kinetics individually, see lesion_params)
    Tissue.LESION: dict(t1=(1250, 1500), t2=(90, 75), pd=0.80, adc=900.0, ktrans=0.5, ve=0.35, vp=0.04),
    Tissue.VESSEL: dict(t1=(1441, 1932), t2=(290, 275), pd=0.85, adc=2500.0, vp=1.0, ve=0.0, flow=0.15),
}

# Gd relaxivity (L/mmol/s) at 1.5 T / 3 T
_R1 = (4.5, 4.0)


def _interp(pair: tuple[float, float], field_strength_t: float) -> float:
    w = float(np.clip((field_strength_t - 1.5) / 1.5, 0.0, 1.0))
    return float(pair[0] * (1.0 - w) + pair[1] * w)


def relaxivity(field_strength_t: float) -> float:
    """Gadolinium r1 in L/mmol/s."""
    return _interp(_R1, field_strength_t)


def tissue_params(field_strength_t: float) -> dict[Tissue, TissueParams]:
    """Per-tissue parameters at a field strength (1.5 and 3 T tabulated, linear in between)."""
    out: dict[Tissue, TissueParams] = {}
    for t, d in _TABLE.items():
        out[t] = TissueParams(
            t1_ms=_interp(d["t1"], field_strength_t),
            t2_ms=_interp(d["t2"], field_strength_t),
            pd=d["pd"],
            adc=d["adc"],
            ktrans=d.get("ktrans", 0.0),
            ve=d.get("ve", 0.2),
            vp=d.get("vp", 0.0),
            flow_void=d.get("flow", 1.0),
        )
    return out


def lesion_params(
    field_strength_t: float, *, adc: float, t2_3t_ms: float, ktrans: float, ve: float
) -> TissueParams:
    """Parameters of one lesion: its own ADC, T2 (given at 3 T, scaled to the field) and kinetics."""
    base = tissue_params(field_strength_t)[Tissue.LESION]
    t2 = t2_3t_ms * _interp((1.18, 1.0), field_strength_t)  # T2 is a little longer at 1.5 T
    return replace(base, adc=float(adc), t2_ms=float(t2), ktrans=float(ktrans), ve=float(ve))


# --------------------------------------------------------------------------- signal equations


def spin_echo(pd, t1, t2, tr_ms: float, te_ms: float):
    """S = PD (1 - exp(-TR/T1)) exp(-TE/T2) (vectorised)."""
    pd, t1, t2 = (np.asarray(a, dtype=np.float64) for a in (pd, t1, t2))
    return pd * (1.0 - np.exp(-tr_ms / np.maximum(t1, 1e-3))) * np.exp(-te_ms / np.maximum(t2, 1e-3))


def spoiled_gre(pd, t1, t2s, tr_ms: float, te_ms: float, flip_deg: float):
    """Steady-state spoiled gradient echo (SPGR/FLASH):
    S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2*), E1 = exp(-TR/T1)."""
    pd, t1, t2s = (np.asarray(a, dtype=np.float64) for a in (pd, t1, t2s))
    a = np.deg2rad(flip_deg)
    e1 = np.exp(-tr_ms / np.maximum(t1, 1e-3))
    return pd * np.sin(a) * (1.0 - e1) / (1.0 - np.cos(a) * e1) * np.exp(-te_ms / np.maximum(t2s, 1e-3))


def diffusion(s0, adc, b: float):
    """S(b) = S0 exp(-b ADC); adc in 1e-6 mm^2/s, b in s/mm^2."""
    return np.asarray(s0) * np.exp(-float(b) * np.asarray(adc, dtype=np.float64) * 1e-6)


def parker_aif(t_s) -> np.ndarray:
    """Parker population AIF, plasma concentration in mmol/L (t = 0 at bolus arrival; 0 before)."""
    t = np.asarray(t_s, dtype=np.float64) / 60.0  # minutes
    a1, a2, t1, t2, s1, s2 = 0.809, 0.330, 0.17046, 0.365, 0.0563, 0.132
    alpha, beta, s, tau = 1.050, 0.1685, 38.078, 0.483
    cb = (
        a1 / (s1 * np.sqrt(2 * np.pi)) * np.exp(-((t - t1) ** 2) / (2 * s1**2))
        + a2 / (s2 * np.sqrt(2 * np.pi)) * np.exp(-((t - t2) ** 2) / (2 * s2**2))
        + alpha * np.exp(-beta * t) / (1.0 + np.exp(-s * (t - tau)))
    )
    cb = np.where(t >= 0, cb, 0.0)
    return cb / (1.0 - 0.42)  # blood -> plasma (haematocrit 0.42)


def tofts_concentration(
    ktrans, ve, vp, times_s: np.ndarray, arrival_s: float, dt_s: float = 0.5
) -> np.ndarray:
    """Extended Tofts tissue concentration (mmol/L) for arrays of (ktrans, ve, vp) at times_s.

    Returns an array (n_tissues, n_times). Numerical convolution on a fine time grid.
    """
    ktrans = np.atleast_1d(np.asarray(ktrans, dtype=np.float64)) / 60.0  # 1/s
    ve = np.maximum(np.atleast_1d(np.asarray(ve, dtype=np.float64)), 1e-3)
    vp = np.atleast_1d(np.asarray(vp, dtype=np.float64))
    times_s = np.asarray(times_s, dtype=np.float64)
    t_end = float(times_s.max(initial=0.0)) + dt_s
    grid = np.arange(0.0, t_end + dt_s, dt_s)
    cp = parker_aif(grid - arrival_s)
    kep = ktrans / ve
    # C(t) = Ktrans * sum cp(tau) exp(-kep (t - tau)) dt   (recursive, exact for piecewise-constant cp)
    n = grid.size
    ct = np.zeros((ktrans.size, n))
    decay = np.exp(-kep * dt_s)
    acc = np.zeros(ktrans.size)
    for i in range(n):  # loop over time points only (hundreds), vectorised over tissues
        acc = acc * decay + cp[i] * dt_s
        ct[:, i] = ktrans * acc
    ct = ct + vp[:, None] * cp[None, :]
    return np.stack([np.interp(times_s, grid, row) for row in ct])
