"""DICOM C-STORE receiver (pynetdicom SCP): the scanner pushes images to us instead of (or as well as)
exporting them to a folder.

Each received object is written byte for byte as the sender encoded it (preamble + file meta +
dataset, no decode/re-encode) to a hidden temp file, flushed, then renamed into the receive folder and
handed straight to the Ingestor as a closed file: the same settle/retry/quarantine path the folder
watcher feeds. Why not write into the watched export folder and let the watcher see the rename: the
export folder belongs to the scanner and is read-only to the agent (systemd ReadOnlyPaths=), and a
direct hand-over does not depend on inotify (the export folder may be polled over SMB/NFS). The
receive folder lives in the state folder, so files received but not yet ingested when the agent
stops are picked up again on the next start (`catch_up`).

Objects are spooled to disk as their PDUs arrive (pynetdicom's STORE_RECV_CHUNKED_DATASET), into a
hidden `.spool` folder inside the receive folder, and renamed into place: a 300 MB object costs disk,
not memory. One larger than cstore.max_object_bytes stops being written at that size and is refused
(0xC211) and removed; cstore.max_pdu bounds each PDU.

The sender gets Success only after the object is on disk; an object we could not store gets
0xA700 (out of resources) so that the scanner keeps it queued. Associations from a calling AE title
not on the allow-list are rejected (rejected-permanent, service user, reason 3 "calling AE title not
recognised"); a wrong called AE title gets reason 7. No patient data is logged: objects are
named and logged by a hash of their SOP Instance UID.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

import pydicom
from pydicom import uid as tsuid
from pynetdicom import AE, _config as pynetdicom_config, dimse_messages, evt
from pynetdicom import sop_class as sc

from scanside.agent.outputs.atomic import atomic_path
from scanside.agent.runtime.health import WriteReporter
from scanside.agent.runtime.config import AgentConfig, CStoreConfig
from scanside.agent.intake.ingest import Ingestor

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_TOO_LARGE = 0xC211  # a failure (not "out of resources"): the sender should not retry it as it is
SPOOL = ".spool"


class CappedFile:
    """pynetdicom's spool file with a size bound: bytes past `cap` are dropped and `over` is set, so a
    huge object fills neither memory nor the disk. Quacks like the NamedTemporaryFile it wraps."""

    def __init__(self, inner: Any, cap: int, error: Optional[OSError] = None):
        # no spool (error set): writes are dropped into an empty buffer, and the name pynetdicom unlinks
        # after the handler is one that names no file. Never os.devnull: as root, that unlink removed
        # /dev/null itself.
        self._inner = inner if inner is not None else io.BytesIO()
        self.cap = cap
        self.written = 0
        self.over = False
        self.error = error  # the spool could not be created (disk full, folder unwritable): refuse, keep going
        self.name = inner.name if inner is not None else os.path.join(tempfile.gettempdir(), f".scanside-no-spool-{uuid.uuid4().hex}")
        self.file = inner.file if inner is not None else self._inner

    def write(self, data: bytes) -> int:
        if self.error is not None:
            return len(data)
        if self.over or self.written + len(data) > self.cap:
            self.over = True
            return len(data)
        self.written += len(data)
        return self._inner.write(data)

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


_spools: dict[int, tuple[Path, int]] = {}  # id(AE) -> (spool folder, cap) of each running receiver
_spools_lock = threading.Lock()
_pynetdicom_defaults = (pynetdicom_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile)


def _spool_file(*args: Any, **kwargs: Any) -> Any:
    """Replaces dimse_messages.NamedTemporaryFile: the spool goes to the receiving AE's own folder (same
    file system as its receive folder, so a rename puts it in place) and is size-capped. pynetdicom
    decodes in the association's DUL thread, whose `assoc` names the AE."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    with _spools_lock:
        spool = _spools.get(id(getattr(assoc, "ae", None))) or (next(reversed(_spools.values())) if _spools else None)
    if spool is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    folder, cap = spool
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return CappedFile(tempfile.NamedTemporaryFile(*args, dir=folder, prefix=".", **kwargs), cap)
    except OSError as exc:  # an exception here would abort the association: the handler answers instead
        return CappedFile(None, cap, error=exc)

TRANSFER_SYNTAXES = [
    tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian, tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian, tsuid.JPEGLosslessSV1, tsuid.JPEGLossless, tsuid.JPEGBaseline8Bit,
    tsuid.JPEGExtended12Bit, tsuid.JPEGLSLossless, tsuid.JPEGLSNearLossless, tsuid.JPEG2000Lossless,
    tsuid.JPEG2000, tsuid.RLELossless,
]

