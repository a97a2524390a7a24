"""`scanside` command line."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from scanside.agent.runtime.config import AgentConfig, ConfigError, load_config

# exit codes (README "Exit codes"): 0 done; 1 an unexpected error; 2 invalid configuration or usage;
# 3 the agent cannot start here (watch folder, state folder, port); `scan`: 4 no image could be read
# (every file quarantined, or none found), 5 a critical protocol deviation was found
EXIT_CONFIG, EXIT_START, EXIT_NO_IMAGES, EXIT_CRITICAL = 2, 3, 4, 5
EXIT_USAGE = 2  # a command that cannot be used, as argparse exits on a usage error


class StartError(Exception):
    """The agent cannot start in this environment: one line for the operator, no traceback."""


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
    except CommandUnavailable as exc:
        print(f"scanside: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quiet:
        from scanside.agent.service.progress import set_quiet

        set_quiet(True)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from scanside.agent.state.database import StateError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"scanside: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StartError as exc:
        print(f"scanside: cannot start: {exc}", file=sys.stderr)
        return EXIT_START
    except StateError as exc:  # corrupt, locked, read-only state database: the message names the file
        print(f"scanside: cannot start: {exc}", file=sys.stderr)
        return EXIT_START


# Subcommands that live in other modules: (command, module, one-line help). Only the module of the command
# being run is imported, so `scanside run` loads neither the simulator, pydicom nor the training code; the
# others appear in `scanside --help` as placeholders. A module that fails to import is an error naming it.
LAZY_COMMANDS = (
    ("simulate", "scanside.simulator.cli", "write a simulated prostate MRI exam as vendor DICOM"),
    ("models", "scanside.agent.cli.models", "list, inspect, verify and import models"),
    ("demo", "scanside.agent.cli.demo", "stream a simulated exam into a watched folder and run the agent on it"),
    ("profiles", "scanside.agent.protocol.profiles", "protocol profiles: list, show, check a site profile"),
    ("convert", "scanside.agent.cli.convert", "INT8 calibration, TensorRT plans, parity reports"),
)
_MAIN_OPTIONS_WITH_VALUE = ("--log-level",)


class CommandUnavailable(RuntimeError):
    """A subcommand whose module cannot be imported (a missing optional dependency, a broken install)."""


def chosen_command(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named on a command line (the first word that is no main option nor its value)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _MAIN_OPTIONS_WITH_VALUE:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def load_command(module: str) -> Any:
    """Import a subcommand's module; CommandUnavailable (naming the module and the cause) when it fails."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CommandUnavailable(f"this command is unavailable: {module} cannot be imported ({exc})") from exc


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The `scanside` parser. ``argv``: the command line it will parse, which picks the one subcommand
    module to import (None: every subcommand's module is imported)."""
    parser = argparse.ArgumentParser(prog="scanside", description="Scanner-side inference agent for MRI")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress on stderr from the long commands (evaluate, train, calibrate, parity, import-taps)")
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent in the foreground (one JSON line per event on stdout)")
    run.add_argument("--watch", type=Path, help="the scanner's DICOM export folder")
    run.add_argument("--config", type=Path, help="TOML configuration file")
    run.add_argument("--state-dir", type=Path, help="state folder (database, quarantine, event log)")
    run.add_argument("--api-host", help="HTTP API / console / metrics address (default 127.0.0.1; others need [api] token)")
    run.add_argument("--api-port", type=int, help="HTTP API port (default 8686; 0: any free port)")
    run.add_argument("--no-api", action="store_true", help="do not serve the HTTP API, console and /metrics")
    run.add_argument("--create-watch", action="store_true",
                     help="create the watch folder when it does not exist (default: refuse, a mistyped path is more likely)")
    run.set_defaults(func=cmd_run)

    scan = sub.add_parser("scan", help="ingest a folder once and report its series",
                          description="Exit status: 0 done; 2 usage or configuration; 4 no image could be read "
                                      "(every file quarantined, or none found); 5 a critical protocol deviation.")
    scan.add_argument("folder", type=Path)
    scan.add_argument("--json", action="store_true", help="print JSON")
    scan.add_argument("--config", type=Path)
    scan.set_defaults(func=cmd_scan)

    conf = sub.add_parser("config", help="write an example site configuration, or check one")
    conf_sub = conf.add_subparsers(dest="config_cmd", metavar="{init,check}")
    conf_sub.required = True
    init = conf_sub.add_parser("init", help="write a commented example of every section and key (same as examples/site.toml)")
    init.add_argument("path", nargs="?", type=Path, help="file to write (default: standard output)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    check = conf_sub.add_parser("check", help="load a configuration (file + SCANSIDE_* environment) and report the first problem")
    check.add_argument("--config", type=Path)
    conf.set_defaults(func=cmd_config)

    state = sub.add_parser("state", help="repair the state database")
    state_sub = state.add_subparsers(dest="state_cmd", metavar="{rebuild}")
    state_sub.required = True
    rebuild = state_sub.add_parser("rebuild", help="rebuild the exam read model (latest series and exam state) from the "
                                                   "event log, in one transaction; safe while the agent runs")
    rebuild.add_argument("--config", type=Path)
    rebuild.add_argument("--state-dir", type=Path, help="state folder (default: the configuration's)")
    state.set_defaults(func=cmd_state)

    schema = sub.add_parser("schema", help="print a published JSON Schema")
    schema.add_argument("what", choices=["events", "config", "openapi"])
    schema.set_defaults(func=cmd_schema)

    chosen = None if argv is None else chosen_command(argv)
    for name, module, summary in LAZY_COMMANDS:
        if argv is None or name == chosen:
            load_command(module).add_parser(sub)
        else:  # listed in --help; never run (the command line names another command)
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from scanside.agent.service.daemon import Agent

    config = load_config(args.config, **{"watch.folder": args.watch, "state.dir": args.state_dir,
                                         "api.host": args.api_host, "api.port": args.api_port,
                                         "api.enabled": False if args.no_api else None})
    if config.watch.folder is None:
        raise ConfigError("invalid configuration:\n  watch.folder: required (use --watch DIR or [watch] folder)")
    if config.api.enabled is None:
        config.api.enabled = True  # `scanside run` serves the API unless told not to
    preflight(config, create_watch=args.create_watch)
    from scanside.agent.runtime.malloc import limit_malloc_arenas

    limit_malloc_arenas()  # before the agent's threads exist: see agent/runtime/malloc.py
    try:
        agent = Agent(config)
    except (OSError, RuntimeError) as exc:  # RuntimeError: the API refuses its settings (no token off loopback)
        raise StartError(_start_reason(exc)) from exc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent.start()
    except (OSError, RuntimeError) as exc:  # the API or C-STORE port was taken meanwhile
        raise StartError(_start_reason(exc)) from exc
    if agent.api_url:
        print(f"scanside: console {agent.api_url}/console  metrics {agent.api_url}/metrics", file=sys.stderr, flush=True)
    ready = ready_line(agent)
    logging.getLogger("scanside.agent").info(ready)
    # always on stderr (the default log level is warning): the operator's sign that start-up is over
    print(f"scanside: {ready}", file=sys.stderr, flush=True)
    # systemd (Type=notify): READY=1 now that everything is loaded; watchdog pings while healthy
    from scanside.agent.service.systemd import Watchdog, notifier

    sd = notifier()
    sd.ready(status="running" + (f"; C-STORE port {agent.receiver.address[1]}" if agent.receiver else ""))
    watchdog = Watchdog(sd, agent.healthy).start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        sd.stopping()
        watchdog.stop()
        agent.stop()
    return 0


def _start_reason(exc: Exception) -> str:
    return _os_reason(exc) if isinstance(exc, OSError) else str(exc)


def _os_reason(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc.__class__.__name__}:{where}" if where else f"{exc.strerror or exc}"


def _writable_dir(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise StartError(f"{what} {folder} is a file, not a folder") from exc
    except OSError as exc:
        raise StartError(f"{what} {folder} cannot be created ({exc.strerror})") from exc
    if not folder.is_dir():
        raise StartError(f"{what} {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise StartError(f"{what} {folder} is not writable ({exc.strerror}); the agent runs as uid {os.getuid()}") from exc


def _port_free(host: str, port: int, what: str, option: str) -> None:
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and pynetdicom bind
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartError(f"{what} port {host}:{port} is not available ({exc.strerror}): another agent or program "
                             f"uses it; choose another with {option}") from exc


def preflight(config: AgentConfig, create_watch: bool = False) -> None:
    """What `scanside run` checks before loading anything: each problem in one line (StartError)."""
    watch = Path(config.watch.folder)  # type: ignore[arg-type]
    if watch.exists() and not watch.is_dir():
        raise StartError(f"watch folder {watch} is a file, not a folder")
    if not watch.exists():
        if not create_watch:
            raise StartError(f"watch folder {watch} does not exist (mistyped? --create-watch creates it)")
        try:
            watch.mkdir(parents=True)
        except OSError as exc:
            raise StartError(f"watch folder {watch} cannot be created ({exc.strerror})") from exc
    if not os.access(watch, os.R_OK | os.X_OK):
        raise StartError(f"watch folder {watch} is not readable by uid {os.getuid()}")
    _writable_dir(Path(config.state.dir), "state folder")
    if config.api.enabled:
        _port_free(config.api.host, config.api.port, "API", "--api-port or [api] port")
    if config.cstore.enabled:
        _port_free(config.cstore.host, config.cstore.port, "C-STORE", "[cstore] port")


def ready_line(agent) -> str:  # type: ignore[no-untyped-def]
    cfg = agent.config
    how = f"polling every {cfg.watch.poll_interval_s:g} s" if cfg.watch.polling else "inotify"
    parts = [f"watching {cfg.watch.folder} ({how})", f"state {cfg.state.dir}"]
    if agent.receiver is not None:
        host, port = agent.receiver.address
        parts.append(f"C-STORE {cfg.cstore.ae_title}@{host}:{port}")
    parts.append(f"API {agent.api_url}" if agent.api_url else "no API")
    return ", ".join(parts) + ", ready"


def cmd_config(args: argparse.Namespace) -> int:
    from scanside.agent.runtime.siteconfig import example_site_toml

    if args.config_cmd == "init":
        text = example_site_toml()
        if args.path is None:
            sys.stdout.write(text)
            return 0
        if args.path.exists() and not args.force:
            print(f"scanside: {args.path} exists (--force overwrites it)", file=sys.stderr)
            return EXIT_CONFIG
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(text, encoding="utf-8")
        print(f"scanside: wrote {args.path}: every key is commented out; uncomment what the site needs, then "
              f"`scanside config check --config {args.path}`", file=sys.stderr)
        return 0
    config = load_config(args.config)
    sources = f"{args.config} + SCANSIDE_* environment" if args.config else "defaults + SCANSIDE_* environment"
    print(f"configuration ok ({sources}): watch {config.watch.folder or '(unset: --watch or [watch] folder)'}, "
          f"state {config.state.dir}, protocol {config.protocol.profile}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from scanside.agent.intake.ingest import Ingestor
    from scanside.agent.intake.pipeline import Pipeline
    from scanside.agent.state.database import StateStore

    if not args.folder.is_dir():
        print(f"scanside: not a folder: {args.folder}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="scanside-scan-") as tmp:
        config = load_config(args.config, **{"state.dir": tmp})
        # one shot: files are complete, so nothing to wait for and nothing to retry
        config.watch.settle_s = 0
        config.ingest.retry_delays_s = []
        config.ingest.quarantine_after_s = 0
        store = StateStore(config.db_path)
        pipeline = Pipeline(config, store)
        ingestor = Ingestor(config, pipeline)
        queued = ingestor.catch_up(args.folder)
        with _backlog_progress(ingestor, queued):
            ingestor.drain(timeout=3600)
        pipeline.complete_all()
        pipeline.end_exams()  # one shot: the folder is the whole exam
        report = scan_report(store)
        store.close()
    code = scan_exit_code(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from scanside.agent.protocol.wording import display_name, plain

        for s in report["series"]:
            name = display_name(s["label"], s["b_values"], s.get("other_kind"))
            b = f" b={','.join(f'{x:g}' for x in s['b_values'])}" if len(s["b_values"] or ()) > 1 else ""
            print(f"{s['series_number'] or '-':>4} {name:<12}{b:<14} {s['plane'] or '':<9} {s['n_images']:>4} img  "
                  f"{s['series_description']!r}: {plain(s['reason'])}")
        for q in report["quarantined"]:
            print(f"quarantined {q['path']}: {q['reason']}")
        for d in report.get("deviations", []):
            print(f"{d['severity'].upper():<8} {d['code']}: {d['message']}")
        if code == EXIT_NO_IMAGES:
            print(f"scanside: no image could be read in {args.folder}", file=sys.stderr)
        elif code == EXIT_CRITICAL:
            print("scanside: critical protocol deviation(s) found", file=sys.stderr)
    return code


@contextlib.contextmanager
def _backlog_progress(ingestor, total: int):  # type: ignore[no-untyped-def]
    """Files read so far, from the ingest backlog, while the caller drains it (scanside.agent.service.progress)."""
    from scanside.agent.service.progress import Every, progress

    with progress(total=total, desc="reading files", unit="file") as bar:
        def advance() -> None:
            bar.update(max(0, total - ingestor.backlog - bar.n))

        with Every(0.5, advance):
            yield
        advance()


def scan_exit_code(report: dict) -> int:
    if not report["series"]:
        return EXIT_NO_IMAGES
    if any(d.get("severity") == "critical" for d in report.get("deviations", [])):
        return EXIT_CRITICAL
    return 0


def scan_report(store) -> dict:  # type: ignore[no-untyped-def]
    """Every series (latest revision) and protocol deviation of the scan, from the exam read model."""
    series = sorted((s.model_dump(mode="json") for row in store.read_model.series_rows() if (s := row.summary) is not None),
                    key=lambda s: (s["series_number"] or 0, s["part"]))
    quarantined = [{"path": r["path"], "reason": r["reason"]} for r in store.quarantined()]
    deviations = [ev.model_dump(mode="json", exclude={"seq"}) for ev in store.read_model.findings(None, ("protocol_deviation",))]
    return {"series": series, "quarantined": quarantined, "deviations": deviations}


def cmd_state(args: argparse.Namespace) -> int:
    from scanside.agent.state.database import StateStore

    config = load_config(args.config, **{"state.dir": args.state_dir})
    if not config.db_path.is_file():
        print(f"scanside: no state database at {config.db_path}", file=sys.stderr)
        return EXIT_CONFIG
    store = StateStore(config.db_path)
    try:
        n = store.rebuild_read_model()
        exams = len(store.read_model.exams())
    finally:
        store.close()
    print(f"rebuilt the exam read model from {n} event(s): {exams} exam(s)")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from scanside.agent.schema.events import event_json_schema

    if args.what == "openapi":
        from scanside.agent.service.api import openapi_schema

        print(json.dumps(openapi_schema(), indent=2))
        return 0
    schema = event_json_schema() if args.what == "events" else AgentConfig.model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
