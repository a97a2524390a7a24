"""The diffusion physics across the series of one grid (scanside.engines.tasks.diffusion): on a phantom that obeys
S(b) = S0 exp(-b D) with Rician noise and a scanner-fitted ADC map, and on the real ProstateX exam."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from scanside.engines.tasks.diffusion import HIGH_B_STEP, diffusion_roles
from scanside.engines.tasks.image_label import ImageClassifier, ImageLabel, UncertaintyGate
from tests.agent.realdata import PROSTATEX, need

SHAPE = (8, 48, 48)


def _smooth(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    f = rng.normal(size=(SHAPE[0], 6, 6))
    f = np.kron(f, np.ones((1, 8, 8)))  # blocks of tissue
    f = (f - f.min()) / (f.max() - f.min())
    return lo + (hi - lo) * f


def _acquire(s0: np.ndarray, d: np.ndarray, body: np.ndarray, bs, rng, sigma: float = 2.0) -> dict:
    """Magnitude images (Rician noise) of one acquisition and the scanner's ADC map (log-linear fit, 10^-6 mm^2/s)."""
    out = {}
    for b in bs:
        clean = s0 * np.exp(-b * d) * body
        out[b] = np.hypot(clean + rng.normal(0, sigma, SHAPE), rng.normal(0, sigma, SHAPE))
    logs = np.stack([np.log(np.maximum(out[b], 1e-3)) for b in bs])
    bb = np.asarray(bs, float)
    slope = ((bb - bb.mean())[:, None, None, None] * (logs - logs.mean(0))).sum(0) / ((bb - bb.mean()) ** 2).sum()
    adc = np.where(body, np.clip(-slope, 0, 5e-3), 0.0) * 1e6
    return out, adc


@pytest.fixture(scope="module")
def phantom():
    rng = np.random.default_rng(7)
    body = np.zeros(SHAPE, bool)
    body[:, 6:42, 4:44] = True
    s0 = _smooth(rng, 150, 400)
    d = _smooth(rng, 0.5e-3, 3e-3)
    images, adc = _acquire(s0, d, body, (0, 100, 800), rng)
    fitted_s0 = np.exp(np.log(np.maximum(images[0], 1e-3)))
    calc1500 = fitted_s0 * np.exp(-1500 * adc / 1e6) * body
    t2 = _smooth(rng, 50, 500) * body + np.abs(rng.normal(0, 2, SHAPE))  # another contrast on the same grid
    return {"b0": images[0], "b100": images[100], "b800": images[800], "adc": adc, "calc1500": calc1500, "t2": t2}


def test_the_adc_map_and_its_ladder_are_found_from_pixels_alone(phantom):
    roles = diffusion_roles(phantom)
    assert {k for k, r in roles.items() if r.kind == "ADC"} == {"adc"}
    assert roles["adc"].fit > 0.95 and roles["adc"].unit == 1e6
    assert roles["b0"].kind == "DWI" and roles["b0"].b_step == 0.0  # the least weighted: the ladder's reference
    assert roles["calc1500"].b_step == pytest.approx(1500, rel=0.1) and roles["calc1500"].high_b
    assert roles["b800"].b_step == pytest.approx(800, rel=0.15) and not roles["b800"].high_b  # < HIGH_B_STEP
    assert "t2" not in roles  # follows no decay
    assert "decays from" in roles["calc1500"].evidence() and "ADC map" in roles["adc"].evidence()


def test_the_unit_of_the_map_is_read_from_its_values(phantom):
    roles = diffusion_roles(dict(phantom, adc=phantom["adc"] / 1e3))  # stored in 10^-3 mm^2/s
    assert roles["adc"].kind == "ADC" and roles["adc"].unit == 1e3
    assert roles["calc1500"].b_step == pytest.approx(1500, rel=0.1)


