"""What the HTTP API accepts before any route runs (issue 20): bounded connections and time, the request
head and body size, Host and Origin, and the security headers on every answer.

- `guarded_protocol(...)`: uvicorn's h11 protocol with a cap on open connections (one over the cap is
  closed at once, so idle sockets cannot take the agent's descriptors) and deadlines for a complete
  request head and a complete request body (a client trickling bytes is cut off).
- `ApiGuard`: ASGI middleware in front of the app. Host must be a loopback name (or one configured in
  api.allowed_hosts) while the API is bound to loopback: a DNS-rebinding page reaches 127.0.0.1 under its
  own name and is refused. A state-changing request (POST...) must be same-origin (Origin, else
  Sec-Fetch-Site): a cross-site form cannot end an exam or acknowledge an alert. Its token is checked
  and its declared size compared with api.max_body_bytes before one body byte is read; a chunked body is
  counted as it arrives. /docs and the schema need the token like the rest.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Iterable, Optional
from urllib.parse import urlsplit

from uvicorn.protocols.http.h11_impl import H11Protocol

from scanside.agent.runtime.auth import is_loopback

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# the console and API are same-origin pages with no third-party content; /docs (off by default) loads
# Swagger UI from its CDN and gets that one source added
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")
DOCS_CDN = "https://cdn.jsdelivr.net"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


def guarded_protocol(max_connections: int, header_timeout_s: float, body_timeout_s: float) -> type:
    """An H11Protocol subclass with these limits (uvicorn.Config(http=...))."""

    class GuardedH11Protocol(H11Protocol):
        refused = 0  # connections closed for being over the cap (all instances)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_timer: Optional[asyncio.TimerHandle] = None
            self._body_timer: Optional[asyncio.TimerHandle] = None
            self._waiting_cycle: Any = None
            if len(self.connections) > max_connections:
                type(self).refused += 1
                if type(self).refused in (1, 10, 100) or type(self).refused % 1000 == 0:  # a flood logs a few lines
                    log.warning("API: %d connection(s) refused over api.max_connections (%d)", type(self).refused,
                                max_connections)
                transport.abort()  # frees the descriptor now; connection_lost follows
                return
            self._arm_head()

        def _arm_head(self) -> None:
            self._waiting_cycle = self.cycle
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_late)

        def _head_late(self) -> None:
            self._head_timer = None
            if self.cycle is self._waiting_cycle and not self.transport.is_closing():
                self.transport.close()  # no complete request head in time (idle or trickling client)

        def _body_late(self) -> None:
            self._body_timer = None
            if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._waiting_cycle:
                self._head_timer.cancel()  # a request head arrived: now its body has a deadline
                self._head_timer = None
                if self.cycle is not None and self.cycle.more_body:
                    self._body_timer = self.loop.call_later(body_timeout_s, self._body_late)

        def on_response_complete(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            super().on_response_complete()
            if not self.transport.is_closing() and self._head_timer is None:
                self._arm_head()  # the next request head on this keep-alive connection

        def connection_lost(self, exc: Optional[Exception]) -> None:
            for timer in (getattr(self, "_head_timer", None), getattr(self, "_body_timer", None)):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def _host_only(value: str) -> str:
    """'localhost:8686' -> 'localhost'; '[::1]:8686' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class ApiGuard:
    def __init__(self, app: Callable[..., Awaitable[None]], *, bind_host: str, allowed_hosts: Iterable[str],
                 max_body_bytes: int, authorised: Callable[[Scope], bool], docs: bool = False):
        self.app = app
        # bound to loopback: only loopback names (and configured ones); bound wider: configured names, or any
        self.allowed = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}
        self.check_host = is_loopback(bind_host) or bool(self.allowed)
        self.max_body_bytes = max_body_bytes
        self.authorised = authorised
        self.docs = docs

    def host_ok(self, host: str) -> bool:
        if not self.check_host:
            return True
        h = _host_only(host)
        return h in self.allowed or is_loopback(h)  # a rebinding page's Host is its own domain, never these

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        csp = CSP.replace("script-src 'self'", f"script-src 'self' {DOCS_CDN}").replace(
            "style-src 'self'", f"style-src 'self' {DOCS_CDN}") if self.docs and path.startswith("/docs") else CSP

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                if b"content-security-policy" not in present:
                    extra.append((b"content-security-policy", csp.encode()))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        host = headers.get("host", "")
        if not self.host_ok(host):
            await _answer(send_secured, 421, "this agent answers to its loopback names only (api.allowed_hosts)")
            return
        method = scope.get("method", "GET").upper()
        if method in UNSAFE_METHODS and not _same_origin(headers, host):
            await _answer(send_secured, 403, "cross-origin request refused")
            return
        if (path.startswith(DOC_PATHS) or method in UNSAFE_METHODS) and not self.authorised(scope):
            await _answer(send_secured, 401, "bearer token required", [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.isascii() or not length.strip().isdigit():
                await _answer(send_secured, 400, "bad Content-Length")
                return
            if int(length) > self.max_body_bytes:
                await _answer(send_secured, 413, f"request body over {self.max_body_bytes} bytes")
                return
        started = answered = False
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:  # a chunked body past the bound: answer now, the app sees a disconnect
                    if not started and not answered:
                        answered = True
                        await _answer(send_secured, 413, f"request body over {self.max_body_bytes} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # the 413 went out; whatever the app says after its disconnect is dropped
            if message["type"] == "http.response.start":
                started = True
            await send_secured(message)

        await self.app(scope, counted_receive, tracked_send)


def _same_origin(headers: dict[str, str], host: str) -> bool:
    """A state-changing request from this agent's own pages or from a non-browser client."""
    origin = headers.get("origin")
    if origin is not None:
        if origin == "null":
            return False
        parts = urlsplit(origin)
        return bool(parts.netloc) and parts.netloc.lower() == host.strip().lower()
    # no Origin: a non-browser client, or an older browser that says where the request came from
    return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


async def _answer(send: Send, status: int, detail: str, headers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
