"""The C-STORE receiver inside a running Agent: a real SCU (pynetdicom as a scanner would use it, and
dcmtk's storescu where installed) sends a simulated bpMRI exam over TCP on loopback; every series
completes with the label the simulator's ground truth gives. Calling AEs off the allow-list and
wrong called AE titles are rejected with the right reasons; C-ECHO answers; nothing identifying
the patient reaches the logs or the file names."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from scanside.agent.runtime.config import load_config
from scanside.agent.service.daemon import Agent
from scanside.simulator.scanner import simulate_exam
from tests.agent._live import waiter

SCANNER_AE = "MRSCANNER"


@pytest.fixture(scope="module")
def exam(tmp_path_factory):
    out = tmp_path_factory.mktemp("cstore-exam")
    return out, simulate_exam("siemens", out, seed=3, profile="prostate-bpmri")


def expected_parts(truth):
    return Counter((s.series_uid, p.label, p.b_value if p.label.startswith("DWI") else None)
                   for s in truth.series for p in s.parts)


def observed_parts(events):
    return Counter((e.series.series_uid, e.series.label, e.series.b_values[-1] if e.series.label.startswith("DWI") else None)
                   for e in events if e.type == "series_completed")


_wait = waiter(60.0, step=0.05)


@pytest.fixture
def agent(tmp_path):
    config = load_config(**{
        "watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"), "output.stdout": False,
        "watch.settle_s": 0.2, "series.quiet_period_s": 2.0, "ingest.quarantine_after_s": 1.0,
        "ingest.retry_delays_s": [0.2, 0.4],
        "cstore.enabled": True, "cstore.host": "127.0.0.1", "cstore.port": 0, "cstore.ae_title": "SCANSIDE",
        "cstore.allowed_calling_aes": [SCANNER_AE, "OTHERSCANNER"],
    })
    agent = Agent(config).start()
    try:
        yield agent
    finally:
        agent.stop()


def exam_files(src: Path, truth) -> list[Path]:
    return [src / f for s in truth.series for f in s.files]


def send_with_pynetdicom(files: list[Path], port: int, calling: str = SCANNER_AE, called: str = "SCANSIDE"):
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=calling)
    for sop_class, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(d).Status for d in datasets]
    finally:
        assoc.release()
    return statuses


def test_exam_sent_by_pynetdicom_scu_completes_with_right_labels(agent, exam, caplog):
    src, truth = exam
    events = []
    agent.subscribe(events.append, from_now=False)
    want = expected_parts(truth)
    files = exam_files(src, truth)
    _host, port = agent.receiver.address
    with caplog.at_level(logging.DEBUG):
        statuses = send_with_pynetdicom(files, port)
        assert statuses == [0x0000] * len(files)
        assert _wait(lambda: sum(observed_parts(events).values()) >= sum(want.values()))
        time.sleep(0.3)  # anything extra would show up now
    assert observed_parts(events) == want
    assert agent.store.file_counts() == {"ingested": len(files)}
    assert agent.receiver.stats["received"] == len(files)
    # byte-for-byte: the stored objects are what the sender encoded (same SOP instances, same pixels)
    received = sorted(p for p in agent.config.cstore_path.rglob("*") if p.is_file())
    assert len(received) == len(files)
    assert not [p for p in received if p.name.startswith(".")]  # no temp files left behind
    sample = dcmread(received[0])
    original = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}[str(sample.SOPInstanceUID)]
    assert sample.PixelData == dcmread(original).PixelData
    # no patient identifiers in logs (pynetdicom's own debug logging included) or in file names
    assert any(r.name.startswith("pynetdicom") for r in caplog.records)  # its debug log was captured
    text = "\n".join(r.getMessage() for r in caplog.records) + "\n".join(str(p) for p in received)
    for phi in (truth.patient_name, truth.patient_id, truth.accession_number, truth.patient_birth_date):
        assert phi and phi not in text


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed (make setup installs it)")
def test_exam_sent_by_dcmtk_storescu(agent, exam):
    src, truth = exam
    want = expected_parts(truth)
    files = exam_files(src, truth)
    _host, port = agent.receiver.address
    out = subprocess.run(["storescu", "-aet", SCANNER_AE, "-aec", "SCANSIDE", "--scan-directories", "--recurse",
                          "--scan-pattern", "*.dcm", "127.0.0.1", str(port), *sorted({str(f.parent) for f in files})],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    def done():
        return sum(observed_parts(agent.store.events_after(0, limit=10_000)).values()) >= sum(want.values())

    assert _wait(done)
    time.sleep(0.3)
    assert observed_parts(agent.store.events_after(0, limit=10_000)) == want
    assert agent.store.file_counts() == {"ingested": len(files)}


def test_calling_ae_not_on_allow_list_is_rejected(agent):
    _host, port = agent.receiver.address
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCANSIDE")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive  # A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE not recognised
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    assert agent.receiver.stats["rejected"] == 1


def test_wrong_called_ae_is_rejected(agent, caplog):
    _host, port = agent.receiver.address
    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(Verification)
    with caplog.at_level(logging.WARNING, logger="scanside.agent.intake.cstore"):
        assoc = ae.associate("127.0.0.1", port, ae_title="SOMEONEELSE")
        assert assoc.is_rejected
        assert _wait(lambda: agent.receiver.stats["rejected"] == 1, 5)
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
    # the log names what the sender asked for (its titles), so the site knows which side to fix
    (line,) = [r.getMessage() for r in caplog.records if r.name == "scanside.agent.intake.cstore" and "rejected" in r.getMessage()]
    assert "calling AE 'MRSCANNER'" in line and "called AE 'SOMEONEELSE'" in line


def test_receiver_metrics_count_objects_bytes_and_associations(agent, exam):
    """Issue 21 (10): scanside_cstore_* in the agent's exposition, read from the receiver."""
    from prometheus_client.parser import text_string_to_metric_families

    src, truth = exam
    files = exam_files(src, truth)[:3]
    _host, port = agent.receiver.address
    bad = AE(ae_title="INTRUDER")
    bad.add_requested_context(Verification)
    assert bad.associate("127.0.0.1", port, ae_title="SCANSIDE").is_rejected
    ae = AE(ae_title=SCANNER_AE)
    datasets = [dcmread(f) for f in files]
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCANSIDE")
    assert assoc.is_established
    try:
        assert all(assoc.send_c_store(ds).Status == 0 for ds in datasets)
    finally:
        assoc.release()
    assert _wait(lambda: agent.receiver.stats["received"] == 3, 10)
    got = {}
    for fam in text_string_to_metric_families(agent.metrics.exposition().decode()):
        for smp in fam.samples:
            if smp.name.startswith("scanside_cstore_"):
                got[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    assert got[("scanside_cstore_objects_total", (("result", "stored"),))] == 3
    assert got[("scanside_cstore_objects_total", (("result", "failed"),))] == 0
    assert got[("scanside_cstore_associations_total", (("result", "accepted"),))] == 1
    assert got[("scanside_cstore_associations_total", (("result", "rejected"),))] == 1
    received = sum(p.stat().st_size for p in agent.config.cstore_path.rglob("*.dcm"))
    assert got[("scanside_cstore_received_bytes_total", ())] == received


def test_c_echo(agent):
    _host, port = agent.receiver.address
    ae = AE(ae_title="OTHERSCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCANSIDE")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert agent.receiver.stats["echo"] == 1


@pytest.mark.skipif(shutil.which("echoscu") is None, reason="dcmtk not installed")
def test_c_echo_from_dcmtk(agent):
    _host, port = agent.receiver.address
    ok = subprocess.run(["echoscu", "-aet", SCANNER_AE, "-aec", "SCANSIDE", "127.0.0.1", str(port)],
                        capture_output=True, timeout=30)
    bad = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "SCANSIDE", "127.0.0.1", str(port)],
                         capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0
    assert bad.returncode != 0 and "Calling AE Title Not Recognized" in (bad.stdout + bad.stderr)