# what an MR scanner or its post-processing sends for a prostate exam; non-image objects (SR, GSPS)
# are accepted too so the sender does not fail the whole job, and the ingest path records them as ignored
STORAGE_CLASSES = [
    sc.MRImageStorage, sc.EnhancedMRImageStorage, sc.EnhancedMRColorImageStorage,
    sc.LegacyConvertedEnhancedMRImageStorage, sc.MRSpectroscopyStorage,
    sc.SecondaryCaptureImageStorage, sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage, sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sc.ParametricMapStorage, sc.SegmentationStorage, sc.RawDataStorage,
    sc.GrayscaleSoftcopyPresentationStateStorage,
    sc.BasicTextSRStorage, sc.EnhancedSRStorage, sc.ComprehensiveSRStorage, sc.Comprehensive3DSRStorage,
    sc.CTImageStorage, sc.EnhancedCTImageStorage,
]


def object_name(sop_instance_uid: str, study_uid: str = "") -> str:
    """Relative path for a received object: hashed so no identifier shows in file names or logs."""
    sop = hashlib.sha1(sop_instance_uid.encode()).hexdigest()[:24]
    study = hashlib.sha1(study_uid.encode()).hexdigest()[:16] if study_uid else "unsorted"
    return f"{study}/{sop}.dcm"


