"""Exam profiles of the virtual scanner (PI-RADS v2.1 prostate mpMRI / bpMRI) per vendor and
field strength, and the protocol faults that can be injected into them.

Profiles: ``prostate-mpmri`` (localizer, axial/sagittal T2W, coronal T2W FS, axial DWI (+ ADC,
+ calculated b1400 on Siemens), axial T1, DCE) and ``prostate-bpmri`` (no T1, no DCE).
Vendor habits: Siemens acquires b50/b800 and calculates b1400 (CALC_BVALUE series) and writes
ADC as its own series; GE acquires b0/b1000/b1400 (b=0 exercises the missing (0018,9087)),
ADC in its own series; Philips acquires b50/b1000/b1400 and appends the ADC map inside the DWI
series (the scanner merges the ``adc`` spec into the preceding ``dwi`` series for Philips).
"""
from __future__ import annotations

from typing import Iterable, Sequence

from scanside.simulator.model import ExamSpec, SeriesSpec

PROFILES = ("prostate-mpmri", "prostate-bpmri")

FAULTS: dict[str, str] = {
    "b1000_high": "the highest b-value is 1000 instead of >= 1400 (Siemens: b1000 calculated)",
    "thick_slices": "axial T2W acquired with 5 mm slices (PI-RADS: 3 mm)",
    "missing_adc": "no ADC map (Philips: none appended to the DWI series)",
    "missing_high_b": "no b >= 1400 (Siemens: no calculated series; GE/Philips: not acquired)",
    "wrong_fov": "axial T2W field of view 300 mm (PI-RADS: 120-200 mm)",
    "swapped_descriptions": "the series descriptions of the axial T2W and the DWI are swapped",
    "truncated_file": "one file of the axial T2W series is cut short on disk",
    "gap": "axial T2W acquired with a 1 mm slice gap (PI-RADS: no gap)",
    "slow_dce": "DCE temporal resolution 30 s (PI-RADS: <= 15 s)",
    "dwi_partial_coverage": "the DWI slab (and its ADC / calculated high b) has 8 slices instead of 24, 4 mm cranial "
                            "of the T2W's centre: it misses the apex and the base of the gland",
    "coarse_matrix": "axial T2W acquired with a 256 x 192 matrix over 160 mm: 0.63 x 0.83 mm (PI-RADS: <= 0.4 x 0.7 mm)",
}

# (low, intermediate, high) acquired b-values and whether the high b is calculated
_DWI_B = {
    "siemens": ([50.0, 800.0], 1400.0),
    "siemens-xa": ([50.0, 800.0], 1400.0),
    "ge": ([0.0, 1000.0, 1400.0], None),
    "philips": ([50.0, 1000.0, 1400.0], None),
}

_NAMES = {
    "siemens": dict(loc="localizer", t2ax="t2_tse_tra", t2sag="t2_tse_sag", t2cor="t2_tse_fs_cor", dwi="ep2d_diff_{b}_tra",
                    t1="t1_tse_tra", dce="t1_vibe_fs_tra_dyn"),
    "ge": dict(loc="3Plane Loc", t2ax="Ax T2 FRFSE", t2sag="Sag T2 FRFSE", t2cor="Cor T2 FRFSE FS", dwi="Ax DWI {b}",
               t1="Ax T1 FSE", dce="Ax LAVA-Flex DCE", adc="Apparent Diffusion Coefficient (mm2/s)"),
    "philips": dict(loc="Survey", t2ax="T2W_TSE_ax", t2sag="T2W_TSE_sag", t2cor="T2W_TSE_SPAIR_cor",
                    dwi="DWI_SPAIR_{b}", t1="T1W_TSE_ax", dce="DCE_eTHRIVE_dyn"),
}
_NAMES["siemens-xa"] = _NAMES["siemens"]


def _bstr(vendor: str, bvals: Sequence[float]) -> str:
    ints = [str(int(round(b))) for b in bvals]
    if vendor.startswith("siemens"):
        return "b" + "_".join(ints)
    if vendor == "ge":
        return "b" + "_".join(ints)
    return "b" + "_".join(ints)


def check_faults(faults: Iterable[str]) -> list[str]:
    out = []
    for f in faults:
        if f not in FAULTS:
            raise ValueError(f"unknown fault {f!r}; known: {', '.join(sorted(FAULTS))}")
        if f not in out:
            out.append(f)
    return out


