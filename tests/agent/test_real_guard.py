"""What keeps the image models honest on real scans (issue 18): csPCa findings only inside the gland
(items 7), NOT_ASSESSED outside the validated input range (item 3), shadow mode until a site has
validated a model (item 5), and gland models used on real exams only with known real-data figures."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from scanside.agent.state.alerts import alert_from_event
from scanside.agent.analysis.analysis import Analyzer, triage_event
from scanside.agent.runtime.config import load_config
from scanside.engines.tasks.cspca import CspcaPrediction, extract_findings, restrict_findings
from scanside.agent.schema.events import SeriesSummary
from scanside.engines.tasks.gland import MODEL_NAME, ZONES_MODEL, GlandResult, inside_gland, resolve_model
from scanside.engines.tasks.input_range import fit_input_range, input_features
from scanside.agent.analysis.shadow import ShadowPolicy
from scanside.agent.state.database import StateStore
from scanside.engines.preprocess import Grid

HEAD = (0.6879544, -2.6143243)  # cspca-reference 1.3.0's exam head


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _blob(shape, grid: Grid, centre_lps, radius_mm: float, peak: float) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3)
    d = np.linalg.norm(grid.index_to_lps(ijk.astype(float)) - np.asarray(centre_lps), axis=1).reshape(shape)
    return (peak * np.exp(-(d / radius_mm) ** 2)).astype(np.float32)


def _scene(outside_peak: float = 0.97):
    """A likelihood map with one lesion inside a spherical 'gland' (radius 20 mm at the origin) and one 40 mm
    outside it; the gland on its own 1 mm grid, as a gland model returns it."""
    grid = Grid(shape=(20, 64, 64), affine=np.array(
        [[3.0, 0, 0, -30], [0, 1.5, 0, -48], [0, 0, 1.5, -48], [0, 0, 0, 1]], dtype=float))
    lk = np.maximum(_blob(grid.shape, grid, (-6, 0, 0), 5.0, 0.9), _blob(grid.shape, grid, (15, 40, 0), 5.0, outside_peak))
    g_grid = Grid(shape=(60, 60, 60), affine=np.array([[1, 0, 0, -30], [0, 1, 0, -30], [0, 0, 1, -30], [0, 0, 0, 1]], float))
    ijk = np.stack(np.meshgrid(*(np.arange(60),) * 3, indexing="ij"), -1).reshape(-1, 3)
    mask = (np.linalg.norm(g_grid.index_to_lps(ijk.astype(float)), axis=1) <= 20.0).reshape(60, 60, 60)
    gland = GlandResult(mask=mask, grid=g_grid, volume_ml=float(mask.sum()) / 1000, centroid_lps=(0.0, 0.0, 0.0),
                        windows=1, seconds=0.0, model=f"{MODEL_NAME}/1.1.2")
    findings = extract_findings(lk, grid)
    p_model = _sigmoid(HEAD[0] * np.log(lk.max() / (1 - lk.max())) + HEAD[1])
    return CspcaPrediction(probability=p_model, findings=findings, likelihood=lk, grid=grid, model="cspca-reference/1.3.0",
                           backend="onnxruntime"), gland


def test_inside_gland_honours_the_margin() -> None:
    _, gland = _scene()
    pts = np.array([[0, 0, 0], [0, 0, 23.0], [0, 0, 28.0], [200, 0, 0]])  # centre, 3 mm out, 8 mm out, off the grid
    assert inside_gland(gland, pts, 5.0).tolist() == [True, True, False, False]
    assert inside_gland(gland, pts, 1.0).tolist() == [True, False, False, False]
    empty = GlandResult(mask=np.zeros_like(gland.mask), grid=gland.grid, volume_ml=0, centroid_lps=None, windows=1, seconds=0)
    assert not inside_gland(empty, pts, 5.0).any()


def test_findings_outside_the_gland_are_dropped_and_the_probability_follows_the_kept_ones() -> None:
    pred, gland = _scene()
    assert len(pred.findings) == 2
    kept = restrict_findings(pred, lambda p: inside_gland(gland, p, 5.0), HEAD)
    assert kept.dropped == 1 and len(kept.findings) == 1
    assert np.linalg.norm(np.asarray(kept.findings[0].center_lps_mm) - (-6, 0, 0)) < 3
    # the exam head applied to the highest likelihood left (0.9 inside, not the 0.97 outside)
    want = _sigmoid(HEAD[0] * np.log(0.9 / 0.1) + HEAD[1])
    assert kept.probability == pytest.approx(want, abs=0.01) and kept.probability < pred.probability
    everything = restrict_findings(pred, lambda p: np.ones(len(p), bool), HEAD)
    assert everything.dropped == 0 and everything.probability == pytest.approx(pred.probability, abs=1e-4)
    # without an exam head: the model's probability, capped by the evidence left
    no_head = restrict_findings(pred, lambda p: inside_gland(gland, p, 5.0), None)
    assert no_head.probability == pytest.approx(min(pred.probability, 0.9), abs=0.01)


def _model(threshold: float = 0.5):
    return SimpleNamespace(exam_head=HEAD, post={"lesion_threshold": 0.5}, decision_threshold=threshold)


def _inputs():
    def s(sid, label, number, b=()):
        return SeriesSummary(series_id=sid, study_uid="1.2", series_uid=sid, series_number=number, label=label,
                             label_confidence=1.0, reason="", b_values=list(b), plane="axial", n_instances=1,
                             n_images=20, complete=True)
    return {"T2W": s("t2", "T2WI_nan", 5), "ADC": s("adc", "ADC", 9), "HBV": s("hbv", "DWI_High", 10, (1600,))}


def test_triage_event_keeps_gland_findings_and_says_which_inputs_and_how_sure(tmp_path: Path) -> None:
    pred, gland = _scene()
    config = load_config(**{"state.dir": str(tmp_path)})
    ev = triage_event("triage:1.2:x", "1.2", _inputs(), _model(0.2), pred, gland, config, [], shadow=False)
    assert ev.gland_check == "checked" and ev.findings_outside_gland == 1 and len(ev.findings) == 1
    assert ev.recommendation == "DCE_ADVISED" and ev.confidence == pytest.approx(max(ev.probability, 1 - ev.probability), abs=1e-3)
    assert ev.input_series == {"T2W": "series 5 T2WI_nan axial", "ADC": "series 9 ADC axial",
                               "HBV": "series 10 DWI_High b1600 axial"}
    assert alert_from_event(ev) is not None
    # the same result in shadow mode: recorded, no technologist alert
    assert alert_from_event(ev.model_copy(update={"shadow": True})) is None
    # a gland model that ran and found no gland: the findings cannot be placed
    none = GlandResult(mask=np.zeros_like(gland.mask), grid=gland.grid, volume_ml=0, centroid_lps=None, windows=1, seconds=0)
    ev2 = triage_event("triage:1.2:y", "1.2", _inputs(), _model(), pred, none, config, [], shadow=False)
    assert ev2.recommendation == "NOT_ASSESSED" and "no prostate" in ev2.not_assessed_reason
    assert alert_from_event(ev2) is None


def test_inputs_outside_the_validated_range_are_not_assessed(tmp_path: Path) -> None:
    rng_ = np.random.default_rng(0)
    channels = ["T2W", "ADC", "HBV"]
    feats = [input_features(rng_.normal(size=(3, 6, 16, 16)).astype(np.float32), channels) for _ in range(12)]
    assert len(feats[0]) == 3 * 10 + 3
    rng = fit_input_range(feats[:9], feats[9:], channels)
    assert all(rng.check_features(f).in_range for f in feats)
    # smoother, correlated channels: another kind of image
    base = rng_.normal(size=(1, 6, 16, 16)).cumsum(axis=2).astype(np.float32)
    odd = np.concatenate([base, base * 0.9, base * 1.1])
    check = rng.check(odd)
    assert not check.in_range and check.outside and check.in_range_confidence == 0.0
    assert check.reason().startswith("inputs outside the model's validated range: ")
    pred, gland = _scene()
    pred.range_check = check
    ev = triage_event("triage:1.2:z", "1.2", _inputs(), _model(), pred, gland, load_config(**{"state.dir": str(tmp_path)}),
                      [{"channel": "ADC", "header_label": "ADC", "image_label": "DWI_Low", "agree": False}], shadow=False)
    assert ev.recommendation == "NOT_ASSESSED" and ev.confidence is None
    assert ev.not_assessed_reason == check.reason() and ev.input_range["in_range"] is False
    assert ev.label_disagreements[0]["image_label"] == "DWI_Low"  # reported alongside
    assert alert_from_event(ev) is None
    # the range survives a save and load beside a model
    rng.save(tmp_path)
    from scanside.engines.tasks.input_range import InputRange
    assert InputRange.load(tmp_path).check(odd).score == check.score


def test_shadow_mode_until_accepted_and_the_learning_line(tmp_path: Path) -> None:
    from scanside.agent.cli.models import main as models_main

    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n')
    config = load_config(cfg)
    policy = ShadowPolicy(config)
    assert policy.shadow("cspca-reference/1.3.0")
    store = StateStore(config.db_path)
    analyzer = Analyzer(config, store, __import__("threading").Condition())
    analyzer._cspca = SimpleNamespace(manifest=SimpleNamespace(ref="cspca-reference/1.3.0"))
    assert analyzer.learning() == analyzer.image_checks() == "image checks: learning this site (0 exams)"
    pred, gland = _scene()
    with store.transaction():
        store.append_event(triage_event("triage:1.2:a", "1.2", _inputs(), _model(), pred, gland, config, [], True))
    assert analyzer.learning() == "image checks: learning this site (1 exam)"
    # an operator accepts the version that runs: recorded with who, it leaves shadow mode
    assert models_main(["models", "accept", "cspca-reference@1.3.0", "--by", "lead tech", "--config", str(cfg)]) == 0
    line = json.loads((tmp_path / "state" / "site_validations.jsonl").read_text().splitlines()[0])
    assert line["by"] == "lead tech" and line["method"] == "operator" and line["version"] == "1.3.0"
    assert not policy.shadow("cspca-reference/1.3.0") and policy.shadow("cspca-reference/1.4.0")
    assert analyzer.learning() is None and analyzer.image_checks() == "image checks: validated for this site"
    # a site that switches shadow mode off
    assert not ShadowPolicy(load_config(**{"state.dir": str(tmp_path / "s2"), "shadow.enabled": False})).shadow("x/1")
    store.close()


def test_gland_auto_prefers_taps_and_needs_real_data_figures() -> None:
    def store(**models):
        def resolve(name):
            if name not in models:
                raise KeyError(name)
            return SimpleNamespace(name=name, ref=f"{name}/1", metrics=models[name])
        return SimpleNamespace(resolve=resolve)

    assert resolve_model(store(**{MODEL_NAME: {}, ZONES_MODEL: {"real_data": {"usable": True}}})) == MODEL_NAME
    assert resolve_model(store(**{ZONES_MODEL: {}})) is None  # real-data figures unknown
    assert resolve_model(store(**{ZONES_MODEL: {"real_data": {"usable": False}}})) is None
    assert resolve_model(store(**{ZONES_MODEL: {"real_data": {"usable": True}}})) == ZONES_MODEL
    assert resolve_model(store(**{ZONES_MODEL: {}}), ZONES_MODEL) == ZONES_MODEL  # the operator's explicit choice


def test_image_agreement_ratio_per_model(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from scanside.agent.schema.events import SeriesClassified
    from scanside.agent.service.metrics import AgentMetrics

    m = AgentMetrics(process=False)

    def classified(i: int, agree: bool) -> SeriesClassified:
        return SeriesClassified(key=f"c{i}", study_uid="1.2", series_id=f"s{i}", header_label="ADC",
                                image_label="ADC" if agree else "DWI_Low", image_confidence=0.9, probabilities={},
                                model="sequence-classifier/1.4.0", backend="onnxruntime", agree=agree)

    for i, agree in enumerate((True, True, False, True)):
        m.on_event(classified(i, agree))
    pred, gland = _scene()
    m.on_event(triage_event("triage:1.2:m", "1.2", _inputs(), _model(), pred, gland,
                            load_config(**{"state.dir": str(tmp_path)}), [], shadow=True))
    text = generate_latest(m.registry).decode()
    assert 'scanside_image_agreement_ratio{model="sequence-classifier"} 0.75' in text
    assert 'scanside_image_agreement_ratio{model="cspca-reference"} 1.0' in text
    # the diffusion physics revises series 2's label (it now agrees): counted once, by the new label
    m.on_event(classified(2, True).model_copy(update={"key": "c2:with:s9", "revises": True}))
    m.on_event(classified(9, True).model_copy(update={"key": "c9:with:s9", "revises": True}))  # no first label here: ignored
    again = generate_latest(m.registry).decode()
    assert 'scanside_image_agreement_ratio{model="sequence-classifier"} 1.0' in again
    assert 'scanside_image_shadow_results_total{model="cspca-reference"} 1.0' in text
    # shadow mode: no alert counted (every known alert code is exported at 0 from the start)
    triage_alerts = [ln for ln in text.splitlines() if ln.startswith("scanside_alerts_total{") and "TRIAGE_" in ln]
    assert triage_alerts and all(ln.endswith(" 0.0") for ln in triage_alerts), triage_alerts