class StoreSCP:
    """A C-STORE/C-ECHO SCP that writes into `folder` and notifies `ingestor`. Thread-safe; one
    pynetdicom server thread per association (at most `max_associations`)."""

    def __init__(self, config: CStoreConfig, folder: Path, ingestor: Optional[Ingestor] = None,
                 health: Optional[WriteReporter] = None):
        self.config = config
        self.folder = Path(folder)
        self.ingestor = ingestor
        self.ae = AE(ae_title=config.ae_title)
        self.ae.require_called_aet = True  # reason 7 for a wrong called AE title
        self.ae.require_calling_aet = list(config.allowed_calling_aes)  # empty: anyone; else reason 3
        self.ae.maximum_associations = config.max_associations
        self.ae.maximum_pdu_size = config.max_pdu
        self.ae.network_timeout = config.network_timeout_s
        self.ae.acse_timeout = min(30.0, config.network_timeout_s)
        self.ae.dimse_timeout = config.network_timeout_s
        for cls in STORAGE_CLASSES:
            self.ae.add_supported_context(cls, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(sc.Verification)
        self._server = None
        self._lock = threading.Lock()
        # read by scanside.agent.service.metrics at scrape time (scanside_cstore_*)
        self.stats = {"received": 0, "failed": 0, "rejected": 0, "accepted": 0, "echo": 0, "bytes": 0}
        self.health = health  # failed writes: /readyz "writes" and one ERROR per episode (scanside.agent.runtime.health)
        self._handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound: port 0 in the config picks a free one."""
        if self._server is None:
            raise RuntimeError("receiver not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> "StoreSCP":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._clean_temp()
        if not self.config.allowed_calling_aes:
            log.warning("C-STORE receiver accepts any calling AE title (cstore.allowed_calling_aes is empty)")
        # spool each object to disk as it arrives (process-wide pynetdicom switches; the spool folder and
        # the cap are looked up per AE in _spool_file)
        with _spools_lock:
            _spools[id(self.ae)] = (self.folder / SPOOL, self.config.max_object_bytes)
            pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
            dimse_messages.NamedTemporaryFile = _spool_file  # type: ignore[attr-defined]
        self._server = self.ae.start_server((self.config.host, self.config.port), block=False,
                                           evt_handlers=self._handlers)
        host, port = self.address
        log.info("C-STORE receiver %s listening on %s:%d", self.config.ae_title, host, port)
        return self

    name = "cstore"

    def stop(self, timeout: float = 10.0) -> None:  # pynetdicom's shutdown joins its own threads
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with _spools_lock:
            _spools.pop(id(self.ae), None)
            if not _spools:  # other SCPs in this process (a test's PACS) get pynetdicom's defaults back
                pynetdicom_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = _pynetdicom_defaults

    def alive(self) -> bool:
        server = self._server
        return bool(server is not None and server.socket is not None and server.socket.fileno() >= 0)

    def catch_up(self) -> int:
        """Queue objects received before a stop but not yet ingested (already ingested ones are skipped)."""
        if self.ingestor is None or not self.folder.is_dir():
            return 0
        n = 0
        for dirpath, dirs, files in os.walk(self.folder):
            dirs[:] = [d for d in dirs if d != SPOOL]
            for name in sorted(files):
                if not name.startswith("."):
                    self.ingestor.notify(os.path.join(dirpath, name), closed=True)
                    n += 1
        return n

    def _clean_temp(self) -> None:
        """Half-received objects from a crash: the sender got no Success for them and will resend."""
        for dirpath, _dirs, files in os.walk(self.folder):
            for name in files:
                if name.startswith(".") and (name.endswith(".part") or os.path.basename(dirpath) == SPOOL):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                    except OSError:
                        pass

    # ------------------------------------------------------------------ handlers (pynetdicom threads)
    def _on_echo(self, event) -> int:  # type: ignore[no-untyped-def]
        with self._lock:
            self.stats["echo"] += 1
        return STATUS_SUCCESS

    def _on_accepted(self, event) -> None:  # type: ignore[no-untyped-def]
        self._count("accepted")

    def _on_rejected(self, event) -> None:  # type: ignore[no-untyped-def]
        self._count("rejected")
        req = event.assoc.requestor
        # the titles the sender asked for (its A-ASSOCIATE-RQ), not ours: that is what the site must fix
        asked = getattr(req, "primitive", None)
        calling = str(getattr(asked, "calling_ae_title", None) or req.ae_title).strip()
        called = str(getattr(asked, "called_ae_title", None) or "").strip()
        log.warning("rejected association from %s: calling AE %r, called AE %r (this receiver is %r%s)",
                    req.address, calling, called, self.config.ae_title,
                    f"; allowed callers {', '.join(self.config.allowed_calling_aes)}" if self.config.allowed_calling_aes else "")

    def _on_store(self, event) -> int:  # type: ignore[no-untyped-def]
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        ref = hashlib.sha1(sop_uid.encode()).hexdigest()[:12]
        spooled = getattr(event.request, "_dataset_file", None)
        if isinstance(spooled, CappedFile) and spooled.error is not None:
            return self._not_stored(ref, spooled.error)
        if isinstance(spooled, CappedFile) and spooled.over:
            log.warning("C-STORE object %s refused: larger than cstore.max_object_bytes (%d)", ref, spooled.cap)
            self._count("failed")
            return STATUS_TOO_LARGE  # pynetdicom removes the spool file after we return
        if not sop_uid:
            self._count("failed")
            return STATUS_CANNOT_UNDERSTAND
        try:
            spool_path = Path(event.dataset_path) if spooled is not None else None
        except AttributeError:
            spool_path = None
        data = None
        if spool_path is None:  # not spooled (another component turned chunking off): the bytes in memory
            try:
                data = event.encoded_dataset(include_meta=True)
            except Exception as exc:  # a dataset pynetdicom cannot frame: tell the sender, keep going
                log.warning("C-STORE object %s not understood: %s", ref, exc.__class__.__name__)
                self._count("failed")
                return STATUS_CANNOT_UNDERSTAND
        study_uid = self._study_uid(event, spool_path)
        dest = self.folder / object_name(sop_uid, study_uid)
        try:
            if spool_path is not None:
                spooled.file.flush()
                self._place(spool_path, dest)
            else:
                self._write(dest, data)  # type: ignore[arg-type]
        except OSError as exc:
            return self._not_stored(ref, exc)
        if self.health is not None:
            self.health.ok("received")
        self._count("received")
        size = dest.stat().st_size
        self._count("bytes", size)
        log.debug("C-STORE object %s stored (%d bytes)", ref, size)
        if self.ingestor is not None:
            self.ingestor.notify(str(dest), closed=True)
        return STATUS_SUCCESS

    def _not_stored(self, ref: str, exc: OSError) -> int:
        """Disk full, folder gone: the sender keeps the object and retries later."""
        if self.health is not None:  # one ERROR per failure episode (scanside.agent.runtime.health), /readyz false meanwhile
            self.health.failed("received", self.folder, exc, consequence="refused (out of resources): the sender keeps it")
            log.warning("C-STORE object %s could not be stored: %s", ref, exc.strerror or exc.__class__.__name__)
        else:
            log.error("C-STORE object %s could not be stored: %s", ref, exc.strerror or exc.__class__.__name__)
        self._count("failed")
        return STATUS_OUT_OF_RESOURCES

    @staticmethod
    def _study_uid(event, spool_path: Optional[Path] = None) -> str:  # type: ignore[no-untyped-def]
        """Study Instance UID for the folder layout; decoding the dataset is only a nicety here."""
        try:
            if spool_path is not None:  # header only: the pixels stay on disk
                ds = pydicom.dcmread(spool_path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                return str(ds.get("StudyInstanceUID", "") or "")
            return str(event.dataset.get("StudyInstanceUID", "") or "")
        except Exception:
            return ""

    def _place(self, spool_path: Path, dest: Path) -> None:
        """Move a spooled object into place (same file system: a rename), flushed first when asked."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.config.fsync:
            with open(spool_path, "rb") as fp:
                os.fsync(fp.fileno())
        os.replace(spool_path, dest)

    def _write(self, dest: Path, data: bytes) -> None:
        # hidden `.part` temp names: catch-up removes what a crash left half-written
        with atomic_path(dest, fsync=self.config.fsync, suffix=".part") as tmp:
            tmp.write_bytes(data)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n


def build_receiver(config: AgentConfig, ingestor: Optional[Ingestor],
                   health: Optional[WriteReporter] = None) -> StoreSCP:
    folder = config.cstore_path
    if ingestor is not None:
        ingestor.include(folder)
    return StoreSCP(config.cstore, folder, ingestor, health)
