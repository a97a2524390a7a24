"""`scanside` command line."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

from agent.config import AgentConfig, ConfigError, load_config


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from agent.state import StateError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"scanside: {exc}", file=sys.stderr)
        return 2
    except StateError as exc:  # corrupt, locked, read-only state database: the message names the file
        print(f"scanside: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scanside", description="Scanner-side inference agent for MRI")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent in the foreground (one JSON line per event on stdout)")
    run.add_argument("--watch", type=Path, help="the scanner's DICOM export folder")
    run.add_argument("--config", type=Path, help="TOML configuration file")
    run.add_argument("--state-dir", type=Path, help="state folder (database, quarantine, event log)")
    run.add_argument("--api-host", help="HTTP API / console / metrics address (default 127.0.0.1; others need [api] token)")
    run.add_argument("--api-port", type=int, help="HTTP API port (default 8686; 0: any free port)")
    run.add_argument("--no-api", action="store_true", help="do not serve the HTTP API, console and /metrics")
    run.set_defaults(func=cmd_run)

    scan = sub.add_parser("scan", help="ingest a folder once and report its series")
    scan.add_argument("folder", type=Path)
    scan.add_argument("--json", action="store_true", help="print JSON")
    scan.add_argument("--config", type=Path)
    scan.set_defaults(func=cmd_scan)

    schema = sub.add_parser("schema", help="print a published JSON Schema")
    schema.add_argument("what", choices=["events", "config", "openapi"])
    schema.set_defaults(func=cmd_schema)

    for module in ("simulator.cli", "engines.cli", "agent.demo", "agent.profiles", "converters.cli"):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ImportError as exc:  # optional parts still being built must not break the CLI
            logging.getLogger(__name__).debug("%s unavailable: %s", module, exc)
            continue
        mod.add_parser(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import Agent

    config = load_config(args.config, **{"watch.folder": args.watch, "state.dir": args.state_dir,
                                         "api.host": args.api_host, "api.port": args.api_port,
                                         "api.enabled": False if args.no_api else None})
    if config.watch.folder is None:
        raise ConfigError("invalid configuration:\n  watch.folder: required (use --watch DIR or [watch] folder)")
    if config.api.enabled is None:
        config.api.enabled = True  # `scanside run` serves the API unless told not to
    from agent.malloc import limit_malloc_arenas

    limit_malloc_arenas()  # before the agent's threads exist: see agent/malloc.py
    agent = Agent(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    if agent.api_url:
        print(f"scanside: console {agent.api_url}/console  metrics {agent.api_url}/metrics", file=sys.stderr, flush=True)
    # systemd (Type=notify): READY=1 now that everything is loaded; watchdog pings while healthy
    from agent.systemd import Watchdog, notifier

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


def cmd_scan(args: argparse.Namespace) -> int:
    from agent.ingest import Ingestor
    from agent.pipeline import Pipeline
    from agent.state import StateStore

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
        ingestor.catch_up(args.folder)
        ingestor.drain(timeout=3600)
        pipeline.complete_all()
        pipeline.end_exams()  # one shot: the folder is the whole exam
        report = scan_report(store)
        store.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for s in report["series"]:
            b = f" b={','.join(f'{x:g}' for x in s['b_values'])}" if s["b_values"] else ""
            print(f"{s['series_number'] or '-':>4} {s['label']:<9}{b:<14} {s['plane'] or '':<9} {s['n_images']:>4} img  "
                  f"{s['series_description']!r}: {s['reason']}")
        for q in report["quarantined"]:
            print(f"quarantined {q['path']}: {q['reason']}")
        for d in report.get("deviations", []):
            print(f"{d['severity'].upper():<8} {d['code']}: {d['message']}")
    return 0


def scan_report(store) -> dict:  # type: ignore[no-untyped-def]
    latest: dict[str, dict] = {}
    for ev in store.events_after(0, limit=1_000_000):
        if ev.type == "series_completed":
            latest[ev.series.series_id] = ev.series.model_dump(mode="json")
    series = sorted(latest.values(), key=lambda s: (s["series_number"] or 0, s["part"]))
    quarantined = [{"path": r["path"], "reason": r["reason"]} for r in store.quarantined()]
    deviations = [ev.model_dump(mode="json", exclude={"seq"}) for ev in store.events_after(0, limit=1_000_000)
                  if ev.type == "protocol_deviation"]
    return {"series": series, "quarantined": quarantined, "deviations": deviations}


def cmd_schema(args: argparse.Namespace) -> int:
    from agent.events import event_json_schema

    if args.what == "openapi":
        from agent.api import openapi_schema

        print(json.dumps(openapi_schema(), indent=2))
        return 0
    schema = event_json_schema() if args.what == "events" else AgentConfig.model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
