"""The image side end to end, with the shipped reference models on ONNX Runtime: every completed
series is labelled from its pixels; a series whose header lies is caught (LABEL_MISMATCH); once
axial T2W, ADC and high-b DWI are in, a TriageResult follows with a valid recommendation."""
from __future__ import annotations


import pydicom
import pytest

from scanside.agent.state.alerts import alert_from_event
from scanside.agent.runtime.config import load_config
from scanside.agent.service.daemon import Agent
from scanside.engines.store import ModelStore
from scanside.simulator.scanner import simulate_exam
from tests.agent._live import waiter

pytestmark = pytest.mark.skipif(
    not all(any(m.name == n for m in ModelStore().list()) for n in ("sequence-classifier", "cspca-reference")),
    reason="reference models not in engines/models",
)


def _run(folder, tmp_path, **extra):
    config = load_config(**{"watch.folder": str(folder), "state.dir": str(tmp_path / "state"), "output.stdout": False,
                            "watch.settle_s": 0.1, "series.quiet_period_s": 1.0, **extra})
    agent = Agent(config).start()
    return agent


_wait = waiter(180.0, step=0.1)


@pytest.fixture(scope="module")
def lesion_exam(tmp_path_factory):
    out = tmp_path_factory.mktemp("exam")
    return out, simulate_exam("siemens", out, seed=21, profile="prostate-bpmri", cspca=True)


def test_series_are_labelled_from_pixels_and_triage_runs(tmp_path, lesion_exam):
    folder, truth = lesion_exam
    out = tmp_path / "dicom-out"
    # a site that has switched shadow mode off: its technologists get the triage and the SR carries it
    # a phantom exam: the zonal gland model, whether or not TAPS (which finds no gland in a phantom) is imported
    agent = _run(folder, tmp_path, **{"dicom_output.folder": str(out), "protocol.exam_quiet_period_s": 3.0,
                                      "shadow.enabled": False, "gland.model": "prostate-zones-reference"})
    try:
        n_parts = sum(len(s.parts) for s in truth.series)
        assert _wait(lambda: agent.store.event_counts().get("series_classified", 0) >= n_parts
                     and agent.store.event_counts().get("triage_result", 0) >= 1
                     and agent.store.event_counts().get("exam_completed", 0) >= 1)
        # the DICOM sink builds the SR (and the SEG of the likelihood map) once the exam is over
        assert _wait(lambda: len({p.name for p in out.rglob("*.dcm")}) >= 2, timeout=120)
        events = agent.store.events_after(0, limit=10_000)
    finally:
        agent.stop()
    written = [pydicom.dcmread(p) for p in out.rglob("*.dcm")]
    srs = [d for d in written if d.Modality == "SR"]
    assert [d.Modality for d in written].count("SEG") == 1
    # one SR per exam, written again only when the triage lands after the exam ended (a busy machine):
    # then the newer one carries the csPCa probability
    assert 1 <= len(srs) <= 2 and len({d.SOPInstanceUID for d in srs}) == len(srs)
    assert any("Probability of cancer" in _concepts(d) for d in srs)
    classified = [e for e in events if e.type == "series_classified"]
    assert len(classified) == n_parts == len({e.key for e in classified})
    agreement = sum(e.agree for e in classified) / len(classified)
    assert agreement >= 0.8, [(e.header_label, e.image_label) for e in classified]
    (triage,) = [e for e in events if e.type == "triage_result"]
    assert set(triage.inputs) == {"T2W", "ADC", "HBV"}
    assert 0.0 <= triage.probability <= 1.0
    expected = "DCE_ADVISED" if triage.probability >= triage.thresholds["dce_advised_at_probability"] else "BPMRI_SUFFICIENT"
    assert triage.recommendation == expected and triage.decision_support
    # a csPCa lesion of at least 8 mm is found, its centre within 5 mm of the simulator's ground truth
    significant = [les for les in truth.lesions if les.cspca and max(les.diameters_mm) >= 8]
    assert significant and triage.findings
    errors = [min(sum((a - b) ** 2 for a, b in zip(f.center_lps_mm, les.center_lps_mm)) ** 0.5 for f in triage.findings)
              for les in significant]
    assert min(errors) <= 5.0, errors


def _concepts(ds) -> str:
    """Every concept name meaning in an SR content tree, as one string."""
    out = []

    def walk(items):
        for it in items:
            if "ConceptNameCodeSequence" in it:
                out.append(str(it.ConceptNameCodeSequence[0].CodeMeaning))
            walk(it.get("ContentSequence", []))

    walk(ds.get("ContentSequence", []))
    return " | ".join(out)


