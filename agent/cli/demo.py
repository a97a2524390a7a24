"""`scanside demo` (what `make run` runs): the agent on its embedded default, watching a folder into
which the virtual scanner streams a prostate exam in real time. Events print as they happen; the
JSON event log and the state database stay under the work folder."""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from scanside.agent.runtime.config import load_config
from scanside.agent.schema.events import Event
from scanside.agent.runtime.lifecycle import WorkerThread
from scanside.agent.protocol.wording import display_name, plain

ZONES = {"PZ": "peripheral zone", "TZ": "transition zone"}
RECOMMENDATIONS = {"DCE_ADVISED": "DCE advised", "BPMRI_SUFFICIENT": "bpMRI sufficient"}


def add_parser(subparsers) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("demo", help="stream a simulated exam into a watched folder and run the agent on it")
    p.add_argument("--vendor", default="siemens", choices=["siemens", "siemens-xa", "ge", "philips"])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--fault", action="append", default=[], help="inject a protocol fault (see scanside simulate --help)")
    p.add_argument("--rate", type=float, default=60.0, help="files per second written by the virtual scanner")
    p.add_argument("--workdir", type=Path, default=Path("var/demo"), help="export folder, state and event log go here (emptied first)")
    p.add_argument("--exit-when-done", action="store_true", help="stop once every series of the exam has completed")
    p.add_argument("--api-port", type=int, default=8686, help="console, HTTP API and /metrics port on 127.0.0.1 (taken: any free port)")
    p.add_argument("--no-api", action="store_true", help="do not serve the console, HTTP API and /metrics")
    p.set_defaults(func=run)
    return p


def describe(event: Event) -> str:
    if event.type == "series_completed":
        s = event.series
        b = f" b={','.join(f'{x:g}' for x in s.b_values)}" if len(s.b_values) > 1 else ""
        done = "complete" if s.complete else f"INCOMPLETE {s.n_images}/{s.expected_images}"
        return (f"series {s.series_number or '-':>4} {display_name(s.label, s.b_values, s.other_kind):<12}{b:<16}"
                f"{s.plane or '':<9}{s.n_images:>4} images {done:<9} '{s.series_description}': {plain(s.reason)}")
    if event.type == "series_reopened":
        return f"series reopened: {event.late_images} late image(s), revision {event.revision} will follow"
    if event.type == "file_quarantined":
        return f"QUARANTINED file {event.file_ref}: {event.reason} ({event.detail})"
    if event.type == "protocol_deviation":
        where = f" series {event.series_number}" if event.series_number is not None else ""
        return f"PROTOCOL {event.severity.upper()} {event.code}{where}: {event.message}"
    if event.type == "series_classified":
        verdict = "agrees" if event.agree else f"DISAGREES (header says {display_name(event.header_label)})"
        why = " by its diffusion physics" if event.diffusion and event.image_label != "uncertain" else ""
        return (f"series {event.series_number or '-':>4} image model says {display_name(event.image_label)} "
                f"({event.image_confidence:.0%}){why}: {verdict}")
    if event.type == "label_mismatch":
        return f"LABEL MISMATCH series {event.series_number}: {event.message}"
    if event.type == "triage_result":
        # sizes and zone in words; the coordinates stay in the JSON event and the SR
        lesions = "; ".join(f"lesion {f.long_axis_mm:.0f} x {f.short_axis_mm:.0f} mm" + (f" in the {ZONES.get(f.zone, f.zone)}" if f.zone else "")
                            + f", likelihood {f.likelihood:.2f}" for f in event.findings) or "no lesion found"
        gland = f"; gland {event.gland_volume_ml:.0f} ml" if event.gland_volume_ml else ""
        return (f"TRIAGE csPCa probability {event.probability:.2f} -> {RECOMMENDATIONS.get(event.recommendation, event.recommendation)} ({lesions}{gland}); "
                f"decision support, reference model trained on phantoms")
    if event.type == "alert_acknowledged":
        return f"alert {event.alert_id} acknowledged"
    if event.type == "exam_completed":
        return (f"exam completed ({event.reason.replace('_', ' ')}): {event.n_series} series, "
                f"{event.n_deviations} protocol deviation(s)")
    return event.model_dump_json()


def series_counts(completed_ids: set[str], n_series: int, n_parts: int) -> str:
    """Counted as the exam_completed line counts them: scanner series (a multi-b DWI series is one
    series of several labelled parts, `uid#b1400`), with the parts after."""
    done = len({sid.split("#", 1)[0] for sid in completed_ids})
    return (f"{done}/{n_series} series completed ({len(completed_ids)}/{n_parts} labelled parts: "
            f"multi-b DWI split per b-value)")


