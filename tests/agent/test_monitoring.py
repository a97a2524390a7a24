"""Monitoring kit: the alerting rules pass `promtool check rules` and `promtool test rules` (each
alert fires in its scenario and not for the healthy instance); a real Prometheus (Debian package)
scrapes a running agent every second and gives back, through its HTTP API, the agent's own count of
ingested files; every metric the Grafana dashboard and the alert rules query exists in the agent's
exposition."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from scanside.agent.runtime.config import AgentConfig, load_config
from tests.agent.factory import series_files
from tests.agent._live import free_port, stop_process, waiter

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
    """As shipped, in place (issue 21, 12): no path anybody has to create first."""
    out = subprocess.run([PROMTOOL, "check", "config", str(PROM / "prometheus.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr and "11 rules found" in out.stdout + out.stderr
    # the monitoring README gives the install steps it relies on
    readme = (ROOT / "monitoring" / "README.md").read_text()
    for needed in ("alerts.yml", "prometheus.yml", "scanside-dashboard.json", "promtool check config"):
        assert needed in readme


@needs_promtool
def test_rule_tests_hold_a_series_that_starts_at_its_first_increment():
    """The quarantine scenario in alerts_test.yml where a counter is absent and then jumps: as the agent
    exposes it now (every known label set at 0 from the start) the alert fires on one burst; the same
    burst on a series that appears at its first increment does not, which is why the agent initialises."""
    text = (PROM / "alerts_test.yml").read_text()
    assert re.search(r"values: '_x\d+ 40", text), "no series starting at its first increment"
    assert re.search(r"values: '0x\d+ 40", text), "no zero-initialised series with the same burst"


# ------------------------------------------------------------------------------- a running agent
_wait = waiter(60.0, step=0.2)


@pytest.fixture
def running_agent(tmp_path):
    """An Agent with metrics; /metrics from its HTTP API where that exists, else the agent's own registry
    served by prometheus_client. Yields (agent, metrics URL)."""
    pytest.importorskip("scanside.agent.service.metrics")
    from scanside.agent.service.daemon import Agent

    overrides = {"watch.folder": str(tmp_path / "export"), "state.dir": str(tmp_path / "state"),
                 "output.stdout": False, "watch.settle_s": 0.1, "series.quiet_period_s": 1.0,
                 "ingest.quarantine_after_s": 1.0, "ingest.retry_delays_s": [0.2, 0.4]}
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
                from scanside.agent.service.metrics import AgentMetrics

                agent.metrics = AgentMetrics(agent)
            port = free_port()
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


class Prometheus:
    """A real Prometheus (Debian package) scraping one target every second, with the given rule file."""

    def __init__(self, tmp_path: Path, metrics_url: str, rules: Path):
        target = urllib.parse.urlsplit(metrics_url)
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "scanside", "metrics_path": target.path,
                                "static_configs": [{"targets": [target.netloc]}]}],
        }))
        self.port = free_port()
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def get(self, path: str):
        try:
            body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5).read())
        except OSError:
            return None
        return body["data"] if body.get("status") == "success" else None

    def query(self, q: str):
        data = self.get("/api/v1/query?query=" + urllib.parse.quote(q))
        return data["result"] if data else None

    def wait_up(self) -> None:
        up = _wait(lambda: [r for r in self.query('up{job="scanside"}') or [] if r["value"][1] == "1"], 60)
        assert up, self.proc.stderr.read() if self.proc.poll() is not None else "target never up"

    def stop(self) -> None:
        stop_process(self.proc)


needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian prometheus; make setup)")


@needs_prometheus
def test_real_prometheus_scrapes_the_agent(running_agent, tmp_path):
    agent, url = running_agent
    n = 6
    series_files(agent.config.watch.folder, n)
    assert _wait(lambda: agent.store.file_counts().get("ingested") == n, 30)
    prom = Prometheus(tmp_path, url, PROM / "alerts.yml")
    try:
        prom.wait_up()
        got = _wait(lambda: prom.query('sum(scanside_files_total{job="scanside",outcome="ingested"})'), 30)
        assert got, "metric not found in Prometheus"
        assert float(got[0]["value"][1]) == agent.store.file_counts()["ingested"] == n
        # the rules loaded and evaluate against the live agent: nothing fires for a healthy one
        rules = [r for g in _wait(lambda: prom.get("/api/v1/rules"), 30)["groups"] for r in g["rules"]]
        assert len(rules) == 11 and all(r["health"] in ("ok", "unknown") for r in rules)
        assert not [r["name"] for r in rules if r["state"] == "firing"]
    finally:
        prom.stop()


@needs_prometheus
def test_real_prometheus_sees_a_first_burst_and_the_quarantine_alert_fires(running_agent, tmp_path):
    """Issue 21 (11): the agent's first quarantines ever, in one burst between two scrapes. Prometheus
    has already scraped the counter at 0, so increase() sees the burst and the quarantine alert fires
    (its `for: 5m` shortened to 0s here: the test checks the expression on live data, not the wait)."""
    agent, url = running_agent
    rules = tmp_path / "alerts.yml"
    text = (PROM / "alerts.yml").read_text()
    head, _, tail = text.partition("- alert: ScansideQuarantineRateHigh")
    rules.write_text(head + "- alert: ScansideQuarantineRateHigh" + tail.replace("for: 5m", "for: 0s", 1))
    prom = Prometheus(tmp_path, url, rules)
    try:
        prom.wait_up()
        zero = _wait(lambda: prom.query('scanside_files_quarantined_total{reason="truncated"} == 0'), 30)
        assert zero, "the counter is not exposed at 0 before its first increment"
        export = Path(agent.config.watch.folder)
        good = series_files(export / "good", 6)
        for i, path in enumerate(series_files(export / "cut", 3)):  # pixel data cut short: truncated
            path.write_bytes(path.read_bytes()[:-50])
        assert _wait(lambda: agent.store.file_counts().get("quarantined") == 3, 30), agent.store.file_counts()
        assert _wait(lambda: agent.store.file_counts().get("ingested") == len(good), 30)

        def firing():
            alerts = (prom.get("/api/v1/alerts") or {}).get("alerts", [])
            return [a for a in alerts if a["labels"]["alertname"] == "ScansideQuarantineRateHigh" and a["state"] == "firing"]

        assert _wait(firing, 60), prom.query("increase(scanside_files_quarantined_total[15m])")
        seen = prom.query('sum(increase(scanside_files_quarantined_total{reason="truncated"}[15m]))')
        assert float(seen[0]["value"][1]) > 0
    finally:
        prom.stop()


def test_embedding_doc_lists_every_metric_the_code_defines():
    """Issue 21 (12): the metric table in docs/embedding.md against the names agent/service/metrics.py defines,
    both ways (a counter family `x` is exposed as `x_total`)."""
    code = (ROOT / "agent" / "service" / "metrics.py").read_text()
    defined = set(re.findall(r'"(scanside_[a-z0-9_]+)"', code))
    assert {"scanside_disk_free_bytes", "scanside_write_failing", "scanside_write_failures"} <= defined
    doc = (ROOT / "docs" / "embedding.md").read_text()
    table = doc[doc.index("## Metrics"):]
    documented = set(re.findall(r"`(scanside_[a-z0-9_]*[a-z0-9])`?", table))
    exposed_as = {n: {n, f"{n}_total", f"{n}_info"} for n in defined}  # family name -> exposed names
    missing = {n for n, names in exposed_as.items() if not names & documented}
    assert not missing, f"metrics not in docs/embedding.md: {sorted(missing)}"
    stale = documented - set().union(*exposed_as.values())
    assert not stale, f"documented metrics the code does not define: {sorted(stale)}"