def test_unwritable_receive_folder_answers_out_of_resources_and_agent_survives(agent, exam):
    src, truth = exam
    files = exam_files(src, truth)[:2]
    _host, port = agent.receiver.address
    folder = agent.config.cstore_path
    shutil.rmtree(folder)
    folder.write_bytes(b"")  # the receive folder is now a file: every write fails with an OSError
    try:
        statuses = send_with_pynetdicom(files, port)
    finally:
        folder.unlink()
    assert statuses == [0xA700, 0xA700]
    assert agent.receiver.stats["failed"] == 2
    assert agent.healthy()
    # alive, but not ready while the receive folder cannot be written (scanside.agent.runtime.health)
    from scanside.agent.service.api import readiness

    r = readiness(agent)
    assert not r.ready and not r.checks["writes"].ok and f"received {folder}" in r.checks["writes"].detail, r
    assert agent.write_health.failing()["received"].attempts == 2
    # the folder back, the scanner's retry goes through
    assert send_with_pynetdicom(files, port) == [0x0000, 0x0000]
    assert readiness(agent).checks["writes"].ok and agent.write_health.failures_total["received"] == 2


def test_received_but_not_ingested_objects_are_ingested_after_restart(tmp_path, exam):
    src, truth = exam
    config = load_config(**{
        "watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"), "output.stdout": False,
        "series.quiet_period_s": 1.0, "cstore.enabled": True, "cstore.host": "127.0.0.1", "cstore.port": 0,
    })
    # a crash after the rename and before ingest: objects sit in the receive folder, plus a half-written temp
    from scanside.agent.intake.cstore import object_name

    series = truth.series[0]
    for f in series.files:
        ds = dcmread(src / f, stop_before_pixels=True)
        dest = config.cstore_path / object_name(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, dest)
    stale = dest.parent / ".x.dcm.1.part"
    stale.write_bytes(b"DICM")
    agent = Agent(config).start()
    try:
        assert _wait(lambda: agent.store.file_counts().get("ingested") == len(series.files), timeout=30)
    finally:
        agent.stop()
    assert not stale.exists()
    assert os.path.isdir(config.cstore_path)
