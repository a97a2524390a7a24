"""The HTTP API on a real uvicorn (127.0.0.1, free port) in front of a running agent fed by the virtual
scanner, plus the token policy (function, TestClient and real requests), readiness turned false for
real, path-traversal attempts, SSE resume with Last-Event-ID, exam done and alert acknowledgement,
and the published OpenAPI schema being current."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from scanside.agent.service.api import create_app, openapi_schema
from scanside.agent.runtime.auth import bearer, check_exposure, is_loopback, token_required
from scanside.agent.runtime.config import ConfigError, load_config
from scanside.agent.service.daemon import Agent
from tests.agent import _live

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ policy
@pytest.mark.parametrize("host,loop", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("192.168.0.7", False), ("scanner-pc", False), ("", False),
])
def test_loopback_policy(host, loop):
    assert is_loopback(host) is loop
    assert token_required(host, None) is (not loop)
    assert token_required(host, "s3cret") is True  # a token once set is always checked
    if loop:
        check_exposure(host, None)
    else:
        with pytest.raises(ValueError, match="api.token"):
            check_exposure(host, None)


def test_bearer_parsing():
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer("Bearer ") is None and bearer(None) is None


def test_config_refuses_a_public_bind_without_token(tmp_path):
    with pytest.raises(ConfigError, match=r"api.*token"):
        load_config(**{"watch.folder": str(tmp_path), "api.host": "0.0.0.0"})
    assert load_config(**{"watch.folder": str(tmp_path), "api.host": "0.0.0.0", "api.token": "t"}).api.token_value() == "t"
    # disabled API: nothing listens, nothing to protect
    load_config(**{"watch.folder": str(tmp_path), "api.host": "0.0.0.0", "api.enabled": False})


def test_token_checked_in_process(tmp_path):
    agent = Agent(_live.config(tmp_path, **{"api.host": "0.0.0.0", "api.token": "s3cret"}))
    try:
        client = TestClient(create_app(agent))
        assert client.get("/healthz").status_code == 200  # liveness never needs the token
        for path in ("/readyz", "/metrics", "/v1/exams", "/v1/alerts", "/console/console.js"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert client.get("/v1/exams", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/v1/alerts/x/ack").status_code == 401
        assert client.get("/console").status_code == 401
        assert client.get("/console?token=nope").status_code == 401
        r = client.get("/console?token=s3cret", follow_redirects=False)
        assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
        assert client.get("/console").status_code == 200  # the cookie now carries it
        assert client.get("/v1/exams").status_code == 200
    finally:
        agent.stop()


def test_token_required_on_a_real_non_loopback_bind(tmp_path):
    agent = _live.start(tmp_path, **{"api.host": "0.0.0.0", "api.token": "s3cret"})
    try:
        url = f"http://127.0.0.1:{agent.api.port}"
        assert httpx.get(f"{url}/healthz").status_code == 200
        r = httpx.get(f"{url}/v1/exams")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        agent.stop()


def test_a_taken_port_is_reported(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match="could not listen"):
            _live.start(tmp_path, **{"api.port": port})


# ------------------------------------------------------------------------------------------ readiness
def test_readiness_goes_false_for_real(tmp_path):
    agent = _live.start(tmp_path)
    try:
        url = agent.api_url
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True, r.text
        assert set(r.json()["checks"]) == {"engines", "database", "watcher", "components", "disk", "writes", "image_checks"}
        # the image models have not been validated for this (new) site: shadow mode, said in words, not unready
        learning = r.json()["checks"]["image_checks"]
        assert learning["ok"] and learning["detail"] in ("image checks: learning this site (0 exams)",
                                                         "image checks: no image model in use")
        assert httpx.get(f"{url}/v1/image-checks").json()["detail"] == learning["detail"]
        # more free disk required than this file system has
        agent.config.readiness.min_free_disk_bytes = 1 << 62
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json()["checks"]["disk"]["ok"] is False
        assert str(agent.config.state.dir) in r.json()["checks"]["disk"]["detail"]
        agent.config.readiness.min_free_disk_bytes = 0
        assert httpx.get(f"{url}/readyz").status_code == 200
        # the quarantine folder cannot be written (a plain file stands in its place): not ready until a
        # quarantine succeeds again
        qdir = agent.config.quarantine_path
        qdir.write_text("in the way")
        (tmp_path / "export" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "export" / "a" / "bad1.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
        assert _live.wait(lambda: httpx.get(f"{url}/readyz").status_code == 503, 30)
        r = httpx.get(f"{url}/readyz").json()
        assert r["checks"]["writes"]["ok"] is False and f"quarantine {qdir}" in r["checks"]["writes"]["detail"], r
        qdir.unlink()
        (tmp_path / "export" / "a" / "bad2.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xfe" * 64)
        assert _live.wait(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30), httpx.get(f"{url}/readyz").text
        assert len(list(qdir.glob("*.reason.json"))) == 1
        # the folder watcher dies
        agent.watcher.stop()
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json()["checks"]["watcher"]["ok"] is False
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive, just not ready
    finally:
        agent.stop()


def test_readiness_database_not_writable(tmp_path):
    agent = _live.start(tmp_path)
    try:
        # another connection holds the write lock: our writes time out -> not writable
        import sqlite3

        agent.store._conn.execute("PRAGMA busy_timeout = 200")
        other = sqlite3.connect(str(agent.config.db_path), isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            r = httpx.get(f"{agent.api_url}/readyz", timeout=30)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert r.status_code == 503 and r.json()["checks"]["database"]["ok"] is False
        assert httpx.get(f"{agent.api_url}/readyz").status_code == 200
    finally:
        agent.stop()


# ------------------------------------------------------------------------------------------ a streamed exam
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    src, truth = _live.exam(tmp_path_factory)
    agent = _live.start(tmp_path_factory.mktemp("api-agent"))
    try:
        _live.stream_in_background(src, agent, truth).join(timeout=120)
        assert _live.wait(lambda: _live.completed_parts(agent) >= _live.expected_parts(truth)
                          and agent.store.file_counts().get("quarantined") == 1)
        assert _live.wait(lambda: _live.settled(agent))  # the image models have labelled everything
        yield agent, truth
    finally:
        agent.stop()


def test_exam_view_on_a_streamed_exam(live):
    agent, truth = live
    exams = httpx.get(f"{agent.api_url}/v1/exams").json()
    assert [e["study_uid"] for e in exams] == [truth.study_uid]
    assert exams[0]["n_series"] == _live.expected_parts(truth)
    view = httpx.get(f"{agent.api_url}/v1/exams/{truth.study_uid}").json()
    assert view == httpx.get(f"{agent.api_url}/v1/exams/current").json()
    got = Counter((s["series"]["series_uid"], s["series"]["label"]) for s in view["series"])
    want = Counter((s.series_uid, p.label) for s in truth.series for p in s.parts)
    assert got == want
    # the checklist lists the active profile's required series (else every kind seen), each done here
    items = {i["key"]: i for i in view["checklist"]}
    profile = getattr(agent.pipeline.protocol, "profile", None) if getattr(agent.pipeline, "protocol", None) else None
    if profile is not None:
        want_keys = {name for name, req in profile.required.items() if req.enabled}
        assert all(i["required"] for i in items.values())
    else:
        want_keys = {p.label for s in truth.series for p in s.parts if p.label != "other"}
    assert want_keys and want_keys <= set(items)
    assert all(items[k]["status"] == "done" and items[k]["series"] for k in want_keys), view["checklist"]
    # the truncated file's header was readable: its quarantine alert belongs to the exam (issue 21, 12),
    # none is left unassigned
    assert httpx.get(f"{agent.api_url}/v1/alerts", params={"unassigned": "true"}).json() == []
    (alert,) = [a for a in httpx.get(f"{agent.api_url}/v1/alerts", params={"study_uid": truth.study_uid}).json()
                if a["code"] == "FILE_QUARANTINED"]
    assert alert["severity"] == "warning" and alert["action"] and alert["study_uid"] == truth.study_uid
    text = json.dumps(view) + json.dumps(alert)
    for ident in (truth.patient_name, truth.patient_id, truth.accession_number):
        assert ident not in text


def test_sse_resume_with_last_event_id(live):
    agent, _ = live
    all_events = agent.store.events_after(0, limit=100_000)
    assert len(all_events) >= 5
    first = read_sse(f"{agent.api_url}/v1/events?after=0", n=len(all_events))
    assert [e["id"] for e in first] == [str(e.seq) for e in all_events]
    assert [e["event"] for e in first] == [e.type for e in all_events]
    assert json.loads(first[2]["data"])["key"] == all_events[2].key
    # reconnect after the third event: the stream picks up at the fourth, nothing repeated or lost
    k = 3
    rest = read_sse(f"{agent.api_url}/v1/events", n=len(all_events) - k, headers={"Last-Event-ID": first[k - 1]["id"]})
    assert [e["id"] for e in rest] == [e["id"] for e in first[k:]]
    r = httpx.get(f"{agent.api_url}/v1/events", headers={"Last-Event-ID": "../../x"})
    assert r.status_code == 400


def test_sse_live_event_and_heartbeat(live):
    agent, _ = live
    got: list[dict] = []
    heartbeats = []
    done = threading.Event()

    def reader():
        with httpx.stream("GET", f"{agent.api_url}/v1/events", timeout=30) as resp:
            for ev in parse_sse(resp.iter_lines(), heartbeats):
                got.append(ev)
                done.set()
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert _live.wait(lambda: len(heartbeats) >= 1, timeout=10)  # idle stream sends keepalives (1 s here)
    assert not got  # from now: nothing old replayed
    alert_id = httpx.get(f"{agent.api_url}/v1/alerts").json()[0]["alert_id"]
    assert httpx.post(f"{agent.api_url}/v1/alerts/{alert_id}/ack", json={"by": "tech one"}).status_code == 200
    assert done.wait(10)
    assert got[0]["event"] == "alert_acknowledged"
    assert json.loads(got[0]["data"])["alert_id"] == alert_id


def test_ack_is_idempotent_and_recorded(live):
    agent, _ = live
    alert = next(a for a in httpx.get(f"{agent.api_url}/v1/alerts").json())
    url = f"{agent.api_url}/v1/alerts/{alert['alert_id']}/ack"
    r1 = httpx.post(url, json={"by": "tech one"}).json()
    r2 = httpx.post(url).json()
    assert r1["acknowledged"] and r2["acknowledged"] and r2["already"]
    acks = [e for e in agent.store.events_after(0, limit=100_000) if e.type == "alert_acknowledged"]
    assert [a.alert_id for a in acks] == [alert["alert_id"]]
    listed = next(a for a in httpx.get(f"{agent.api_url}/v1/alerts").json() if a["alert_id"] == alert["alert_id"])
    assert listed["acknowledged"] and listed["acknowledged_by"] == "tech one"
    assert httpx.get(f"{agent.api_url}/v1/alerts", params={"open": "true"}).json() == []
    assert httpx.post(f"{agent.api_url}/v1/alerts/no-such-alert/ack").status_code == 404
    assert httpx.post(url, json={"by": "<script>"}).status_code == 422


@pytest.mark.parametrize("path", [
    "/v1/exams/..%2F..%2F..%2Fetc%2Fpasswd", "/v1/exams/%2e%2e", "/v1/exams/1.2.3%2F..%2F..",
    "/v1/exams/..%2Fstate.sqlite/done", "/v1/alerts/..%2F..%2Fetc%2Fpasswd/ack",
    "/console/..%2F..%2F..%2Fetc%2Fpasswd", "/console/..%2Fapi.py", "/console/console.js%2F..%2F..%2Fapi.py",
])
def test_path_traversal_refused(live, path):
    agent, _ = live
    method = "POST" if path.endswith(("/ack", "/done")) else "GET"
    status, body = raw_request(agent.api.port, method, path)
    assert status in (404, 405, 422), (path, status)
    assert "root:" not in body and "import" not in body and "SQLite" not in body


def test_raw_dotdot_paths_never_reach_files(live):
    agent, _ = live
    for path in ("/console/../../../../etc/passwd", "/console/../agent/api.py", "/../../etc/passwd"):
        status, body = raw_request(agent.api.port, "GET", path)
        assert status != 200 or "root:" not in body, path
        assert "def create_app" not in body


def test_unknown_exam_and_done(live):
    agent, truth = live
    assert httpx.get(f"{agent.api_url}/v1/exams/1.2.3.4").status_code == 404
    assert httpx.post(f"{agent.api_url}/v1/exams/1.2.3.4/done").status_code == 404


def test_exam_done_closes_open_series(tmp_path_factory):
    src, truth = _live.exam(tmp_path_factory)
    agent = _live.start(tmp_path_factory.mktemp("done-agent"), **{"series.quiet_period_s": 600, "series.incomplete_grace_s": 600})
    try:
        stop = threading.Event()
        files = sum(s.n_files for s in truth.series)
        seen = []

        def on_file(p):
            seen.append(p)
            if len(seen) >= files // 3:
                stop.set()

        _live.stream_in_background(src, agent, truth, stop=stop, on_file=on_file).join(timeout=60)
        assert _live.wait(lambda: agent.store.file_counts().get("ingested", 0) >= len(seen) - 1 and agent.ingestor.backlog == 0)
        assert agent.store.all_series("open"), "the exam is mid-way: some series are still open"
        r = httpx.post(f"{agent.api_url}/v1/exams/{truth.study_uid}/done")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["exam_completed"] and not body["already"] and body["events_recorded"] >= 2
        assert agent.store.all_series("open") == []
        events = agent.store.events_after(0, limit=100_000)
        (ended,) = [e for e in events if e.type == "exam_completed"]
        assert ended.reason == "operator" and ended.study_uid == truth.study_uid
        assert httpx.post(f"{agent.api_url}/v1/exams/{truth.study_uid}/done").json()["already"] is True
        assert len([e for e in agent.store.events_after(0, limit=100_000) if e.type == "exam_completed"]) == 1
        assert httpx.get(f"{agent.api_url}/v1/exams/{truth.study_uid}").json()["state"] == "completed"
    finally:
        agent.stop()


# ------------------------------------------------------------------------------------------ schema
def test_published_openapi_schema_is_current():
    published = json.loads((REPO / "openapi.json").read_text())
    assert published == json.loads(json.dumps(openapi_schema())), \
        "openapi.json is stale: regenerate with `scanside schema openapi > openapi.json`"
    assert {"/healthz", "/readyz", "/metrics", "/v1/exams", "/v1/exams/{study_uid}", "/v1/events",
            "/v1/exams/{study_uid}/done", "/v1/alerts/{alert_id}/ack"} <= set(published["paths"])


def test_openapi_lists_the_401_and_404_answers():
    """Issue 21 (12): every route behind the token documents 401, every route naming an exam or an
    alert documents 404, so a client generated from the schema handles both."""
    paths = openapi_schema()["paths"]
    for path, ops in paths.items():
        for method, op in ops.items():
            codes = set(op["responses"])
            if path == "/healthz":
                assert "401" not in codes
                continue
            assert "401" in codes, (method, path)
            named = "{" in path or any(p["name"] == "study_uid" for p in op.get("parameters", []))
            assert ("404" in codes) == named, (method, path)
            for code in {"401", "404"} & codes:
                schema = op["responses"][code]["content"]["application/json"]["schema"]
                assert schema["required"] == ["detail"]


# ------------------------------------------------------------------------------------------ helpers
def parse_sse(lines, heartbeats=None):
    ev: dict = {}
    for line in lines:
        if line.startswith(":"):
            if heartbeats is not None:
                heartbeats.append(time.monotonic())
            continue
        if not line:
            if "data" in ev:
                yield ev
            ev = {}
            continue
        field, _, val = line.partition(":")
        ev[field] = val[1:] if val.startswith(" ") else val


def read_sse(url: str, n: int, headers: dict | None = None, timeout: float = 30) -> list[dict]:
    out: list[dict] = []
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for ev in parse_sse(resp.iter_lines()):
            out.append(ev)
            if len(out) >= n:
                break
    return out


def raw_request(port: int, method: str, path: str) -> tuple[int, str]:
    """Send the path byte for byte (clients normalise '..' away; an attacker's need not)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------ checklist logic
def _summary(series_id, label, b=(), plane="axial", number=1, complete=True):
    from scanside.agent.schema.events import SeriesSummary

    return SeriesSummary(series_id=series_id, study_uid="1.2", series_uid=series_id.split("#")[0], series_number=number,
                         label=label, label_confidence=1.0, reason="test", b_values=list(b), plane=plane,
                         n_instances=10, n_images=10, complete=complete)


def test_checklist_pending_done_deviating():
    from scanside.agent.state.alerts import Alert
    from scanside.agent.state.examview import Requirement, build_checklist

    reqs = [Requirement(key="t2", title="axial T2W", labels=["T2WI_nan", "T2WI_fs"], planes=["axial"]),
            Requirement(key="hb", title="high b DWI", labels=["DWI_High"], b_min=1400),
            Requirement(key="adc", title="ADC map", labels=["ADC"])]
    series = [_summary("1.3", "T2WI_nan", number=2), _summary("1.4#b1000", "DWI_High", b=[1000], number=5),
              _summary("1.5", "T2WI_nan", plane="sagittal", number=3)]
    items = {i.key: i for i in build_checklist(series, [], reqs)}
    assert (items["t2"].status, items["t2"].series) == ("done", ["2"])  # the sagittal one does not count
    assert items["hb"].status == "pending"  # b1000 is not >= 1400
    assert items["adc"].status == "pending"
    alerts = [Alert(alert_id="a", code="DWI_HIGH_B_TOO_LOW", severity="critical", message="b too low", action="x",
                    series_id="1.4#b1000", label="DWI_High", measured="b=1000", required=">= 1400"),
              Alert(alert_id="b", code="SERIES_MISSING", severity="critical", message="no ADC", action="y",
                    required="ADC map", measured="none received"),
              Alert(alert_id="q", code="FILE_QUARANTINED", severity="warning", message="file", action="z")]
    items = {i.key: i for i in build_checklist(series, alerts, reqs)}
    assert items["hb"].status == "deviating" and "1000" in items["hb"].detail
    assert items["adc"].status == "deviating"
    assert items["t2"].status == "done"  # a quarantined file is not a deviation of a series
    # no profile: one line per kind seen
    seen = build_checklist(series, [], None)
    assert [i.key for i in seen] == ["T2WI_nan", "DWI_High"] and not any(i.required for i in seen)


def test_documented_console_client_example(live):
    """examples/console_integration.py (docs/embedding.md) against the live agent."""
    import importlib.util
    import itertools

    spec = importlib.util.spec_from_file_location("console_integration", REPO / "examples" / "console_integration.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    agent, truth = live
    client = example.AgentClient(agent.api_url)
    stop = threading.Event()
    got = list(itertools.islice(client.events(last_event_id=2, stop=stop), 3))
    stop.set()
    want = agent.store.events_after(2, limit=3)
    assert [(e["seq"], e["type"], e["key"]) for e in got] == [(e.seq, e.type, e.key) for e in want]
    assert client.current_exam()["study_uid"] == truth.study_uid


def test_scanside_run_serves_the_api_by_default(tmp_path):
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "export").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "scanside.agent.cli", "run", "--watch", str(tmp_path / "export"),
                             "--state-dir", str(tmp_path / "state"), "--api-port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert _live.wait(lambda: _get_ok(f"http://127.0.0.1:{port}/healthz"), timeout=60), "no API from scanside run"
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["ready"] is True
        assert "scanside_build_info" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/console" in err


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