def test_no_map_no_roles_and_another_acquisition_stays_off_the_ladder(phantom):
    assert diffusion_roles({k: phantom[k] for k in ("b0", "b100", "b800", "calc1500", "t2")}) == {}
    assert diffusion_roles({k: phantom[k] for k in ("b0", "adc")}) == {}  # needs a pair besides the map
    other = dict(phantom, other_b800=phantom["b800"] * 0.55)  # the same b, another receiver scale
    roles = diffusion_roles(other)
    assert roles["adc"].kind == "ADC" and roles["b800"].kind == "DWI"
    assert "other_b800" not in roles or roles["other_b800"].reference == "other_b800"


def _classifier(min_confidence: float = 0.6) -> ImageClassifier:
    clf = ImageClassifier(engine=SimpleNamespace(manifest=SimpleNamespace(
        labels=["T2WI_nan", "T2WI_fs", "DWI_Low", "DWI_High", "ADC", "other"], ref="m/1", preprocessing=object(),
        postprocessing={}, root=None, outputs=[]), backend="test"))
    clf._gate = UncertaintyGate(min_confidence=min_confidence)
    return clf


def _label(probs: dict, label: str = "uncertain") -> ImageLabel:
    full = {k: 0.0 for k in ("T2WI_nan", "T2WI_fs", "DWI_Low", "DWI_High", "ADC", "other")} | probs
    best = max(full, key=full.get)
    return ImageLabel(label=label, confidence=full[best], probabilities=full, model="m/1", backend="test",
                      predicted=best, uncertain_reason="input unlike ..." if label == "uncertain" else None)


def test_the_physics_decides_what_it_can_and_leaves_low_vs_high_b_to_the_network(phantom):
    clf = _classifier()
    roles = diffusion_roles(phantom)
    # a map the network read as low-b DWI, and a calculated b1500 it read as fat-suppressed T2W
    adc = clf.with_diffusion(_label({"DWI_Low": 0.8, "ADC": 0.1}), roles["adc"])
    assert adc.label == "ADC" and not adc.uncertain and adc.confidence == pytest.approx(roles["adc"].fit, abs=1e-4)
    high = clf.with_diffusion(_label({"T2WI_fs": 0.5, "DWI_High": 0.1}), roles["calc1500"])
    assert high.label == "DWI_High" and high.diffusion and "decays from" in high.diffusion
    # the reference: diffusion-weighted for sure; the network's low vs high b, renormalised, over the gate
    low = clf.with_diffusion(_label({"DWI_Low": 0.45, "DWI_High": 0.05, "T2WI_fs": 0.5}), roles["b0"])
    assert low.label == "DWI_Low" and low.confidence == pytest.approx(0.9)
    torn = clf.with_diffusion(_label({"DWI_Low": 0.3, "DWI_High": 0.25, "other": 0.45}), roles["b0"])
    assert torn.uncertain and "low vs high b" in torn.uncertain_reason and torn.predicted == "DWI_Low"
    same = _label({"T2WI_nan": 0.9}, "T2WI_nan")
    assert clf.with_diffusion(same, None) == same


def test_with_physics_groups_by_grid(phantom):
    from scanside.agent.dicom.volume import Volume

    clf = _classifier()
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    vols = {k: Volume(array=a.astype(np.float32), affine=affine) for k, a in phantom.items()}
    moved = affine.copy()
    moved[0, 3] = 5.0
    vols["adc_elsewhere"] = Volume(array=phantom["adc"].astype(np.float32), affine=moved)  # not on the grid
    rounded = affine.copy()
    rounded[0, 3], rounded[2, 2] = 0.006, 3.0004  # a map whose header kept fewer digits: still the grid
    vols["adc_rounded"] = Volume(array=phantom["adc"].astype(np.float32), affine=rounded)
    labels = {k: _label({"DWI_Low": 0.6, "ADC": 0.2}) for k in vols}
    out = clf.with_physics(labels, vols)
    assert out["adc"].label == "ADC" and out["calc1500"].label == "DWI_High" and out["adc_rounded"].label == "ADC"
    assert out["adc_elsewhere"] == labels["adc_elsewhere"] and out["t2"] == labels["t2"]


