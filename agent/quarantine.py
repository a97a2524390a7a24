"""Bad files are copied (or moved, per config) to a quarantine folder with a reason file beside them.
Nothing is deleted; copy mode leaves a read-only export folder untouched.

The reason file names the file by its `file_ref` only: export folder names can hold patient names, so
the original path is recorded only with privacy.include_file_paths on (as in the events)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from agent.health import WriteHealth


class Quarantine:
    def __init__(self, folder: Path, mode: str = "copy", include_paths: bool = False,
                 health: Optional[WriteHealth] = None):
        self.folder = Path(folder)
        self.mode = mode
        self.include_paths = include_paths
        self.health = health  # set by the agent: a failed copy makes /readyz false until one succeeds

    def put(self, path: str, ref: str, reason: str, detail: str) -> Path:
        target = self.folder / f"{ref}.dcm"
        tmp = self.folder / f".{ref}.dcm.tmp"
        reason_tmp = self.folder / f".{ref}.reason.json.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if os.path.exists(path):
                if self.mode == "move":
                    shutil.move(path, tmp)
                else:
                    shutil.copy2(path, tmp)
                os.replace(tmp, target)
            note = {"file_ref": ref, "reason": reason, "detail": detail,
                    "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": self.mode}
            if self.include_paths:
                note["original_path"] = path
            reason_tmp.write_text(json.dumps(note, indent=2))
            os.replace(reason_tmp, self.folder / f"{ref}.reason.json")
        except OSError as exc:
            # disk full: leave no partial file behind (copy mode: the original is still in the export folder)
            moved_away = self.mode == "move" and not os.path.exists(path)  # the temp copy is the only one left
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
        return target