def test_a_header_that_lies_is_caught(tmp_path, lesion_exam):
    """The ADC series re-labelled in its header as a b1400 trace, sent with the DWI series it was computed from: the
    header now says DWI_High, the pixels (the map the DWI images decay along) say ADC."""
    from scanside.engines.tasks.image_label import UNCONFIRMED_ADC

    folder, truth = lesion_exam
    adc = next(s for s in truth.series if any(p.label == "ADC" for p in s.parts))
    dwi = [s for s in truth.series if any(p.label in ("DWI_Low", "DWI_High") for p in s.parts)
           and not any(p.label == "ADC" for p in s.parts)]
    forged = tmp_path / "forged"
    for series in dwi:
        for rel in series.files:
            (forged / rel).parent.mkdir(parents=True, exist_ok=True)
            (forged / rel).write_bytes((folder / rel).read_bytes())
    for rel in adc.files:
        ds = pydicom.dcmread(folder / rel)
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"]
        ds.SequenceName = "*ep_b1400t"
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", "1400")
        target = forged / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
    n_parts = 1 + sum(len(s.parts) for s in dwi)
    agent = _run(forged, tmp_path)
    try:
        assert _wait(lambda: len({e.series_id for e in agent.store.events_after(0, limit=1000)
                                  if e.type == "series_classified"}) >= n_parts, timeout=180)
        events = agent.store.events_after(0, limit=1000)
    finally:
        agent.stop()
    numbers = {e.series_number for e in events if e.type == "series_classified"}
    assert len(numbers) == 1 + len(dwi)
    latest = {}
    for e in events:
        if e.type == "series_classified" and e.series_number == adc.series_number:
            latest[e.series_id] = e
    (classified,) = latest.values()
    assert classified.header_label == "DWI_High" and classified.image_label == "ADC" and classified.diffusion
    (mismatch,) = [e for e in events if e.type == "label_mismatch"]
    assert mismatch.header_label == "DWI_High" and mismatch.image_label == "ADC" and mismatch.alert_id
    assert mismatch.series_number == adc.series_number
    # shadow mode (the default until the site validates the classifier): recorded, no technologist alert
    assert mismatch.shadow and alert_from_event(mismatch) is None
    # the same map sent alone: nothing on its grid to test it against, and the network alone does not name a map
    alone = tmp_path / "alone"
    for rel in adc.files:
        (alone / rel).parent.mkdir(parents=True, exist_ok=True)
        (alone / rel).write_bytes((forged / rel).read_bytes())
    agent = _run(alone, tmp_path / "second")
    try:
        assert _wait(lambda: agent.store.event_counts().get("series_classified", 0) >= 1, timeout=120)
        events = agent.store.events_after(0, limit=1000)
    finally:
        agent.stop()
    (classified,) = [e for e in events if e.type == "series_classified"]
    assert classified.image_label == "uncertain" and classified.uncertain_reason == UNCONFIRMED_ADC
    assert classified.image_predicted == "ADC" and not any(e.type == "label_mismatch" for e in events)


def test_each_series_is_decoded_once_and_models_leave_the_shared_volume_alone(tmp_path, lesion_exam, monkeypatch):
    """Labelling, the gland model and triage share one decoded volume per series (issue 8: decoded once
    per series); sharing is safe only because no model writes into the array it is given."""
    import hashlib
    from collections import Counter

    import scanside.agent.dicom.volume as volume_module

    calls: Counter = Counter()
    digests: dict = {}
    real = volume_module.load_volume

    def counting(frames, *args, **kw):
        vol = real(frames, *args, **kw)
        key = tuple(sorted({f.path for f in frames}))
        calls[key] += 1
        digests[key] = (vol, hashlib.sha1(vol.array.tobytes()).hexdigest())
        return vol

    monkeypatch.setattr(volume_module, "load_volume", counting)
    folder, truth = lesion_exam
    agent = _run(folder, tmp_path, **{"protocol.exam_quiet_period_s": 3.0})
    try:
        assert _wait(lambda: agent.store.event_counts().get("triage_result", 0) >= 1
                     and agent.store.event_counts().get("exam_completed", 0) >= 1)
    finally:
        agent.stop()
    assert calls and max(calls.values()) == 1, [n for n in calls.values() if n > 1]
    for vol, digest in digests.values():  # after labelling, gland and csPCa have all run on them
        assert hashlib.sha1(vol.array.tobytes()).hexdigest() == digest