def test_an_adc_map_the_physics_cannot_confirm_is_uncertain(phantom):
    """A quantitative map is what the network gets wrong on real scans (a real T2 TSE read as ADC): named ADC
    by the network alone, with no diffusion images on its grid that decay along it, it is `uncertain`."""
    from scanside.agent.dicom.volume import Volume
    from scanside.engines.tasks.image_label import UNCERTAIN, UNCONFIRMED_ADC

    clf = _classifier()
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    vols = {k: Volume(array=phantom[k].astype(np.float32), affine=affine) for k in ("b0", "b100", "b800", "adc", "t2")}
    moved = affine.copy()
    moved[0, 3] = 5.0
    vols["alone"] = Volume(array=phantom["t2"].astype(np.float32), affine=moved)  # a grid of its own
    says_adc = _label({"ADC": 0.9, "T2WI_nan": 0.1}, "ADC")
    labels = {k: says_adc for k in ("adc", "t2", "alone")}
    labels.update({k: _label({"DWI_Low": 0.9}, "DWI_Low") for k in ("b0", "b100", "b800")})
    out = clf.with_physics(labels, vols)
    assert out["adc"].label == "ADC" and out["adc"].diffusion  # confirmed by its ladder
    for k in ("t2", "alone"):  # on the ladder's grid but off the decay; on a grid of its own
        assert out[k].label == UNCERTAIN and out[k].uncertain_reason == UNCONFIRMED_ADC
        assert out[k].predicted == "ADC" and out[k].probabilities == says_adc.probabilities
    assert out["b800"].label == "DWI_Low" and out["b800"].diffusion  # a ladder member: as the physics and network say
    assert clf.with_physics({"alone": says_adc}, {"alone": vols["alone"]})["alone"].label == UNCERTAIN


def test_on_the_real_prostatex_exam_the_physics_finds_its_maps_and_high_b_images():
    """Measured: both ADC maps fit at r >= 0.99; no other series of the exam passes as a map (the FA map and
    the MDDW ADC, whose grid has only one diffusion image, are left to the network)."""
    from scanside.agent.dicom.exam_reader import classifier_inputs, read_exams
    from scanside.engines.tasks.image_label import same_grid

    folder = need(PROSTATEX)
    (exam,) = read_exams([folder])
    chosen = {s.series_id for s in classifier_inputs(exam.summaries())}
    named = {f"{es.summary.series_number}{es.summary.part}": es for es in exam.series if es.series_id in chosen}
    vols = {k: es.volume() for k, es in named.items()}
    roles = {}
    for keys in same_grid(vols).values():
        roles.update(diffusion_roles({k: vols[k].array for k in keys}))
    assert {k for k, r in roles.items() if r.kind == "ADC"} == {"9adc", "21adc"}
    assert min(roles[k].fit for k in ("9adc", "21adc")) > 0.99
    assert {k for k, r in roles.items() if r.high_b} == {"10b1600", "19b1400"}
    assert roles["10b1600"].b_step == pytest.approx(1600, rel=0.05) and roles["19b1400"].b_step == pytest.approx(1300, rel=0.15)
    assert roles["8b0"].b_step == 0.0 and roles["17b100"].b_step == 0.0
    assert roles["8b100"].weak and roles["8b400"].weak and roles["18b500"].weak  # small steps, noisy: weak members
    assert not any(r.weak for k, r in roles.items() if k in ("8b800", "10b1600", "19b1400"))
    assert all(named[k].summary.label in ("DWI_Low", "DWI_High", "ADC") for k in roles)
    assert HIGH_B_STEP > roles["8b800"].b_step > 500


