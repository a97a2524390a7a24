"""Where the agent writes, how much room is left there, and whether the last write worked.

- `WriteHealth`: the writers (ingest's state database writes, quarantine, JSONL event log, DICOM output,
  C-STORE receiver) report each write that failed (an OSError: ENOSPC, EROFS, EIO, ...; an sqlite3 error
  for the state database) and each that succeeded. A target whose
  last write failed is "failing": /readyz is false and `scanside_write_failing{target}` is 1 until its
  next successful write. One ERROR is logged per failure episode (not one per retry), one INFO when
  it ends.
- `folder_space(config)`: the folders the agent writes, grouped by file system (st_dev), with their
  free space: the readiness disk check and `scanside_disk_free_bytes{folder}` read it.

Labels are a fixed, bounded set; folder paths are configuration (never an export folder name) and
appear only in log lines and readiness details.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:  # pragma: no cover
    from scanside.agent.runtime.config import AgentConfig

log = logging.getLogger(__name__)

# write targets (scanside_write_failures_total / scanside_write_failing) and watched folders
# (scanside_disk_free_bytes): fixed label values
TARGETS = ("state", "quarantine", "events", "dicom_output", "received")
FOLDERS = ("state", "quarantine", "events", "dicom_output", "received")
WHAT = {"state": "the state database", "quarantine": "the quarantine copy", "events": "the event log", "dicom_output": "the DICOM output",
        "received": "a received C-STORE object"}


class WriteFailure(BaseModel):
    target: str
    folder: str
    detail: str
    since: float  # time.time() of the first failure of this episode
    attempts: int


def describe(exc: BaseException) -> str:
    """'No space left on device' for an OSError with an errno, else the exception's type and text."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.strerror or os.strerror(exc.errno)
    return f"{type(exc).__name__}: {exc}"


class WriteReporter(Protocol):
    """What a writer needs of the write-health record: report a failed or a successful write."""

    def failed(self, target: str, folder: "os.PathLike[str] | str", error: "BaseException | str",
               consequence: str = "kept and retried") -> None: ...

    def ok(self, target: str) -> None: ...


class WriteHealth:
    """Thread-safe record of the last write outcome per target."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing: dict[str, WriteFailure] = {}
        self.failures_total: dict[str, int] = {t: 0 for t in TARGETS}

    def failed(self, target: str, folder: "os.PathLike[str] | str", error: "BaseException | str",
               consequence: str = "kept and retried") -> None:
        detail = error if isinstance(error, str) else describe(error)
        with self._lock:
            self.failures_total[target] = self.failures_total.get(target, 0) + 1
            current = self._failing.get(target)
            if current is not None:
                current.attempts += 1
                current.detail = detail
                return
            self._failing[target] = WriteFailure(target=target, folder=str(folder), detail=detail, since=time.time(),
                                                 attempts=1)
        log.error("cannot write %s to %s: %s; %s", WHAT.get(target, target), folder, detail, consequence)

    def ok(self, target: str) -> None:
        with self._lock:
            if target not in self._failing:
                return
            ended = self._failing.pop(target)
        log.info("%s is written to %s again (after %d failed attempt(s) over %.0f s)", WHAT.get(target, target),
                 ended.folder, ended.attempts, time.time() - ended.since)

    def failing(self) -> dict[str, WriteFailure]:
        with self._lock:
            return {k: v.model_copy() for k, v in self._failing.items()}

    def is_failing(self, target: str) -> bool:
        with self._lock:
            return target in self._failing


# ------------------------------------------------------------------------------------------ space
@dataclass
class FileSystemSpace:
    folders: dict[str, Path]  # label -> folder on this file system
    free: Optional[int]  # None: could not be read
    error: Optional[str] = None


def written_folders(config: "AgentConfig") -> dict[str, Path]:
    """Label -> folder for every folder the agent writes (the likelihood maps live in the state folder)."""
    out = {"state": Path(config.state.dir), "quarantine": Path(config.quarantine_path),
           "events": Path(config.jsonl_path).parent}
    if config.dicom_output.folder is not None:
        out["dicom_output"] = Path(config.dicom_output.folder)
    if config.cstore.enabled:
        out["received"] = Path(config.cstore_path)
    return out


def _existing(folder: Path) -> Path:
    """The folder, or its nearest existing parent (a folder is created on first write)."""
    p = folder.absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def folder_space(config: "AgentConfig") -> list[FileSystemSpace]:
    """One entry per distinct file system (st_dev) holding a folder the agent writes."""
    by_dev: dict[object, FileSystemSpace] = {}
    for label, folder in written_folders(config).items():
        try:
            where = _existing(folder)
            dev: object = os.stat(where).st_dev
        except OSError as exc:
            by_dev[("error", label)] = FileSystemSpace({label: folder}, None, describe(exc))
            continue
        fs = by_dev.get(dev)
        if fs is None:
            try:
                fs = FileSystemSpace({}, shutil.disk_usage(where).free)
            except OSError as exc:
                fs = FileSystemSpace({}, None, describe(exc))
            by_dev[dev] = fs
        fs.folders[label] = folder
    return list(by_dev.values())


def disk_check(config: "AgentConfig") -> tuple[bool, str]:
    """Readiness: every file system the agent writes to has at least readiness.min_free_disk_bytes free."""
    need = config.readiness.min_free_disk_bytes
    low, fine = [], []
    for fs in folder_space(config):
        names = ", ".join(f"{label} {folder}" for label, folder in fs.folders.items())
        if fs.free is None:
            low.append(f"{names}: unavailable ({fs.error})")
        elif fs.free < need:
            low.append(f"{names}: {fs.free} bytes free, {need} required")
        else:
            fine.append(fs)
    if low:
        return False, "low on space: " + "; ".join(low)
    least = min((fs.free or 0) for fs in fine) if fine else 0
    return True, f"{len(fine)} file system(s), at least {least} bytes free, {need} required"
