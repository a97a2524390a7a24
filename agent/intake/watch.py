"""Watch the export folder: inotify on Linux (close-after-write and rename tell us a file is done),
or polling for SMB/NFS mounts where inotify sees nothing. The handler only enqueues paths."""
from __future__ import annotations

import logging
from pathlib import Path

from watchdog.events import FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from scanside.agent.intake.ingest import Ingestor

log = logging.getLogger(__name__)


class _Handler(FileSystemEventHandler):
    def __init__(self, ingestor: Ingestor):
        self.ingestor = ingestor

    def on_any_event(self, event) -> None:  # type: ignore[no-untyped-def]
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self.ingestor.notify(event.dest_path, closed=True)
        elif isinstance(event, FileClosedEvent):
            self.ingestor.notify(event.src_path, closed=True)
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            self.ingestor.notify(event.src_path, closed=False)


class FolderWatcher:
    def __init__(self, folder: Path, ingestor: Ingestor, recursive: bool = True, polling: bool = False,
                 poll_interval_s: float = 1.0):
        self.folder = Path(folder)
        self.observer = PollingObserver(timeout=poll_interval_s) if polling else Observer()
        self.observer.schedule(_Handler(ingestor), str(self.folder), recursive=recursive)
        self.polling = polling

    name = "watcher"

    def start(self) -> "FolderWatcher":
        self.observer.start()
        log.info("watching %s (%s)", self.folder, "polling" if self.polling else "inotify")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.observer.stop()
        if self.observer.is_alive():
            self.observer.join(timeout=timeout)

    def alive(self) -> bool:
        return self.observer.is_alive()
