"""C-STORE limits (issue 20, finding 5): a 300 MB object is spooled to disk as it arrives (the agent
does not grow by its size), one over cstore.max_object_bytes is refused and not kept, and a receiver
on a network address needs a calling-AE allow-list. The sender is dcmtk's storescu, in its own process,
so the memory measured is the agent's alone."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
from pydicom.uid import generate_uid

from scanside.agent.runtime.config import ConfigError, load_config
from scanside.agent.service.daemon import Agent

from .factory import mr_dataset, write
from tests.agent._live import waiter

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk's storescu is not installed (make system-deps)")
_wait = waiter(120.0, step=0.1)
BIG = 300 * 1024**2


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """One 300 MB MR image (12800 x 12288 x 16 bit); the bytes are freed before anything is measured."""
    rows, cols = 12800, 12288
    ds = mr_dataset(generate_uid(), generate_uid(), rows=rows, cols=cols, images_in_acquisition=1)
    ds.PixelData = np.zeros(rows * cols, dtype=np.uint16).tobytes()
    path = write(ds, tmp_path_factory.mktemp("big") / "big.dcm")
    del ds
    assert path.stat().st_size > BIG
    return path


def _agent(tmp_path, **kw):
    return Agent(load_config(**{
        "watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"), "output.stdout": False,
        "protocol.enabled": False, "analysis.image_label": False, "analysis.triage": False, "gland.enabled": False,
        "watch.settle_s": 0.2, "series.quiet_period_s": 1.0,
        "cstore.enabled": True, "cstore.host": "127.0.0.1", "cstore.port": 0, "cstore.allowed_calling_aes": ["MRSCANNER"],
        **kw})).start()


def _rss() -> int:
    with open("/proc/self/status") as fp:
        return next(int(line.split()[1]) * 1024 for line in fp if line.startswith("VmRSS:"))


def _send(path, port) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", "MRSCANNER", "-aec", "SCANSIDE", "-xs", "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(300)
def test_a_300_mb_object_is_spooled_not_held(tmp_path, big_file):
    agent = _agent(tmp_path)
    try:
        base, peak, done = _rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            proc = _send(big_file, agent.receiver.address[1])
            assert proc.returncode == 0, proc.stderr
            assert _wait(lambda: agent.store.file_counts().get("ingested") == 1)
        finally:
            done.set()
            sampler.join()
        grew = peak[0] - base
        print(f"C-STORE of a {big_file.stat().st_size / 1024**2:.0f} MB object: agent RSS grew by {grew / 1024**2:.0f} MB")
        assert grew < 100 * 1024**2, f"the agent grew by {grew / 1024**2:.0f} MB receiving a 300 MB object"
        (stored,) = [p for p in agent.config.cstore_path.rglob("*.dcm") if ".spool" not in p.parts]
        assert abs(stored.stat().st_size - big_file.stat().st_size) < 1024  # the same data set; file meta rewritten
        assert not list((agent.config.cstore_path / ".spool").iterdir())
    finally:
        agent.stop()


@pytest.mark.timeout(300)
def test_an_object_over_the_cap_is_refused_and_not_kept(tmp_path, big_file):
    agent = _agent(tmp_path, **{"cstore.max_object_bytes": 50 * 1024**2})
    try:
        proc = _send(big_file, agent.receiver.address[1])
        assert "0xc211" in (proc.stdout + proc.stderr).lower() or proc.returncode != 0
        assert agent.receiver.stats["failed"] == 1 and agent.receiver.stats["received"] == 0
        assert not [p for p in agent.config.cstore_path.rglob("*") if p.is_file()]
    finally:
        agent.stop()


def test_network_bind_needs_an_allow_list(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(**{"cstore.enabled": True, "cstore.host": "0.0.0.0"})
    assert "cstore" in str(err.value) and "allowed_calling_aes" in str(err.value)
    assert load_config(**{"cstore.enabled": True, "cstore.host": "0.0.0.0", "cstore.allowed_calling_aes": ["MR1"]})
    assert load_config(**{"cstore.enabled": True}).cstore.host == "127.0.0.1"  # default: loopback only


def test_a_spool_that_cannot_be_created_leaves_no_real_file_to_unlink(tmp_path):
    """When the spool folder cannot be written, the stand-in spool's name is what pynetdicom unlinks
    after the handler (service_class: `os.unlink(req._dataset_file.name)`, as root in CI). It named
    os.devnull once, and every C-STORE into an unwritable folder removed /dev/null."""
    import os
    import stat

    from scanside.agent.intake import cstore

    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    spool = cstore._spool_file(delete=False)  # no receiver running: a plain temporary file
    os.unlink(spool.name)
    with cstore._spools_lock:
        cstore._spools[0] = (blocker / "spool", 1024)  # a folder under a file: mkdir fails
    try:
        stand_in = cstore._spool_file(delete=False)
    finally:
        with cstore._spools_lock:
            del cstore._spools[0]
    assert isinstance(stand_in, cstore.CappedFile) and stand_in.error is not None
    assert stand_in.write(b"x" * 10) == 10 and stand_in.file.flush() is None
    assert stand_in.name != os.devnull and not os.path.exists(stand_in.name)
    stand_in.close()
    try:  # what pynetdicom does after the handler returns
        os.unlink(stand_in.name)
    except OSError:
        pass
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