@pytest.mark.parametrize("header, b_values, image, alerts", [
    ("DWI_Low", [400.0], "DWI_High", False),   # pixels cannot place b400 against the 500 boundary
    ("DWI_High", [500.0], "DWI_Low", False),
    ("DWI_Low", [50.0], "DWI_High", True),     # a b50 that looks like high b: a mis-decoded b-value, say
    ("DWI_High", [1400.0], "DWI_Low", True),
    ("DWI_Low", [0.0, 400.0], "DWI_High", True),  # not every b-value near the boundary
    ("ADC", [], "DWI_Low", True),              # across families the band does not apply
    ("T2WI_nan", [], "T2WI_nan", False),
])
def test_the_mismatch_rule_leaves_out_what_pixels_cannot_tell(header, b_values, image, alerts):
    from types import SimpleNamespace

    from scanside.agent.analysis.analysis import raises_mismatch
    from scanside.agent.runtime.config import AnalysisConfig

    summary = SimpleNamespace(label=header, label_confidence=0.97, b_values=b_values)
    img = SimpleNamespace(label=image, uncertain=False, confidence=0.95)
    assert raises_mismatch(summary, img, AnalysisConfig()) is alerts
    assert not raises_mismatch(summary, SimpleNamespace(label=image, uncertain=True, confidence=0.95), AnalysisConfig())
    assert not raises_mismatch(summary, SimpleNamespace(label=image, uncertain=False, confidence=0.5), AnalysisConfig())


def test_many_series_of_one_grid_are_not_all_decoded_for_each(tmp_path, monkeypatch):
    """Dynamic phases stored as series of one grid (some scanners do): the diffusion physics looks at the latest
    MAX_SERIES of a grid, so each completed series decodes at most that many of its siblings, not all of them."""
    from collections import Counter

    from pydicom.uid import generate_uid

    import scanside.agent.dicom.volume as volume_module
    from tests.agent.factory import series_files

    calls: Counter = Counter()
    real = volume_module.load_volume

    def counting(frames, *args, **kw):
        calls[tuple(sorted({f.path for f in frames}))] += 1
        return real(frames, *args, **kw)

    monkeypatch.setattr(volume_module, "load_volume", counting)
    n, study = 40, generate_uid()
    for i in range(n):
        series_files(tmp_path / "export" / f"s{i:02d}", 3, study_uid=study, rows=16, cols=16, SeriesNumber=i + 1,
                     description="t1_vibe_dyn")
    agent = _run(tmp_path / "export", tmp_path)
    try:
        assert _wait(lambda: len({e.series_id for e in agent.store.events_after(0, limit=10_000)
                                  if e.type == "series_classified"}) == n, timeout=240)
    finally:
        agent.stop()
    assert len(calls) == n
    # measured: 52 decodes in all, where looking at every sibling decoded each series about 40 times (1565)
    assert sum(calls.values()) <= 2 * n, sum(calls.values())


def test_only_mr_series_go_to_the_sequence_classifier(tmp_path):
    """A CT series in the watched folder is grouped and labelled `other` by its header, but the MR sequence
    classifier does not read it (what it made of a CT would be noise, and a LABEL_MISMATCH against `other`)."""
    from pydicom.uid import generate_uid

    from tests.agent.factory import series_files

    study = generate_uid()
    series_files(tmp_path / "export" / "mr", 3, study_uid=study, rows=16, cols=16, SeriesNumber=1)
    series_files(tmp_path / "export" / "ct", 3, study_uid=study, rows=16, cols=16, SeriesNumber=2, Modality="CT")
    agent = _run(tmp_path / "export", tmp_path)
    try:
        assert _wait(lambda: agent.store.event_counts().get("series_completed", 0) == 2
                     and agent.store.event_counts().get("series_classified", 0) >= 1, timeout=120)
        assert _wait(lambda: agent.store.cursor("analysis") >= agent.store.last_event_seq(), timeout=60)
        events = agent.store.events_after(0, limit=1000)
    finally:
        agent.stop()
    completed = {e.series.series_number: e.series for e in events if e.type == "series_completed"}
    assert completed[2].modality == "CT" and completed[2].label == "other" and completed[1].modality == "MR"
    assert [e.series_number for e in events if e.type == "series_classified"] == [1]


def test_a_map_whose_header_rounds_its_pixel_spacing_is_on_its_images_grid():
    """The analyzer decodes only series whose headers say the same grid: a derived map may write its pixel
    spacing with fewer digits than the DWI images it was computed from (0.898438 against 0.8984375)."""
    from types import SimpleNamespace

    from scanside.agent.analysis.analysis import headers_share_grid

    def summary(spacing, rows=256):
        return SimpleNamespace(rows=rows, columns=256, plane="axial", pixel_spacing_mm=spacing)

    images = summary((0.8984375, 0.8984375))
    assert headers_share_grid(images, summary((0.898438, 0.898438)))
    assert headers_share_grid(summary((0.894999, 0.894999)), summary((0.895001, 0.895001)))  # across a rounding edge
    assert not headers_share_grid(images, summary((1.796875, 1.796875)))
    assert not headers_share_grid(images, summary((0.8984375, 0.8984375), rows=128))
    assert not headers_share_grid(images, summary(None)) and headers_share_grid(summary(None), summary(None))
