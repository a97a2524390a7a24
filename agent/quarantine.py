"""Bad files are copied (or moved, per config) to a quarantine folder with a reason file beside them.
Nothing is deleted; copy mode leaves a read-only export folder untouched."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path


class Quarantine:
    def __init__(self, folder: Path, mode: str = "copy"):
        self.folder = Path(folder)
        self.mode = mode

    def put(self, path: str, ref: str, reason: str, detail: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{ref}.dcm"
        tmp = self.folder / f".{ref}.dcm.tmp"
        reason_tmp = self.folder / f".{ref}.reason.json.tmp"
        try:
            if os.path.exists(path):
                if self.mode == "move":
                    shutil.move(path, tmp)
                else:
                    shutil.copy2(path, tmp)
                os.replace(tmp, target)
            note = {"file_ref": ref, "original_path": path, "reason": reason, "detail": detail,
                    "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": self.mode}
            reason_tmp.write_text(json.dumps(note, indent=2))
            os.replace(reason_tmp, self.folder / f"{ref}.reason.json")
        except OSError:
            # disk full: leave no partial file behind (copy mode: the original is still in the export folder)
            for leftover in (reason_tmp, *(() if self.mode == "move" else (tmp, target))):
                try:
                    leftover.unlink()
                except OSError:
                    pass
            raise
        return target
