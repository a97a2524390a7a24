"""The HTTP API against hostile clients on loopback (issue 20, findings 2, 4, 11, 12): bounded
connections and time, auth and size before any body byte is read, Host/Origin checks, no external
script, security headers on every answer, 4xx (never 500) for odd cursors."""
from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

from tests.agent import _live


def recv_head(s: socket.socket) -> bytes:
    """Bytes from s up to and including the blank line that ends an HTTP head (or until EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _head(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str]]:
    """Send raw bytes, read the answer's status and headers (no body is sent unless in request)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = recv_head(s)
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return int(head[0].split()[1]), headers


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = _live.start(tmp_path_factory.mktemp("hostile-api"), **{
        "api.max_connections": 8, "api.header_timeout_s": 1.5, "api.body_timeout_s": 1.5, "api.max_body_bytes": 4096})
    yield a
    a.stop()


@pytest.fixture(scope="module")
def token_agent(tmp_path_factory):
    a = _live.start(tmp_path_factory.mktemp("hostile-api-token"), **{"api.token": "s3cret", "api.max_body_bytes": 4096})
    yield a
    a.stop()


def _port(agent) -> int:
    return agent.api.port


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_idle_connections_cannot_take_the_descriptors(agent):
    """250 idle connections (finding 2): the agent keeps at most max_connections of them, closes idle
    ones after header_timeout_s, and answers again once they are gone."""
    before = _fds()
    idle = []
    try:
        for _ in range(250):
            try:  # the accept queue is small (2 x max_connections): a connect may wait for a SYN retry
                idle.append(socket.create_connection(("127.0.0.1", _port(agent)), timeout=20))
            except OSError:
                pass
        assert len(idle) >= 200
        time.sleep(0.5)
        # our 250 client sockets plus, on the agent's side, at most the cap (and one being refused)
        assert _fds() - before <= 250 + 8 + 2
        time.sleep(2.0)  # past the header timeout: the agent closed the ones it kept
        assert all(_closed(s) for s in idle)
        assert httpx.get(f"{agent.api_url}/readyz", timeout=5).status_code in (200, 503)
    finally:
        for s in idle:
            s.close()


def _closed(s: socket.socket) -> bool:
    s.settimeout(3)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_a_trickled_request_head_is_cut_off(agent):
    with socket.create_connection(("127.0.0.1", _port(agent)), timeout=10) as s:
        start = time.monotonic()
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100:
                s.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - start > 8:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _closed(s) and time.monotonic() - start < 8


def test_a_trickled_body_is_cut_off(agent):
    with socket.create_connection(("127.0.0.1", _port(agent)), timeout=10) as s:
        s.sendall(b"POST /v1/alerts/x/ack HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")
        start = time.monotonic()
        assert _closed(s) and time.monotonic() - start < 5


def test_unauthenticated_huge_body_is_refused_before_reading(token_agent):
    """Finding 4: the 401 comes back while the 256 MiB body is still unsent."""
    status, headers = _head(_port(token_agent), b"POST /v1/alerts/x/ack HTTP/1.1\r\nHost: localhost\r\n"
                                                b"Content-Type: application/json\r\nContent-Length: 268435456\r\n\r\n")
    assert status == 401 and headers.get("www-authenticate") == "Bearer"


def test_oversized_body_is_refused_before_reading(token_agent):
    status, _ = _head(_port(token_agent), b"POST /v1/alerts/x/ack HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer s3cret\r\n"
                                          b"Content-Type: application/json\r\nContent-Length: 268435456\r\n\r\n")
    assert status == 413
    chunked = httpx.post(f"{token_agent.api_url}/v1/alerts/x/ack", headers={"Authorization": "Bearer s3cret"},
                         content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]))
    assert chunked.status_code == 413


def test_host_must_be_a_loopback_name(agent):
    port = _port(agent)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    assert httpx.get(f"http://localhost:{port}/healthz").status_code == 200
    for host in ("evil.example", f"rebind.attacker.test:{port}", "192.168.1.10"):
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", headers={"Host": host}).status_code == 421, host


def test_cross_site_posts_are_refused(agent):
    """Finding 11 (CSRF): a form on another site posting to exam-done or ack gets 403; the console's
    own same-origin requests and non-browser clients pass through to the route."""
    url = agent.api_url
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        r = httpx.post(f"{url}/v1/exams/1.2.3/done", data={"a": "b"}, headers=headers)
        assert r.status_code == 403, headers
    own = httpx.post(f"{url}/v1/exams/1.2.3/done", headers={"Origin": url})
    assert own.status_code == 404  # reached the route: no such exam
    assert httpx.post(f"{url}/v1/exams/1.2.3/done").status_code == 404


def test_no_docs_and_no_external_script_by_default(agent):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{agent.api_url}{path}").status_code == 404, path
    page = httpx.get(f"{agent.api_url}/console").text
    assert "http://" not in page and "https://" not in page


def test_security_headers_on_every_answer(agent, token_agent):
    answers = [httpx.get(f"{agent.api_url}{p}") for p in ("/healthz", "/console", "/console/console.js", "/nope", "/v1/exams/x")]
    answers.append(httpx.get(f"{token_agent.api_url}/readyz"))  # 401
    answers.append(httpx.post(f"{token_agent.api_url}/v1/alerts/x/ack", headers={"Authorization": "Bearer s3cret"},
                              content=b"x" * 5000))  # 413
    answers.append(httpx.get(f"{agent.api_url}/healthz", headers={"Host": "evil.example"}))  # 421
    assert {r.status_code for r in answers} >= {200, 401, 404, 413, 421}
    for r in answers:
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), r.url
        assert r.headers.get("x-frame-options") == "DENY" and r.headers.get("x-content-type-options") == "nosniff", r.url


def test_odd_event_cursors_are_4xx(agent):
    url = agent.api_url
    assert httpx.get(f"{url}/v1/events", params={"after": str(10**30)}).status_code == 422
    assert httpx.get(f"{url}/v1/events", params={"after": "-1"}).status_code == 422
    for value in ("²", "1e9", "9" * 40, "-3"):
        r = httpx.get(f"{url}/v1/events", headers={"Last-Event-ID": value.encode("utf-8")})
        assert r.status_code == 400, value