@pytest.mark.parametrize("vendor", ["siemens", "ge"])
def test_the_simulators_maps_are_fitted_from_its_own_diffusion_images(tmp_path, vendor):
    """As on a scanner, the simulated ADC map (and Siemens' calculated b-value) comes from the DWI series' very
    images: same coil sensitivity, same noise. Before, each was rendered with noise of its own, and the physics
    found none of them (r 0.38-0.95 on 12 simulated exams against 0.998-0.999 on real maps)."""
    from scanside.agent.dicom.exam_reader import read_exams
    from scanside.engines.tasks.image_label import same_grid
    from scanside.simulator.scanner import simulate_exam

    simulate_exam(vendor, tmp_path, seed=11, profile="prostate-bpmri")
    (exam,) = read_exams([tmp_path])
    vols = {es.series_id: es.volume() for es in exam.series if es.summary.label in ("DWI_Low", "DWI_High", "ADC")}
    label = {es.series_id: es.summary.label for es in exam.series}
    (grid,) = same_grid(vols).values()
    roles = diffusion_roles({k: vols[k].array for k in grid})
    assert {k for k, r in roles.items() if r.kind == "ADC"} == {k for k in grid if label[k] == "ADC"}
    assert roles and all(r.fit > 0.99 for r in roles.values() if r.kind == "ADC")
    assert all(label[k] == "DWI_High" for k, r in roles.items() if r.high_b)
    calculated = [es.series_id for es in exam.series if es.summary.calculated]
    # a calculated b-value is stored on its source's scale (as ProstateX's b1600): it joins the ladder
    assert all(roles[k].high_b for k in calculated)
    assert calculated or vendor != "siemens"


def test_a_small_step_in_noise_is_a_weak_member_that_needs_the_network(phantom):
    rng = np.random.default_rng(3)
    body = np.zeros(SHAPE, bool)
    body[:, 6:42, 4:44] = True
    images, adc = _acquire(_smooth(rng, 150, 400), _smooth(rng, 0.5e-3, 3e-3), body, (0, 100, 800), rng, sigma=10.0)
    roles = diffusion_roles({"b0": images[0], "b100": images[100], "b800": images[800], "adc": adc})
    weak = roles["b100"]
    assert weak.weak and weak.fit < 0.9 and not weak.high_b and weak.b_step == pytest.approx(100, rel=0.3)
    assert not roles["b800"].weak and roles["adc"].kind == "ADC"
    clf = _classifier()
    says_dwi = clf.with_diffusion(_label({"DWI_Low": 0.5, "DWI_High": 0.1, "T2WI_fs": 0.4}), weak)
    assert says_dwi.label == "DWI_Low" and says_dwi.diffusion and "as far as the noise shows" in says_dwi.diffusion
    says_other = _label({"DWI_Low": 0.2, "DWI_High": 0.1, "T2WI_fs": 0.7}, "T2WI_fs")
    assert clf.with_diffusion(says_other, weak) == says_other  # weak evidence does not overrule the network


def test_odd_input_gives_no_role_and_no_error(phantom):
    blank = np.zeros(SHAPE)
    nan = np.full(SHAPE, np.nan)
    assert diffusion_roles({"a": blank, "b": blank, "c": blank}) == {}
    assert diffusion_roles({"a": nan, "b": phantom["b0"], "c": phantom["b800"]}) == {}
    assert diffusion_roles({"a": np.ones(SHAPE), "b": -phantom["b0"], "c": phantom["b800"]}) == {}
    assert diffusion_roles({"a": phantom["adc"], "b": phantom["b0"], "c": np.zeros((2, 3, 4))}) == {}  # shapes differ
    tiny = {k: v[:1, :4, :4] for k, v in phantom.items()}  # too few voxels to fit
    assert diffusion_roles(tiny) == {}
    with_nan = dict(phantom, b0=np.where(np.arange(phantom["b0"].size).reshape(SHAPE) % 97 == 0, np.nan, phantom["b0"]))
    assert diffusion_roles(with_nan)["adc"].kind == "ADC"  # a few bad voxels do not hide the map
