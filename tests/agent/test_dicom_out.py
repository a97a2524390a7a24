"""DICOM output for a simulated bpMRI exam: TID 1500 SR + fractional SEG built from the typed events,
read back with highdicom, validated with dciodvfy (Debian dicom3tools), and C-STOREd to a real
pynetdicom receiver on 127.0.0.1. The triage result and its likelihood map are test input made by
hand from the simulator's ground truth lesion (the model runtime is tested on its own)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from scanside.agent.runtime.config import load_config
from scanside.agent.outputs.dicom_out import DicomSink, frame_planes
from scanside.agent.outputs.dicom_send import DicomSender, classify_status
from scanside.agent.schema.events import ExamCompleted, LesionFinding, ProtocolDeviation, TriageResult
from scanside.agent.outputs.maps import MapStore
from scanside.agent.intake.pipeline import Pipeline
from scanside.agent.outputs.sinks import RetryLater, SinkRunner
from scanside.agent.state.database import StateStore
from scanside.engines.preprocess import Grid
from scanside.simulator.scanner import simulate_exam

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="session")
def exam(tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom-out-exam")
    truth = simulate_exam("siemens", out, 5, profile="prostate-bpmri", n_lesions=1, cspca=True)
    return out, truth


def lesion_map(truth, shape=(20, 96, 96)):
    """Test input: a likelihood blob at the ground-truth lesion on a 3 x 1 x 1 mm axial grid."""
    les = truth.lesions[0]
    a = np.zeros((4, 4))
    a[:3, 0], a[:3, 1], a[:3, 2], a[3, 3] = (0, 0, 3.0), (0, 1.0, 0), (1.0, 0, 0), 1
    a[:3, 3] = np.asarray(truth.prostate_center_lps_mm) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    grid = Grid(shape=shape, affine=a)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    r = np.linalg.norm(grid.index_to_lps(idx) - np.asarray(les.center_lps_mm), axis=-1)
    return np.exp(-0.5 * (r / (sorted(les.diameters_mm)[1] / 2)) ** 2).astype(np.float32), grid


class Setup:
    def __init__(self, tmp_path, exam_dir, truth, **cfg):
        self.truth = truth
        src = tmp_path / "export"
        shutil.copytree(exam_dir, src)
        self.config = load_config(**{"watch.folder": str(src), "state.dir": str(tmp_path / "state"),
                                     "dicom_output.folder": str(tmp_path / "dicom-out"), **cfg})
        self.store = StateStore(self.config.db_path)
        pipe = Pipeline(self.config, self.store)
        for p in sorted(glob.glob(str(src / "**" / "*"), recursive=True)):
            if os.path.isfile(p) and not p.endswith(".json"):
                pipe.process_file(p)
        pipe.complete_all()
        self.completed = [e for e in self.store.events_after(0, 1000) if e.type == "series_completed"]
        self.study = truth.study_uid
        self.maps = MapStore(self.config.state.dir / "maps")

    def series_id(self, label):
        return next(e.series.series_id for e in self.completed if e.series.label == label and e.series.plane == "axial")

    def triage(self, key="triage-1"):
        les = self.truth.lesions[0]
        d = sorted(les.diameters_mm, reverse=True)
        return TriageResult(
            key=key, study_uid=self.study, alert_id="tri-1", probability=0.91,
            findings=[LesionFinding(center_lps_mm=les.center_lps_mm, long_axis_mm=d[0], short_axis_mm=d[1],
                                    volume_ml=float(np.pi / 6 * d[0] * d[1] * d[2] / 1000), likelihood=0.87, zone=les.zone)],
            recommendation="BPMRI_SUFFICIENT", thresholds={"dce": 0.3},
            inputs={"t2w": self.series_id("T2WI_nan"), "adc": self.series_id("ADC"), "hbv": self.series_id("DWI_High")},
            model="cspca-ref@1.0.0", backend="onnxruntime")

    def deviation(self):
        return ProtocolDeviation(key="dev-1", study_uid=self.study, alert_id="dev-1", code="DWI_HIGH_B_TOO_LOW",
                                 severity="critical", message="High-b DWI is b=800; acquire or calculate b>=1400.",
                                 measured="800 s/mm2", required=">= 1400 s/mm2", profile="pirads-v2.1-bpmri")

    def done(self, key="done-1"):
        return ExamCompleted(key=key, study_uid=self.study, reason="quiet_period", n_series=len(self.completed), n_deviations=1)

    def append(self, *events, with_map=True):
        for ev in events:
            if with_map and isinstance(ev, TriageResult):
                self.maps.put(ev.key, *lesion_map(self.truth))
            ev.seq = self.store.append_event(ev)
        return events

    def t2w_files(self):
        uid = self.series_id("T2WI_nan")
        return [pydicom.dcmread(h.path, stop_before_pixels=True) for h in self.store.series_headers(uid)]


@pytest.fixture
def setup(tmp_path, exam):
    s = Setup(tmp_path, *exam)
    yield s
    s.store.close()


def content_items(items):
    for it in items:
        yield it
        if "ContentSequence" in it:
            yield from content_items(it.ContentSequence)


def test_sr_and_seg_round_trip_with_measurements_and_references(setup):
    dev, tri, done = setup.append(setup.deviation(), setup.triage(), setup.done())
    sink = DicomSink(setup.config.dicom_output, setup.store, setup.maps)
    sink.deliver(done)
    assert sink.dead_lettered == 0, sink.last_error
    sr_path = next(p for p in sink.written if p.name.startswith("SR_"))
    seg_path = next(p for p in sink.written if p.name.startswith("SEG_"))
    t2w = setup.t2w_files()
    t2w_series = t2w[0].SeriesInstanceUID

    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == SR_CLASS and sr.StudyInstanceUID == setup.study
    # the patient module comes from the source (correct for a PACS); nothing invented
    assert sr.PatientID == setup.truth.patient_id and str(sr.PatientName) == setup.truth.patient_name
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1
    g, f = groups[0], tri.findings[0]
    values = {m.name.value: (m.value, m.unit.value) for m in g.get_measurements()}
    assert values[codes.SCT.LongAxis.value] == (pytest.approx(f.long_axis_mm), "mm")
    assert values[codes.SCT.ShortAxis.value] == (pytest.approx(f.short_axis_mm), "mm")
    assert values[codes.SCT.Volume.value] == (pytest.approx(f.volume_ml), "ml")
    assert values[codes.DCM.ProbabilityOfCancer.value][0] == pytest.approx(0.87)
    roi = g.roi
    assert roi.GraphicType == "POINT"
    np.testing.assert_allclose(np.asarray(roi.value).reshape(-1), f.center_lps_mm, atol=1e-3)
    assert roi.ReferencedFrameOfReferenceUID == t2w[0].FrameOfReferenceUID
    assert {s.value.value for s in g.finding_sites} == {"41216001", "279706003" if f.zone == "PZ" else "399384005"}
    exam_groups = {str(x.tracking_identifier): x for x in sr.content.get_image_measurement_groups()}
    assert exam_groups["csPCa triage"].get_measurements()[0].value == pytest.approx(0.91)
    protocol = next(x for k, x in exam_groups.items() if k.startswith("protocol check"))
    evals = protocol.get_qualitative_evaluations()
    assert [(q.name.value, q.name.scheme_designator, q.value.value) for q in evals] == \
        [("DWI_HIGH_B_TOO_LOW", "99SCANSIDE", codes.SCT.SevereSeverityModifier.value)]
    texts = [it.TextValue for it in content_items(sr.ContentSequence) if it.ValueType == "TEXT"]
    assert any(t.startswith(dev.message) and "Required: >= 1400 s/mm2" in t for t in texts)
    # evidence: every instance of every series of the exam, the T2W ones included
    evidence = {(s.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
                for st in sr.CurrentRequestedProcedureEvidenceSequence for s in st.ReferencedSeriesSequence
                for i in s.ReferencedSOPSequence}
    stored = {(r["series_uid"], r["sop_uid"]) for r in setup.store._q("SELECT series_uid, sop_uid FROM instances")}
    assert evidence == stored
    assert {(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in t2w} <= evidence

    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == SEG_CLASS and seg.StudyInstanceUID == setup.study
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t2w_series
    assert seg.FrameOfReferenceUID == t2w[0].FrameOfReferenceUID
    t2w_sops = {ds.SOPInstanceUID for ds in t2w}
    refs = {fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for fg in seg.PerFrameFunctionalGroupsSequence}
    assert refs and refs <= t2w_sops
    # the peak of the likelihood sits at the lesion centre in patient space (resampling geometry)
    pix = seg.pixel_array.astype(float)
    k, r, c = np.unravel_index(np.argmax(pix), pix.shape)
    assert pix.max() >= 240  # the blob peaks at 1.0 -> 255 (minus the interpolation at the sample point)
    ipp, iop, spacing = frame_planes(seg)[k]
    peak = ipp + iop[3:] * spacing[0] * r + iop[:3] * spacing[1] * c
    assert np.linalg.norm(peak - np.asarray(f.center_lps_mm)) < 3.0  # within a slice (3 mm) of the centre


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (Debian package dicom3tools; `make setup` installs it where apt-get works)")
def test_dciodvfy_finds_no_errors(setup):
    (done,) = setup.append(setup.deviation(), setup.triage(), setup.done())[-1:]
    sink = DicomSink(setup.config.dicom_output, setup.store, setup.maps)
    sink.deliver(done)
    assert len(sink.written) == 2
    for path in sink.written:
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        lines = (res.stdout + res.stderr).splitlines()
        assert lines and lines[0].strip() in ("Comprehensive3DSR", "Segmentation"), lines[:3]
        errors = [ln for ln in lines if ln.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


class StoreSCP:
    """A real C-STORE receiver (pynetdicom) on 127.0.0.1; `refuse` makes it answer a failure status."""

    def __init__(self, ae_title="PACS", port=0, refuse=None):
        self.received: list[pydicom.Dataset] = []
        self.calling: list[str] = []
        self.refuse = refuse
        ae = AE(ae_title=ae_title)
        for uid in (SR_CLASS, SEG_CLASS):
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)

        def on_store(event):
            if self.refuse is not None:
                return self.refuse
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            self.calling.append(event.assoc.requestor.ae_title)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self.server.server_address[1]

    def stop(self):
        self.server.shutdown()


def send_cfg(port, **kw):
    return {"dicom_output.send": {"host": "127.0.0.1", "port": port, "called_ae": "PACS", "calling_ae": "SCANSIDE-T",
                                  "connect_timeout_s": 2, "acse_timeout_s": 5, "dimse_timeout_s": 10,
                                  "network_timeout_s": 10, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, **kw}}


def test_cstore_to_real_receiver_equals_written(tmp_path, exam):
    scp = StoreSCP()
    try:
        s = Setup(tmp_path, *exam, **send_cfg(scp.port))
        s.append(s.deviation(), s.triage(), s.done())
        sink = DicomSink.from_config(s.config, s.store)
        runner = SinkRunner(s.store, [sink], threading.Condition())
        runner.pump()
        assert sink.outbox_depth() == 0 and sink.sent == 2, sink.last_error
        assert sorted(ds.SOPClassUID for ds in scp.received) == sorted([SEG_CLASS, SR_CLASS])
        assert scp.calling == ["SCANSIDE-T", "SCANSIDE-T"]
        for path in sink.written:
            written = pydicom.dcmread(path)
            got = next(ds for ds in scp.received if ds.SOPInstanceUID == written.SOPInstanceUID)
            assert got == written  # every element, pixel data included
        s.store.close()
    finally:
        scp.stop()


def test_receiver_down_then_up_retries_from_the_outbox(tmp_path, exam):
    scp = StoreSCP()
    port = scp.port
    scp.stop()  # nobody listening on that port now
    s = Setup(tmp_path, *exam, **send_cfg(port))
    s.append(s.triage(), s.done())
    sink = DicomSink.from_config(s.config, s.store)
    runner = SinkRunner(s.store, [sink], threading.Condition())
    runner.pump()
    assert sink.outbox_depth() > 0 and "association" in (sink.last_error or "")
    assert sink.failed_attempts >= 1 and sink.dead_lettered == 0  # issue 21 (10): failed C-STOREs counted
    assert exposed_delivery_failures(s, runner) == sink.failed_attempts
    written = {p: p.stat().st_mtime_ns for p in sink.written}
    assert len(written) == 2  # written to the folder although not sent
    scp = StoreSCP(port=port)
    try:
        end = time.monotonic() + 20
        while sink.outbox_depth() and time.monotonic() < end:
            runner.pump()
            time.sleep(0.05)
        assert sink.outbox_depth() == 0
        assert len(scp.received) == 2
        # the retry sent the files already written (same UIDs), it did not build new ones
        assert {p: p.stat().st_mtime_ns for p in sink.written} == written
        assert {ds.SOPInstanceUID for ds in scp.received} == {pydicom.dcmread(p).SOPInstanceUID for p in written}
    finally:
        scp.stop()
        s.store.close()


def test_refusal_is_recorded_and_skipped(tmp_path, exam):
    scp = StoreSCP(refuse=0xA900)  # data set does not match SOP class: permanent
    try:
        s = Setup(tmp_path, *exam, **send_cfg(scp.port))
        (_, done) = s.append(s.triage(), s.done())
        sink = DicomSink.from_config(s.config, s.store)
        SinkRunner(s.store, [sink], threading.Condition()).pump()
        assert sink.outbox_depth() == 0
        dead = s.store.dead_letters("dicom")
        assert [(r["key"], r["reason"]) for r in dead] == [(done.key, "c-store")]
        assert "0xA900" in dead[0]["detail"]
        s.store.close()
    finally:
        scp.stop()
    assert classify_status(0xA700) == "transient" and classify_status(0xB007) == "ok"
    assert classify_status(0xC123) == "permanent" and classify_status(0x0122) == "permanent"


def test_rebuild_is_idempotent_and_late_triage_builds(setup):
    (done,) = setup.append(setup.deviation(), setup.done())[-1:]
    sink = DicomSink(setup.config.dicom_output, setup.store, setup.maps)
    sink.deliver(done)
    assert [p.name[:3] for p in sink.written] == ["SR_"]  # no triage yet: protocol findings only
    first = sink.written[0]
    sr = hd.sr.srread(first)
    assert sr.content.get_planar_roi_measurement_groups() == []
    mtime = first.stat().st_mtime_ns
    sink.deliver(done)  # redelivery after a crash: same object, not rewritten
    assert sink.written == [first] and first.stat().st_mtime_ns == mtime
    (tri,) = setup.append(setup.triage(key="late-triage"))
    sink.deliver(tri)  # the triage came after the exam was completed: a new report, with the lesion
    assert len(sink.written) == 3
    late = hd.sr.srread(next(p for p in sink.written[1:] if p.name.startswith("SR_")))
    assert late.SOPInstanceUID != sr.SOPInstanceUID and late.SeriesInstanceUID == sr.SeriesInstanceUID
    assert len(late.content.get_planar_roi_measurement_groups()) == 1


def test_triage_before_exam_end_waits_and_missing_map_gives_sr_only(setup):
    (tri,) = setup.append(setup.triage(), with_map=False)
    sink = DicomSink(setup.config.dicom_output, setup.store, setup.maps)
    sink.deliver(tri)
    assert sink.written == []  # the exam is still running: the report waits for ExamCompleted
    (done,) = setup.append(setup.done())
    sink.deliver(done)
    assert [p.name[:3] for p in sink.written] == ["SR_"]


def test_source_images_gone_is_recorded_not_raised(setup):
    (done,) = setup.append(setup.triage(), setup.done())[-1:]
    for h in setup.store.series_headers(setup.series_id("T2WI_nan").split("#")[0]):
        os.unlink(h.path)
    sink = DicomSink(setup.config.dicom_output, setup.store, setup.maps)
    sink.deliver(done)  # must not raise
    assert sink.written == []
    assert [r["reason"] for r in setup.store.dead_letters("dicom")] == ["build"]


def test_output_inside_watch_folder_is_refused(tmp_path):
    cfg = load_config(**{"watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"),
                         "dicom_output.folder": str(tmp_path / "export" / "out")})
    with pytest.raises(ValueError, match="inside watch.folder"):
        DicomSink.from_config(cfg, StateStore(":memory:"))


def test_sender_without_receiver_is_transient():
    from scanside.agent.runtime.config import DicomSendConfig
    from scanside.agent.outputs.dicom_send import TransientSendError

    cfg = DicomSendConfig(host="127.0.0.1", port=1, connect_timeout_s=1, acse_timeout_s=1)
    with pytest.raises(TransientSendError):
        DicomSender(cfg).send([Path(pydicom.data.get_testdata_file("MR_small.dcm"))])
    assert issubclass(RetryLater, Exception)


def test_sr_is_utf8_and_a_late_report_names_its_predecessor(setup):
    """Issue 21 (8, 9): "≥" survives (ISO_IR 192 whatever the source's character set), and the report
    written for a late triage supersedes the first one through the Predecessor Documents Sequence."""
    (done,) = setup.append(setup.deviation(), setup.done())[-1:]
    sink = DicomSink(setup.config.dicom_output, setup.store, setup.maps)
    sink.deliver(done)
    first = pydicom.dcmread(sink.written[0])
    assert first.SpecificCharacterSet == "ISO_IR 192"
    assert "PredecessorDocumentsSequence" not in first
    texts = [str(it.TextValue) for it in content_items(first.ContentSequence) if "TextValue" in it]
    assert any("b>=1400" in t or "≥" in t or ">= 1400" in t for t in texts), texts
    (tri,) = setup.append(setup.triage(key="late-triage"))
    sink.deliver(tri)
    late = pydicom.dcmread(next(p for p in sink.written[1:] if p.name.startswith("SR_")))
    pred = late.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == first.StudyInstanceUID
    ref = pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_sr_text_with_non_latin1_characters_round_trips(setup):
    """A sentence with ≤/≥ written into the file comes back unchanged (Orthanc showed `needs ? 3 mm`)."""
    dev = setup.deviation()
    dev.message = "Slices 4 mm; PI-RADS needs ≤ 3 mm and b ≥ 1400 s/mm²."
    (done,) = setup.append(dev, setup.done())[-1:]
    sink = DicomSink(setup.config.dicom_output, setup.store, setup.maps)
    sink.deliver(done)
    raw = sink.written[0].read_bytes()
    assert "≤ 3 mm".encode("utf-8") in raw and "≥ 1400".encode("utf-8") in raw
    sr = pydicom.dcmread(sink.written[0])
    texts = [str(it.TextValue) for it in content_items(sr.ContentSequence) if "TextValue" in it]
    assert any(dev.message in t for t in texts), texts


def test_wrong_called_ae_is_a_dead_letter_and_counted(tmp_path, exam):
    """Issue 21 (10): a receiver that rejects the association permanently (called AE title not its own)
    is not retried forever: the event goes to the dead letters, and the failure is counted."""
    from scanside.agent.intake.cstore import StoreSCP as Receiver
    from scanside.agent.runtime.config import CStoreConfig

    rx = Receiver(CStoreConfig(enabled=True, ae_title="PACS", host="127.0.0.1", port=0), tmp_path / "rx").start()
    try:
        s = Setup(tmp_path, *exam, **send_cfg(rx.address[1], called_ae="NOT-PACS"))
        (_, done) = s.append(s.triage(), s.done())
        sink = DicomSink.from_config(s.config, s.store)
        SinkRunner(s.store, [sink], threading.Condition()).pump()
        assert sink.outbox_depth() == 0  # not waiting for a retry
        dead = s.store.dead_letters("dicom")
        assert [(r["key"], r["reason"]) for r in dead] == [(done.key, "c-store")]
        assert "rejected permanently" in dead[0]["detail"]
        assert sink.failed_attempts == 1 and sink.dead_lettered == 1
        assert rx.stats["rejected"] == 1
        s.store.close()
    finally:
        rx.stop()


def exposed_delivery_failures(s, runner) -> float:
    """scanside_delivery_failures_total{sink="dicom"} as the agent's collector computes it."""
    from scanside.agent.runtime.health import WriteHealth
    from scanside.agent.service.metrics import _agent_gauges

    class AgentView:  # the attributes the collector reads from an Agent
        sinks = SinkRunner(s.store, [], threading.Condition())
        output_runners = [runner]
        store = s.store
        config = s.config
        ingestor = type("Ingestor", (), {"backlog": 0})()
        write_health = WriteHealth()
        receiver = None

    (fam,) = [f for f in _agent_gauges(AgentView()) if f.name == "scanside_delivery_failures"]
    return next(x.value for x in fam.samples if x.labels == {"sink": "dicom"})