def start_api(agent) -> None:  # type: ignore[no-untyped-def]
    try:
        agent.start_api()
    except RuntimeError as exc:  # the port is taken (another agent?): any free port will do for a demo
        print(f"scanside demo: {exc}; using any free port", flush=True)
        agent.config.api.port = 0
        agent.start_api()
    print(f"console  {agent.api_url}/console\nmetrics  {agent.api_url}/metrics\nAPI      {agent.api_url}/v1/exams",
          flush=True)


def print_metrics(agent) -> None:  # type: ignore[no-untyped-def]
    """A few lines of what Prometheus would scrape from /metrics now."""
    from prometheus_client.parser import text_string_to_metric_families

    text = agent.metrics.exposition().decode()
    wanted = ("scanside_files", "scanside_files_quarantined", "scanside_series_completed", "scanside_alerts",
              "scanside_queue_depth", "scanside_outbox_depth")
    print(f"metrics ({agent.api_url}/metrics):", flush=True)
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created") or (sample.labels and sample.value == 0):
                continue  # every known label set is exposed at 0 (scanside.agent.service.metrics): show what happened
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            print(f"  {sample.name}{'{' + labels + '}' if labels else ''} {sample.value:g}", flush=True)


def run(args: argparse.Namespace) -> int:
    from scanside.agent.service.daemon import Agent
    from scanside.simulator.scanner import simulate_exam, stream_exam

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    export, state = work / "export", work / "state"
    config = load_config(**{"watch.folder": str(export), "state.dir": str(state), "output.stdout": False,
                            "series.quiet_period_s": 3.0, "watch.settle_s": 0.3, "ingest.quarantine_after_s": 3.0,
                            # a demo exam has no pauses between series: end it 5 s after the last one
                            "protocol.exam_quiet_period_s": 5.0,
                            # simulated exams: INT8 variants whose parity is simulated-only may run
                            "engines.parity_data": "any",
                            # a phantom exam: the zonal model's figures are measured on phantoms; TAPS (real
                            # patients, chosen by `auto` on real exams) finds no gland in a phantom
                            "gland.model": "prostate-zones-reference",
                            "api.enabled": False, "api.port": args.api_port})
    print(f"scanside demo: rendering a {args.vendor} prostate exam (seed {args.seed}"
          f"{', faults ' + ', '.join(args.fault) if args.fault else ''}) ...", flush=True)
    staging = Path(tempfile.mkdtemp(prefix="scanside-demo-"))
    try:
        truth = simulate_exam(args.vendor, staging, args.seed, faults=args.fault)
        expected_parts = sum(len(s.parts) for s in truth.series)
        completed: set[str] = set()
        done = threading.Event()

        def on_event(event: Event) -> None:
            print(describe(event), flush=True)
            if event.type == "series_completed":
                completed.add(event.series.series_id)
            if event.type == "exam_completed":
                done.set()

        agent = Agent(config)
        agent.subscribe(on_event)
        agent.start()
        if not args.no_api:
            start_api(agent)
        n_files = sum(s.n_files for s in truth.series)
        print(f"agent watching {export}; the virtual scanner streams {n_files} files at {args.rate:g}/s", flush=True)
        streamer = WorkerThread("scanside-demo-scanner", lambda stop: stream_exam(
            staging, export, rate=args.rate, stop_event=stop, ground_truth=truth))
        stop = streamer.stopping  # Ctrl-C ends the stream and the wait below
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: (stop.set(), done.set()))
        started = time.monotonic()
        streamer.start()
        done.wait(timeout=n_files / max(args.rate, 1) + 120)
        # the image models run behind ingestion: let them finish the exam before the summary
        deadline = time.monotonic() + 120
        while agent.store.cursor("analysis") < agent.store.last_event_seq() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.3)
        print(f"\n{series_counts(completed, len(truth.series), expected_parts)} in {time.monotonic() - started:.1f} s; "
              f"files: {agent.store.file_counts()}; event log {config.jsonl_path}", flush=True)
        if agent.api_url:
            print_metrics(agent)
        if not args.exit_when_done and not stop.is_set():
            print("agent still running (Ctrl-C to stop)", flush=True)
            stop.wait()
        streamer.stop(timeout=5)
        agent.stop()
        return 0 if len(completed) >= expected_parts else 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    from scanside.agent.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
