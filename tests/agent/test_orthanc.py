"""End to end against a real PACS: Debian's Orthanc (1.10), started here on loopback with a temporary
configuration and free ports (issue 21).

- The agent's DICOM output C-STOREs its SR and SEG to Orthanc; the test reads them back over Orthanc's
  REST API: same study as the source images (the study link), the SR's sentences intact with "≥"/"≤"
  (ISO_IR 192; ISO_IR 100 made Orthanc show `needs ? 3 mm`), and a later SR naming its predecessor.
- A wrong called AE title is rejected permanently by Orthanc: a dead letter, not a retry loop.
- Orthanc pushes a whole exam to the agent's C-STORE receiver (as a site's PACS or router would); every
  series completes with the label the simulator's ground truth gives, as when exported to the folder.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from scanside.agent.runtime.config import load_config
from scanside.agent.service.daemon import Agent
from scanside.agent.outputs.dicom_out import DicomSink
from scanside.agent.outputs.sinks import SinkRunner
from tests.agent._live import free_port, stop_process, waiter
from tests.agent.test_cstore import exam_files, expected_parts, observed_parts
from tests.agent.test_dicom_out import Setup, exam, send_cfg  # noqa: F401 (exam: the shared fixture)

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
pytestmark = [pytest.mark.skipif(ORTHANC is None, reason="Orthanc not installed (Debian orthanc; make test installs it)"),
              pytest.mark.timeout(300)]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

_wait = waiter(60.0, step=0.2)


class Orthanc:
    """One Orthanc process with its own storage, HTTP on 127.0.0.1 only, no plugins."""

    def __init__(self, root: Path, modalities: dict | None = None):
        root.mkdir(parents=True, exist_ok=True)
        self.http, self.dicom = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        cfg = {
            "Name": "scanside-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "Plugins": [], "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "DicomModalities": modalities or {}, "DicomAlwaysAllowStore": True, "StableAge": 1,
            "DicomScuTimeout": 20, "ConcurrentJobs": 1,
        }
        (root / "orthanc.json").write_text(json.dumps(cfg))
        self.log = open(root / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        if not _wait(lambda: self._alive(), 60):
            self.stop()
            pytest.fail("Orthanc did not start: " + (root / "orthanc.log").read_text()[-2000:])

    def _alive(self) -> bool:
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def raw(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def post(self, path: str, body: bytes, content_type: str = "application/dicom"):
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type}, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@pytest.fixture
def orthanc(tmp_path):
    o = Orthanc(tmp_path / "orthanc")
    yield o
    o.stop()


def drained(runner: SinkRunner, sink: DicomSink) -> bool:
    """Pump until the DICOM output's outbox is empty (a transient failure on a loaded machine is retried)."""
    def step() -> bool:
        runner.pump()
        return sink.outbox_depth() == 0
    return bool(_wait(step, 60))


