"""The daemon labels a real diffusion acquisition by its physics (issue 18): the real ProstateX DWI series and
ADC maps go through ingest and the analyzer one by one, as a scanner sends them; the maps are labelled ADC by
the physics (the network alone reads them as low-b DWI), the DWI images in before their map get a revised
label once it is in, and the daemon ends with the labels the real-data evaluation gives."""
from __future__ import annotations

import threading

import pytest

from scanside.agent.analysis.analysis import Analyzer
from scanside.agent.runtime.config import load_config
from scanside.agent.state.database import StateStore
from scanside.engines.store import ModelStore
from tests.agent.realdata import PROSTATEX, dicom_files, need, stream

pytestmark = pytest.mark.skipif(not any(m.name == "sequence-classifier" for m in ModelStore().list()),
                                reason="sequence-classifier not in engines/models")

DIFFUSION_SERIES = ("8.000000-", "9.000000-", "10.000000-", "17.000000-", "18.000000-", "19.000000-", "21.000000-")


def test_the_daemon_labels_a_real_diffusion_acquisition_by_its_physics(tmp_path):
    from scanside.training.sequence.real import classify_series, read_series

    folder = need(PROSTATEX)
    files = [f for f in dicom_files(folder) if f.parent.name.startswith(DIFFUSION_SERIES)]
    config = load_config(**{"state.dir": str(tmp_path), "protocol.enabled": False, "analysis.triage": False,
                            "gland.enabled": False})
    # the 4-b acquisition first and labelled, as the daemon does while the scanner is still computing its map
    first = [f for f in files if f.parent.name.startswith("8.000000-")]
    events = stream(first, tmp_path)
    store = StateStore(config.db_path)
    analyzer = Analyzer(config, store, threading.Condition())
    for e in events:
        if e.type == "series_completed":
            analyzer.deliver(e)
    store.close()
    events = stream([f for f in files if f not in first], tmp_path)
    completed = [e.series for e in events if e.type == "series_completed"]
    assert len(completed) == 10  # 8 (b0, b100, b400, b800), 9 ADC, 10 b1600, 17, 18, 19, 21
    store = StateStore(config.db_path)
    analyzer = Analyzer(config, store, threading.Condition())  # a restart between the two, too
    for e in events:
        if e.type == "series_completed" and e.series.series_number != 8:
            analyzer.deliver(e)
    classified = [e for e in store.events_after(0, limit=100_000) if e.type == "series_classified"]
    final = {}
    for e in classified:  # the latest label of each series, as the exam read model keeps it
        final[e.series_id] = e
    by_part = {(s.series_number, s.part): final[s.series_id] for s in completed}
    assert {by_part[(9, "adc")].image_label, by_part[(21, "adc")].image_label} == {"ADC"}
    assert by_part[(9, "adc")].diffusion and "ADC map" in by_part[(9, "adc")].diffusion
    assert by_part[(10, "b1600")].image_label == by_part[(19, "b1400")].image_label == "DWI_High"
    revised = [e for e in classified if e.revises]
    assert revised and all(":with:" in e.key and e.diffusion for e in revised)
    assert any(e.series_id == by_part[(8, "b0")].series_id for e in revised)  # in before its map
    assert len({e.key for e in classified}) == len(classified)
    assert {store.read_model.series_row(s.series_id).classification.image_label for s in completed
            if (s.series_number, s.part) in ((9, "adc"), (21, "adc"))} == {"ADC"}  # the read model shows the revision
    assert not [e for e in store.events_after(0, limit=100_000) if e.type == "label_mismatch"]
    store.close()

    # the evaluation reads the same files and ends with the daemon's labels
    series, _ = read_series([folder])
    from scanside.training.sequence.real import read_labels

    rows = classify_series(analyzer.classifier(), [(s, p) for s, p in series if s.series_id in final], read_labels(None))
    assert len(rows) == 10
    for s, r in zip([s for s, _ in series if s.series_id in final], rows):
        assert r["image"] == final[s.series_id].image_label, (s.series_number, s.part)


def test_a_real_adc_map_whose_header_says_dwi_is_caught_by_its_physics(tmp_path):
    """The real 'ADC_high bvalue' map, its header rewritten as a b100 trace image (ImageType without ADC, a DWI
    description: what a mis-mapped export or a PACS relabel leaves): the header path calls it low-b DWI, the
    physics finds the decay of its acquisition's images along it, and LABEL_MISMATCH says so."""
    import pydicom

    folder = need(PROSTATEX)
    files = [f for f in dicom_files(folder) if f.parent.name.startswith(("17.000000-", "18.000000-", "19.000000-"))]
    lied = tmp_path / "relabelled"
    lied.mkdir()
    for f in dicom_files(folder):
        if f.parent.name.startswith("21.000000-"):
            ds = pydicom.dcmread(f)
            ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"]
            ds.SeriesDescription = "ep2d-advdiff-3Scan-high bvalue 100"
            ds.save_as(lied / f.name)
            files.append(lied / f.name)
    events = stream(files, tmp_path / "state")
    completed = [e.series for e in events if e.type == "series_completed"]
    relabelled = next(s for s in completed if s.series_number == 21)
    assert relabelled.label == "DWI_Low"  # the header path believes the lie

    config = load_config(**{"state.dir": str(tmp_path / "state"), "protocol.enabled": False, "analysis.triage": False,
                            "gland.enabled": False})
    store = StateStore(config.db_path)
    analyzer = Analyzer(config, store, threading.Condition())
    for e in events:
        if e.type == "series_completed":
            analyzer.deliver(e)
    stored = store.events_after(0, limit=100_000)
    store.close()
    mismatches = [e for e in stored if e.type == "label_mismatch"]
    assert [(m.series_number, m.header_label, m.image_label) for m in mismatches] == [(21, "DWI_Low", "ADC")]
    assert mismatches[0].shadow  # like every image-side alert until the site has validated the classifier
    label = [e for e in stored if e.type == "series_classified" and e.series_id == relabelled.series_id][-1]
    assert label.image_label == "ADC" and label.diffusion and label.image_confidence > 0.99
