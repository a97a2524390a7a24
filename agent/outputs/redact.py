"""No export-folder path in any log record, by default (issue 20, finding 7).

The agent's own messages name a file by its file_ref, but libraries do not: pydicom's warnings end in
"in file <path>", an OSError's text quotes its path, and a traceback repeats both. Folder names on a
scanner's export share carry patient names (DOE^JANE_19700102), so while privacy.include_file_paths is
off every log record is rewritten as it is made: any text from a watched folder's path to the next
quote or line end becomes "<export path>", in the message, its arguments and its formatted traceback.
Python warnings are routed through logging so they pass the same filter. Libraries whose debug lines
dump file names apart from their folder (watchdog's inotify events) are held at INFO meanwhile."""
from __future__ import annotations

import logging
import os
import re
import threading
from typing import Callable, Iterable, Optional

REPLACEMENT = "<export path>"
NAME_DUMPING_LOGGERS = ("watchdog",)  # debug lines carry bare file names, which no prefix rule can catch
_lock = threading.Lock()
_roots: dict[str, int] = {}  # path prefix -> how many agents registered it
_pattern: Optional[re.Pattern[str]] = None
_previous: Optional[Callable[..., logging.LogRecord]] = None
_previous_excepthook: Optional[Callable[..., None]] = None


def _thread_excepthook(args) -> None:  # type: ignore[no-untyped-def]
    """A thread's uncaught exception goes through logging (redacted), not straight to stderr."""
    if args.exc_type is SystemExit:
        return
    logging.getLogger("scanside.agent").error("thread %s stopped on an uncaught exception",
                                     getattr(args.thread, "name", "?"),
                                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def redact_text(text: str) -> str:
    pattern = _pattern
    return pattern.sub(REPLACEMENT, text) if pattern is not None and text else text


def _compile() -> None:
    global _pattern
    roots = sorted(_roots, key=len, reverse=True)
    # the root itself and whatever follows it up to a quote, a line end or the end of the text
    _pattern = re.compile("(?:" + "|".join(re.escape(r) for r in roots) + ")[^'\"\n]*") if roots else None


def _factory(*args, **kwargs) -> logging.LogRecord:  # type: ignore[no-untyped-def]
    assert _previous is not None
    record = _previous(*args, **kwargs)
    if _pattern is None:
        return record
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: leave it to the handler to report
        return record
    record.msg, record.args = redact_text(message), None
    if record.exc_info and not record.exc_text:
        # formatters reuse exc_text when it is set: the traceback is formatted (and redacted) once, here
        record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    return record


def install(folders: Iterable["os.PathLike[str] | str"]) -> Callable[[], None]:
    """Redact these folders (and their resolved paths) from every log record; returns the undo."""
    global _previous, _previous_excepthook
    added = []
    for folder in folders:
        for form in {os.path.abspath(os.fspath(folder)), os.path.realpath(os.fspath(folder))}:
            added.append(form)
    with _lock:
        for form in added:
            _roots[form] = _roots.get(form, 0) + 1
        _compile()
        if _previous is None:
            _previous = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_factory)
            logging.captureWarnings(True)
            _previous_excepthook, threading.excepthook = threading.excepthook, _thread_excepthook
            for name in NAME_DUMPING_LOGGERS:
                if logging.getLogger(name).level == logging.NOTSET:
                    logging.getLogger(name).setLevel(logging.INFO)

    def undo() -> None:
        global _previous, _previous_excepthook
        with _lock:
            for form in added:
                _roots[form] -= 1
                if not _roots[form]:
                    del _roots[form]
            _compile()
            if not _roots and _previous is not None and logging.getLogRecordFactory() is _factory:
                logging.setLogRecordFactory(_previous)
                _previous = None
                logging.captureWarnings(False)
                if _previous_excepthook is not None and threading.excepthook is _thread_excepthook:
                    threading.excepthook = _previous_excepthook
                for name in NAME_DUMPING_LOGGERS:
                    if logging.getLogger(name).level == logging.INFO:
                        logging.getLogger(name).setLevel(logging.NOTSET)

    return undo
