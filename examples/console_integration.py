"""A scanner-console integration, two ways (see docs/embedding.md):

1. in process: the console software starts the agent itself and subscribes to its events;
2. over HTTP: the console follows /v1/events (server-sent events, resumable with Last-Event-ID),
   reads the exam checklist from /v1/exams/current and acknowledges alerts with POST /v1/alerts/{id}/ack.

Try it against the virtual scanner (renders and streams a prostate exam with a protocol fault):

    python examples/console_integration.py --simulate --fault b1000_high

or against a running agent (`scanside run --watch /export`):

    python examples/console_integration.py --url http://127.0.0.1:8686 [--token TOKEN]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

import httpx


# ------------------------------------------------------------------------------------------ over HTTP
class AgentClient:
    """A small client for the agent's HTTP API."""

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 10.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def current_exam(self) -> Optional[dict]:
        return self.http.get("/v1/exams/current").raise_for_status().json()

    def open_alerts(self) -> list[dict]:
        return self.http.get("/v1/alerts", params={"open": "true"}).raise_for_status().json()

    def acknowledge(self, alert_id: str, by: Optional[str] = None) -> dict:
        return self.http.post(f"/v1/alerts/{alert_id}/ack", json={"by": by}).raise_for_status().json()

    def exam_done(self, study_uid: str) -> dict:
        return self.http.post(f"/v1/exams/{study_uid}/done").raise_for_status().json()

    def events(self, last_event_id: Optional[int] = None, stop: Optional[threading.Event] = None) -> Iterator[dict]:
        """Follow /v1/events; on a dropped connection, reconnect and resume after the last event seen."""
        stop = stop or threading.Event()
        while not stop.is_set():
            headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
            try:
                with self.http.stream("GET", "/v1/events", headers=headers, timeout=httpx.Timeout(10, read=60)) as resp:
                    resp.raise_for_status()
                    for event in parse_sse(resp.iter_lines()):
                        last_event_id = int(event["id"])
                        yield {"seq": last_event_id, "type": event["event"], **json.loads(event["data"])}
                        if stop.is_set():
                            return
            except httpx.TransportError:
                if stop.wait(2.0):  # the agent restarts, or the network blips: try again shortly
                    return


def parse_sse(lines: Iterator[str]) -> Iterator[dict]:
    event: dict = {}
    for line in lines:
        if line.startswith(":"):  # keepalive comment
            continue
        if not line:
            if "data" in event:
                yield event
            event = {}
            continue
        name, _, value = line.partition(":")
        event[name] = value[1:] if value.startswith(" ") else value


def show_checklist(exam: Optional[dict]) -> None:
    if not exam:
        print("no exam yet")
        return
    marks = {"done": "[x]", "pending": "[ ]", "deviating": "[!]"}
    print(f"checklist, exam ...{exam['study_uid'][-6:]}:")
    for item in exam["checklist"]:
        print(f"  {marks[item['status']]} {item['title']:<50} {item['detail']}")


def follow(client: AgentClient, stop: threading.Event, on_alert: Callable[[dict], None]) -> None:
    """React to the live stream: refresh the checklist on each series, hand alerts to the console."""
    for event in client.events(stop=stop):
        if event["type"] in ("protocol_deviation", "label_mismatch", "file_quarantined", "triage_result"):
            on_alert(event)
        elif event["type"] == "series_completed":
            show_checklist(client.current_exam())
        elif event["type"] == "exam_completed":
            print(f"exam ended ({event['reason']}): {event['n_series']} series, {event['n_deviations']} deviation(s)")
            stop.set()


# ------------------------------------------------------------------------------------------ in process
def run_embedded(fault: list[str], vendor: str) -> int:
    """Start the agent inside this program, stream a simulated exam, and drive it over its own API."""
    from scanside.agent.runtime.config import load_config
    from scanside.agent.service.daemon import Agent
    from scanside.simulator.scanner import simulate_exam, stream_exam

    with tempfile.TemporaryDirectory(prefix="scanside-console-") as tmp:
        work = Path(tmp)
        truth = simulate_exam(vendor, work / "scanner", seed=3, faults=fault)
        config = load_config(**{"watch.folder": str(work / "export"), "state.dir": str(work / "state"),
                                "output.stdout": False, "api.enabled": True, "api.port": 0,
                                "series.quiet_period_s": 3, "protocol.exam_quiet_period_s": 6})
        agent = Agent(config)
        # in-process subscription: every event, in the agent's sink thread, as typed objects
        agent.subscribe(lambda ev: print(f"[in-process] {ev.type} seq={ev.seq}"))
        agent.start()
        print(f"agent API at {agent.api_url}; console page at {agent.api_url}/console")
        client, stop = AgentClient(agent.api_url), threading.Event()

        def on_alert(event: dict) -> None:
            alert = next((a for a in client.open_alerts() if a["seq"] == event["seq"]), None)
            if alert:
                print(f"ALERT {alert['severity'].upper()} {alert['code']}: {alert['message']}\n  -> {alert['action']}")
                print("  acknowledged:", client.acknowledge(alert["alert_id"], by="console")["acknowledged"])

        follower = threading.Thread(target=follow, args=(client, stop, on_alert), daemon=True)
        follower.start()
        stream_exam(work / "scanner", work / "export", rate=100, ground_truth=truth)
        follower.join(timeout=180)
        stop.set()
        agent.stop()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running agent's API, e.g. http://127.0.0.1:8686")
    ap.add_argument("--token", help="bearer token (agents listening beyond loopback require one)")
    ap.add_argument("--simulate", action="store_true", help="start an agent in process and stream a simulated exam")
    ap.add_argument("--fault", action="append", default=[], help="protocol fault to inject with --simulate")
    ap.add_argument("--vendor", default="siemens")
    args = ap.parse_args(argv)
    if args.simulate:
        return run_embedded(args.fault, args.vendor)
    if not args.url:
        ap.error("give --url or --simulate")
    client, stop = AgentClient(args.url, args.token), threading.Event()
    show_checklist(client.current_exam())
    try:
        follow(client, stop, lambda ev: print(f"ALERT {ev['type']}: {ev.get('message') or ev.get('reason')}"))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
