"""Bad files are copied (or moved, per config) to a quarantine folder with a reason file beside them.
Nothing is deleted; copy mode leaves a read-only export folder untouched.

The reason file names the file by its `file_ref` only: export folder names can hold patient names, so
the original path is recorded only with privacy.include_file_paths on (as in the events).

Only a regular file no larger than `max_copy_bytes` and not sparse is copied, opened without blocking
and without following a symlink: a FIFO, a device (/dev/zero behind a link), a sparse 1 GiB file or an
unreadable one gets its reason file only ("not copied: ..."), and the quarantine folder, which shares
its disk with the state database and the event log, never fills from one entry. A source that cannot be
read is the file's problem, not the quarantine folder's: only a failed write marks the folder failing."""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Optional

from scanside.agent.runtime.health import WriteHealth

DEFAULT_MAX_COPY_BYTES = 600 * 1024**2  # the default largest image file (512 MiB of pixels + header slack), rounded up
COPY_CHUNK = 1024 * 1024


class _NotCopied(Exception):
    """The source is not copied (its reason file is still written)."""


class Quarantine:
    def __init__(self, folder: Path, mode: str = "copy", include_paths: bool = False,
                 health: Optional[WriteHealth] = None, max_copy_bytes: int = DEFAULT_MAX_COPY_BYTES):
        self.folder = Path(folder)
        self.mode = mode
        self.include_paths = include_paths
        self.health = health  # set by the agent: a failed copy makes /readyz false until one succeeds
        self.max_copy_bytes = max_copy_bytes
        self.last_refusal: Optional[str] = None  # why the last put() made no copy

    def put(self, path: str, ref: str, reason: str, detail: str) -> Optional[Path]:
        """Quarantine one file; returns the copy, or None when only its reason file was written."""
        target = self.folder / f"{ref}.dcm"
        tmp = self.folder / f".{ref}.dcm.tmp"
        reason_tmp = self.folder / f".{ref}.reason.json.tmp"
        self.last_refusal = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                self._copy(path, tmp)
                os.replace(tmp, target)
            except _NotCopied as why:
                self.last_refusal = str(why)
                if tmp.exists():
                    tmp.unlink()
            note = {"file_ref": ref, "reason": reason, "detail": detail,
                    "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": self.mode,
                    "copied": self.last_refusal is None}
            if self.last_refusal is not None:
                note["not_copied"] = self.last_refusal
            if self.include_paths:
                note["original_path"] = os.fsencode(path).decode("utf-8", "backslashreplace")
            reason_tmp.write_text(json.dumps(note, indent=2))
            os.replace(reason_tmp, self.folder / f"{ref}.reason.json")
        except OSError as exc:
            # disk full: leave no partial file behind (copy mode: the original is still in the export folder)
            moved_away = self.mode == "move" and not os.path.lexists(path)  # the temp copy is the only one left
            for leftover in (reason_tmp, *(() if moved_away else (tmp, target))):
                try:
                    leftover.unlink()
                except OSError:
                    pass
            if self.health is not None:
                kept = f"the file is kept as {tmp.name}" if moved_away else "the file stays in the export folder"
                self.health.failed("quarantine", self.folder, exc, consequence=f"{kept}, its event is recorded")
            raise
        if self.health is not None:
            self.health.ok("quarantine")
        return None if self.last_refusal is not None else target

    def _copy(self, path: str, tmp: Path) -> None:
        """Copy (or move) a regular, bounded, non-sparse source to tmp; _NotCopied when it is not one.
        Errors reading the source are _NotCopied; errors writing tmp are OSError (the folder's)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise _NotCopied("the file is gone") from exc
        except OSError as exc:  # ELOOP: a symlink (never followed here), EACCES: unreadable
            raise _NotCopied(exc.strerror or type(exc).__name__) from exc
        with os.fdopen(fd, "rb") as src:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _NotCopied("not a regular file")
            if st.st_size > self.max_copy_bytes:
                raise _NotCopied(f"{st.st_size} bytes, more than ingest.quarantine_max_copy_bytes ({self.max_copy_bytes})")
            # fewer blocks than half its size: holes (sparse) that a copy would fill with real zeros
            if st.st_size > COPY_CHUNK and st.st_blocks * 512 < st.st_size // 2:
                raise _NotCopied(f"a sparse file ({st.st_size} bytes, {st.st_blocks * 512} on disk)")
            if self.mode == "move":
                src.close()
                shutil.move(path, tmp)
                return
            copied = 0
            with open(tmp, "wb") as dst:
                while copied <= st.st_size:  # a file still growing stops at the size it had
                    try:
                        chunk = src.read(min(COPY_CHUNK, st.st_size + 1 - copied))
                    except OSError as exc:
                        raise _NotCopied(exc.strerror or type(exc).__name__) from exc
                    if not chunk:
                        break
                    dst.write(chunk)
                    copied += len(chunk)
            shutil.copystat(path, tmp, follow_symlinks=False)