def build_exam(profile: str = "prostate-mpmri", vendor: str = "siemens", field_strength_t: float = 3.0,
               faults: Iterable[str] = ()) -> ExamSpec:
    """The ExamSpec a technologist would run, with the named faults applied."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    if vendor not in _NAMES:
        raise ValueError(f"unknown vendor {vendor!r}")
    faults = check_faults(faults)
    n = _NAMES[vendor]
    low = field_strength_t < 2.0
    te_t2 = 104.0 if low else 101.0
    te_dwi = 80.0 if low else 66.0
    acquired, calc = _DWI_B[vendor]
    acquired = list(acquired)
    if vendor.startswith("siemens"):
        if "b1000_high" in faults:
            calc = 1000.0
        if "missing_high_b" in faults:
            calc = None
        named_b = acquired + ([calc] if calc else [])
    else:
        if "b1000_high" in faults:
            acquired = [acquired[0], 800.0, 1000.0]
        if "missing_high_b" in faults:
            acquired = [b for b in acquired if b < 1400.0]
        named_b = acquired
    dwi_name = n["dwi"].format(b=_bstr(vendor, named_b))

    t2ax = SeriesSpec(kind="t2w", description=n["t2ax"], plane="axial", slice_thickness_mm=3.0, n_slices=24,
                      fov_mm=(160.0, 160.0), matrix=(256, 256), tr_ms=4000.0 if low else 5660.0, te_ms=te_t2,
                      flip_angle_deg=160.0, acquisition_matrix=(400, 256))
    # acquired 0.4 mm (frequency) x 0.63 mm (phase), as PI-RADS asks; the images stay at 256 x 256 (0.63 mm
    # pixels) to keep the simulated exam small: the header declares what was acquired, as a scanner does
    if "thick_slices" in faults:
        t2ax = t2ax.model_copy(update=dict(slice_thickness_mm=5.0, n_slices=16))
    if "gap" in faults:
        t2ax = t2ax.model_copy(update=dict(slice_gap_mm=1.0, n_slices=18))
    if "wrong_fov" in faults:
        t2ax = t2ax.model_copy(update=dict(fov_mm=(300.0, 300.0)))
    if "coarse_matrix" in faults:
        t2ax = t2ax.model_copy(update=dict(acquisition_matrix=(256, 192)))
    dwi_geom = dict(plane="axial", slice_thickness_mm=3.0, n_slices=24, fov_mm=(200.0, 200.0), matrix=(128, 128),
                    tr_ms=4500.0 if low else 4100.0, te_ms=te_dwi, flip_angle_deg=90.0, fat_sat=True)
    if "dwi_partial_coverage" in faults:
        # centre within the DWI-T2W alignment tolerance (5 mm); only the slab ends differ
        dwi_geom.update(n_slices=8, center_offset_mm=(0.0, 0.0, 4.0))
    series: list[SeriesSpec] = [
        SeriesSpec(kind="localizer", description=n["loc"], plane="sagittal", slice_thickness_mm=6.0, n_slices=3,
                   fov_mm=(280.0, 280.0), matrix=(192, 192), tr_ms=8.6, te_ms=4.0, flip_angle_deg=20.0),
        t2ax,
        SeriesSpec(kind="t2w", description=n["t2sag"], plane="sagittal", slice_thickness_mm=3.0, n_slices=20,
                   fov_mm=(180.0, 180.0), matrix=(256, 256), tr_ms=4000.0 if low else 5000.0, te_ms=te_t2,
                   flip_angle_deg=160.0),
        SeriesSpec(kind="t2w_fs", description=n["t2cor"], plane="coronal", slice_thickness_mm=3.0, n_slices=20,
                   fov_mm=(180.0, 180.0), matrix=(256, 256), tr_ms=4500.0, te_ms=te_t2, flip_angle_deg=160.0,
                   fat_sat=True),
    ]
    dwi_desc = dwi_name + ("_TRACEW" if vendor.startswith("siemens") else "")
    series.append(SeriesSpec(kind="dwi", description=dwi_desc, b_values=acquired, n_directions=3,
                             include_trace=True, **dwi_geom))
    if "missing_adc" not in faults:
        adc_desc = {"ge": n.get("adc", "ADC")}.get(vendor, dwi_name + "_ADC")
        series.append(SeriesSpec(kind="adc", description=adc_desc, b_values=[b for b in acquired if b <= 1000.0],
                                 **dwi_geom))
    if vendor.startswith("siemens") and calc:
        series.append(SeriesSpec(kind="calc_bvalue", description=dwi_name + "_CALC_BVAL", b_values=[calc], **dwi_geom))
    if profile == "prostate-mpmri":
        series.append(SeriesSpec(kind="t1", description=n["t1"], plane="axial", slice_thickness_mm=3.0, n_slices=24,
                                 fov_mm=(200.0, 200.0), matrix=(192, 192), tr_ms=600.0, te_ms=10.0,
                                 flip_angle_deg=90.0))
        dt = 30.0 if "slow_dce" in faults else 10.0
        series.append(SeriesSpec(kind="dce", description=n["dce"], plane="axial", slice_thickness_mm=3.0, n_slices=20,
                                 fov_mm=(200.0, 200.0), matrix=(128, 128), tr_ms=4.5, te_ms=1.8, flip_angle_deg=12.0,
                                 fat_sat=True, n_phases=13 if dt <= 15 else 5, temporal_resolution_s=dt))
    if "swapped_descriptions" in faults:
        i_t2 = next(i for i, s in enumerate(series) if s.kind == "t2w" and s.plane == "axial")
        i_dwi = next(i for i, s in enumerate(series) if s.kind == "dwi")
        a, b = series[i_t2].description, series[i_dwi].description
        series[i_t2] = series[i_t2].model_copy(update=dict(description=b))
        series[i_dwi] = series[i_dwi].model_copy(update=dict(description=a))
    return ExamSpec(name=profile, field_strength_t=field_strength_t, series=series)
