"""An `uncertain` image label (the sequence classifier's calibrated gate) is recorded but raises no
LABEL_MISMATCH; a confident disagreement still does (scanside.agent.analysis.analysis)."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from scanside.agent.analysis.analysis import Analyzer
from scanside.agent.runtime.config import load_config
from scanside.agent.schema.events import SeriesSummary
from scanside.engines.tasks.image_label import ImageLabel
from scanside.agent.state.database import StateStore


def _label(label: str, predicted: str, why=None) -> ImageLabel:
    return ImageLabel(label=label, predicted=predicted, confidence=0.97, probabilities={predicted: 0.97}, model="m/1",
                      backend="test", uncertain_reason=why, ood_score=2.0 if why else 0.3)


@pytest.mark.parametrize("image,alerts", [
    (_label("uncertain", "DWI_Low", "input outside the model's validated range"), 0),
    (_label("DWI_Low", "DWI_Low"), 1),
])
def test_uncertain_labels_raise_no_mismatch(tmp_path, monkeypatch, image, alerts):
    config = load_config(**{"watch.folder": str(tmp_path / "w"), "state.dir": str(tmp_path / "s"), "shadow.enabled": False})
    config.state.dir.mkdir(parents=True)
    store = StateStore(config.db_path)
    an = Analyzer(config, store, threading.Condition())
    monkeypatch.setattr(an, "classifier", lambda: SimpleNamespace(classify=lambda volume: image))
    monkeypatch.setattr(an, "_part", lambda s: object())
    monkeypatch.setattr(an, "_volume", lambda s, part=None: None)
    s = SeriesSummary(series_id="1.2.3#adc", study_uid="1.2", series_uid="1.2.3", part="adc", label="ADC",
                      label_confidence=0.99, reason="ImageType ADC", n_instances=20, n_images=20, complete=True)
    an._classify(s)
    events = store.events_after(0)
    (c,) = [e for e in events if e.type == "series_classified"]
    assert c.image_label == image.label and c.image_predicted == "DWI_Low" and not c.agree
    assert (c.uncertain_reason is not None) == (image.label == "uncertain")
    assert sum(e.type == "label_mismatch" for e in events) == alerts
    store.close()


def test_uncertain_labels_are_counted_per_model():
    from prometheus_client import generate_latest

    from scanside.agent.schema.events import SeriesClassified
    from scanside.agent.service.metrics import AgentMetrics

    m = AgentMetrics(process=False)
    for i, label in enumerate(("ADC", "uncertain", "uncertain", "DWI_Low")):
        m.on_event(SeriesClassified(key=f"c{i}", study_uid="1.2", series_id=f"s{i}", header_label="ADC", image_label=label,
                                    image_confidence=0.5, probabilities={}, model="sequence-classifier/1.4.1",
                                    backend="onnxruntime", agree=label == "ADC"))
    text = generate_latest(m.registry).decode()
    assert 'scanside_image_uncertain_results_total{model="sequence-classifier"} 2.0' in text
