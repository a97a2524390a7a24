"""Write-then-rename: a reader (the watcher, a PACS pickup, a restart) never sees a partial file."""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(dest: Path, *, fsync: bool = True, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a hidden temp path beside `dest`; when the block succeeds, flush the file to disk (optional)
    and rename it over `dest`; when it fails, remove the temp file and re-raise."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}-{threading.get_ident()}{suffix}"
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fp:
                os.fsync(fp.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