def _sr_texts(tags: dict) -> list[str]:
    """TextValue of every content item in Orthanc's `?simplify` JSON of an SR."""
    out: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if "TextValue" in node:
                out.append(node["TextValue"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(tags)
    return out


def test_sr_and_seg_arrive_in_the_source_study_with_their_text(tmp_path, exam, orthanc):  # noqa: F811
    s = Setup(tmp_path, *exam, **send_cfg(orthanc.dicom, called_ae="ORTHANC", acse_timeout_s=30, dimse_timeout_s=60))
    try:
        for header in s.store.series_headers(s.series_id("T2WI_nan").split("#")[0])[:3]:  # the source images
            orthanc.post("/instances", Path(header.path).read_bytes())
        dev = s.deviation()
        dev.message = "High-b DWI is b=800; PI-RADS needs b ≥ 1400 and slices ≤ 3 mm."
        s.append(dev, s.done())
        sink = DicomSink.from_config(s.config, s.store)
        runner = SinkRunner(s.store, [sink], threading.Condition())
        assert drained(runner, sink) and sink.sent == 1, sink.last_error  # protocol findings only: SR
        s.append(s.triage(key="late-triage"))  # the csPCa result after the exam ended: SR revision + SEG
        assert drained(runner, sink) and sink.sent == 3, sink.last_error

        studies = orthanc.get("/studies?expand")
        assert len(studies) == 1, "SR/SEG landed outside the source study"
        study = studies[0]
        assert study["MainDicomTags"]["StudyInstanceUID"] == s.study
        by_class: dict[str, list[str]] = {}
        for sid in study["Series"]:
            for iid in orthanc.get(f"/series/{sid}")["Instances"]:
                sop_class = orthanc.get(f"/instances/{iid}/tags?simplify")["SOPClassUID"]
                by_class.setdefault(sop_class, []).append(iid)
        assert len(by_class[SR_CLASS]) == 2 and len(by_class[SEG_CLASS]) == 1
        srs = sorted((pydicom.dcmread(io.BytesIO(orthanc.raw(f"/instances/{i}/file"))) for i in by_class[SR_CLASS]),
                     key=lambda ds: int(ds.InstanceNumber))
        first, late = srs
        assert all(ds.SpecificCharacterSet == "ISO_IR 192" for ds in srs)
        ref = late.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
        # the text as Orthanc decodes it (what its viewers and REST clients show): no "?" for ≥ / ≤
        texts = _sr_texts(orthanc.get(f"/instances/{by_class[SR_CLASS][0]}/tags?simplify"))
        assert any(dev.message in t for t in texts), texts
        assert not any("?" in t for t in texts)
    finally:
        s.store.close()


def test_wrong_called_ae_is_a_dead_letter_at_a_real_pacs(tmp_path, exam, orthanc):  # noqa: F811
    # a generous ACSE timeout: on a loaded machine a slow answer is an abort (transient, retried), not the point here
    s = Setup(tmp_path, *exam, **send_cfg(orthanc.dicom, called_ae="NOTORTHANC", acse_timeout_s=30))
    try:
        (done,) = s.append(s.deviation(), s.done())[-1:]
        sink = DicomSink.from_config(s.config, s.store)
        runner = SinkRunner(s.store, [sink], threading.Condition())
        runner.pump()
        assert drained(runner, sink), "retrying a permanent rejection"
        assert [r["key"] for r in s.store.dead_letters("dicom")] == [done.key]
        assert "rejected permanently" in s.store.dead_letters("dicom")[0]["detail"]
        assert sink.failed_attempts >= 1 and sink.dead_lettered == 1 and orthanc.get("/studies") == []
    finally:
        s.store.close()


def test_orthanc_pushes_an_exam_to_the_agents_receiver(tmp_path, exam):  # noqa: F811
    src, truth = exam
    port = free_port()
    config = load_config(**{
        "watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"), "output.stdout": False,
        "watch.settle_s": 0.2, "series.quiet_period_s": 2.0, "analysis.image_label": False, "analysis.triage": False,
        "cstore.enabled": True, "cstore.host": "127.0.0.1", "cstore.port": port, "cstore.ae_title": "SCANSIDE",
        "cstore.allowed_calling_aes": ["ORTHANC"],
    })
    (tmp_path / "export").mkdir()
    pacs = Orthanc(tmp_path / "orthanc", modalities={"scanside": ["SCANSIDE", "127.0.0.1", port]})
    agent = Agent(config).start()
    try:
        files = exam_files(src, truth)
        for f in files:
            pacs.post("/instances", f.read_bytes())
        (study,) = pacs.get("/studies")
        job = pacs.post("/modalities/scanside/store", json.dumps({"Resources": [study], "Synchronous": True}).encode(),
                        "application/json")
        assert job is not None
        want = expected_parts(truth)

        def done():
            return sum(observed_parts(agent.store.events_after(0, limit=10_000)).values()) >= sum(want.values())

        assert _wait(done, 120), agent.store.file_counts()
        time.sleep(0.3)
        assert observed_parts(agent.store.events_after(0, limit=10_000)) == want
        assert agent.store.file_counts() == {"ingested": len(files)}
        assert agent.receiver.stats["received"] == len(files) and agent.receiver.stats["accepted"] >= 1
    finally:
        agent.stop()
        pacs.stop()
