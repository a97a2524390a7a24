"""Monitoring kit: the alerting rules pass `promtool check rules` and `promtool test rules` (each
alert fires in its scenario and not for the healthy instance); a real Prometheus (Debian package)
scrapes a running agent every second and gives back, through its HTTP API, the agent's own count of
ingested files; every metric the Grafana dashboard and the alert rules query exists in the agent's
exposition."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from tests.agent.factory import series_files
from tests.agent._live import waiter

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "monitoring" / "prometheus"
DASHBOARD = ROOT / "monitoring" / "grafana" / "scanside-dashboard.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian prometheus; make setup)")

PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "min", "and", "on", "or", "unless",
                "hour", "day_of_week", "absent", "predict_linear", "le", "without", "avg", "count", "ignoring",
                "group_left", "group_right", "label_values", "offset", "bool", "clamp_min"}


@needs_promtool
def test_promtool_check_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 11 rules found" in out.stdout


@needs_promtool
def test_promtool_rule_unit_tests():
    out = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, cwd=PROM)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts_test.yml").read_text()))
    defined = set(re.findall(r"- alert: (\w+)", (PROM / "alerts.yml").read_text()))
    assert tested == defined  # every alert has a scenario


@needs_promtool
def test_promtool_rule_tests_can_fail(tmp_path):
    """A broken threshold makes promtool fail: the tests check something."""
    (tmp_path / "alerts.yml").write_text((PROM / "alerts.yml").read_text().replace("< 2e9", "< 5e8"))
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    out = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "ScansideDiskLow" in out.stdout + out.stderr


@needs_promtool
def test_example_prometheus_config_is_valid(tmp_path):
    text = (PROM / "prometheus.yml").read_text().replace("/etc/prometheus/scanside/alerts.yml", str(PROM / "alerts.yml"))
    (tmp_path / "prometheus.yml").write_text(text)
    out = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------- a running agent
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_wait = waiter(60.0, step=0.2)


@pytest.fixture
def running_agent(tmp_path):
    """An Agent with metrics; /metrics from its HTTP API where that exists, else the agent's own registry
    served by prometheus_client. Yields (agent, metrics URL)."""
    pytest.importorskip("agent.metrics")
    from agent.daemon import Agent

    overrides = {"watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"),
                 "output.stdout": False, "watch.settle_s": 0.1, "series.quiet_period_s": 1.0}
    api = "api" in AgentConfig.model_fields
    if api:
        overrides.update({"api.enabled": True, "api.host": "127.0.0.1", "api.port": 0})
    agent = Agent(load_config(**overrides)).start()
    server = None
    try:
        if api and getattr(agent, "api_url", None):
            url = agent.api_url + "/metrics"
        else:
            from prometheus_client import start_http_server

            if not hasattr(agent, "metrics"):
                from agent.metrics import AgentMetrics

                agent.metrics = AgentMetrics(agent)
            port = _free_port()
            server = start_http_server(port, addr="127.0.0.1", registry=agent.metrics.registry)
            url = f"http://127.0.0.1:{port}/metrics"
        yield agent, url
    finally:
        if server is not None:
            server[0].shutdown()
        agent.stop()


def _exposed_names(url: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        # a labelled family with no children yet has no samples, but its series names follow from its type
        names |= {f"{fam.name}{sfx}" for sfx in SUFFIXES.get(fam.type, ("",))}
    return names


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", ""),
            "info": ("_info",)}


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words - PROMQL_WORDS if "_" in w or w == "up"}


def test_dashboard_and_rules_query_metrics_the_agent_exposes(running_agent):
    agent, url = running_agent
    exposed = _exposed_names(url) | {"up"}  # `up` is Prometheus' own
    dash = json.loads(DASHBOARD.read_text())
    assert dash["panels"] and dash["uid"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= len(dash["panels"])
    rule_exprs = re.findall(r"expr: (\|\n(?:\s{10}.*\n)+|.*)", (PROM / "alerts.yml").read_text())
    assert len(rule_exprs) == 11
    missing = {}
    for expr in exprs + rule_exprs:
        names = _metric_names(expr)
        assert names, expr
        if names - exposed:
            missing[expr.strip()[:80]] = sorted(names - exposed)
    assert not missing, missing


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian prometheus; make setup)")
def test_real_prometheus_scrapes_the_agent(running_agent, tmp_path):
    agent, url = running_agent
    n = 6
    series_files(agent.config.watch.folder, n)
    assert _wait(lambda: agent.store.file_counts().get("ingested") == n, 30)
    target = urllib.parse.urlsplit(url)
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROM / "alerts.yml")],
        "scrape_configs": [{"job_name": "scanside", "metrics_path": target.path,
                            "static_configs": [{"targets": [target.netloc]}]}],
    }))
    port = _free_port()
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    api = f"http://127.0.0.1:{port}/api/v1/query?query="

    def query(q: str):
        try:
            body = json.loads(urllib.request.urlopen(api + urllib.parse.quote(q), timeout=5).read())
        except OSError:
            return None
        return body["data"]["result"] if body.get("status") == "success" else None

    try:
        up = _wait(lambda: [r for r in query('up{job="scanside"}') or [] if r["value"][1] == "1"], 60)
        assert up, prom.stderr.read() if prom.poll() is not None else "target never up"
        got = _wait(lambda: query('sum(scanside_files_total{job="scanside",outcome="ingested"})'), 30)
        assert got, "metric not found in Prometheus"
        assert float(got[0]["value"][1]) == agent.store.file_counts()["ingested"] == n
        # the rules loaded and evaluate against the live agent: nothing fires for a healthy one
        alerts = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).read())
        rules = [r for g in alerts["data"]["groups"] for r in g["rules"]]
        assert len(rules) == 11 and all(r["health"] in ("ok", "unknown") for r in rules)
        assert not [r["name"] for r in rules if r["state"] == "firing"]
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
