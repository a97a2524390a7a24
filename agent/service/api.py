"""The agent's HTTP API and technologist console (FastAPI, served by uvicorn in a thread of the agent).

    GET  /healthz                   the process answers (liveness; never needs the token)
    GET  /readyz                    engines loaded, database writable, watcher alive, free space on every folder
                                    the agent writes, the last write to each output worked
    GET  /metrics                   Prometheus text exposition
    GET  /v1/exams                  exams, latest activity first
    GET  /v1/exams/current          the exam with the latest activity
    GET  /v1/exams/{study_uid}      series, labels, checklist, deviations, alerts, triage
    POST /v1/exams/{study_uid}/done the technologist says the exam is over
    GET  /v1/image-checks           image models: "learning this site (N exams)" while in shadow mode
    GET  /v1/alerts                 alerts (?open=true: not yet acknowledged; ?unassigned=true: no exam, e.g. quarantine)
    POST /v1/alerts/{alert_id}/ack  acknowledge an alert (idempotent)
    GET  /v1/events                 server-sent events from the event log; resume with Last-Event-ID (the event seq)
    GET  /console                   the technologist's page

Bound to a loopback address the API is open to local processes (unless a token is set); bound to any
other address a bearer token is required (scanside.agent.runtime.auth). Browsers cannot send a header on an
EventSource, so /console?token=... sets an HttpOnly, SameSite=Strict cookie that carries it.
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from scanside.agent.state.alerts import Alert
from scanside.agent.runtime.auth import bearer, token_matches, token_required
from scanside.agent.schema.events import AlertAcknowledged
from scanside.agent.state.examview import ExamBrief, ExamIndex, ExamView, Requirement, exam_view
from scanside.agent.runtime.health import disk_check
from scanside.agent.runtime.lifecycle import Worker, WorkerThread
from scanside.agent.outputs.retry import DeadLetter

if TYPE_CHECKING:  # pragma: no cover
    from scanside.agent.service.daemon import Agent

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
COOKIE = "scanside_token"
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
ALERT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:#-]{0,127}$")
BY_RE = re.compile(r"^[\w .'-]{1,64}$")
MAX_SEQ = 2**63 - 1  # SQLite INTEGER: a larger ?after= would overflow into a 500
SEQ_RE = re.compile(r"^[0-9]{1,18}$")


def _version() -> str:
    try:
        return metadata.version("scanside")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "0"


# ------------------------------------------------------------------------------------------ models
class Health(BaseModel):
    status: str = "alive"
    version: str


class Check(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Check]


class AckRequest(BaseModel):
    by: Optional[str] = Field(None, max_length=64, description="who acknowledges (a console user name, not a patient's)")


class AckResult(BaseModel):
    alert_id: str
    acknowledged: bool
    already: bool = Field(description="the alert had been acknowledged before this call")
    seq: Optional[int] = Field(None, description="seq of the alert_acknowledged event")


class DoneResult(BaseModel):
    study_uid: str
    events_recorded: int = Field(description="events this call recorded: closed series, deviations found at exam end, exam_completed")
    exam_completed: bool = Field(description="an exam_completed event is in the log")
    already: bool


# ------------------------------------------------------------------------------------------ events fan-out
class EventNotifier:
    """Wakes the asyncio SSE streams when the sink thread sees new events (thread-safe)."""

    def __init__(self) -> None:
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._lock = threading.Lock()
        self.closed = False

    def register(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        w = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(w)
        return w

    def unregister(self, w: tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> None:
        with self._lock:
            self._waiters.discard(w)

    def notify(self, *_: Any) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed: the stream is gone
                pass

    def close(self) -> None:
        self.closed = True
        self.notify()


# ------------------------------------------------------------------------------------------ readiness
INTAKE = ("watcher", "catch-up", "ingest", "cstore")  # the components the "watcher" check reports


def readiness(agent: "Agent") -> Readiness:
    checks: dict[str, Check] = {}
    ok = bool(agent.engines_ready())
    checks["engines"] = Check(ok=ok, detail="models loaded" if ok else "models not loaded")
    db_ok = agent.store.writable()
    checks["database"] = Check(ok=db_ok, detail="writable" if db_ok else (agent.store.problem() or f"not writable ({agent.store.path})"))
    # the supervisor's view (scanside.agent.runtime.lifecycle): every started component alive, the ingest loop not stalled
    down = agent.supervisor.problems()
    intake_down = [s for s in down if s.name in INTAKE]
    # ingesting but held back (its own descriptors or memory ran out): files wait, none is quarantined
    problem = agent.ingestor.problem
    checks["watcher"] = Check(ok=not intake_down and problem is None,
                              detail="; ".join(f"{s.name} {s.detail}" for s in intake_down) if intake_down else
                              f"ingest {problem}" if problem is not None else "watching")
    others = [s for s in down if s.name not in INTAKE]
    checks["components"] = Check(ok=not others, detail="; ".join(f"{s.name} {s.detail}" for s in others) or
                                 f"{len(agent.supervisor.names)} component(s) running")
    # every file system the agent writes to (state, quarantine, event log, DICOM output, C-STORE folder)
    disk_ok, disk_detail = disk_check(agent.config)
    checks["disk"] = Check(ok=disk_ok, detail=disk_detail)
    # the last write to each output folder worked (a full, read-only or failing disk shows here first)
    failing = agent.write_health.failing()
    checks["writes"] = Check(ok=not failing, detail="; ".join(
        f"{f.target} {f.folder}: {f.detail} ({f.attempts} attempt(s))" for f in failing.values()) or "last writes succeeded")
    # shadow mode is not unreadiness: the agent works, its image models only do not alert yet (scanside.agent.analysis.shadow)
    checks["image_checks"] = Check(ok=True, detail=image_checks_line(agent))
    return Readiness(ready=all(c.ok for c in checks.values()), checks=checks)


def image_checks_line(agent: "Agent") -> str:
    return agent.analyzer.image_checks()


# ------------------------------------------------------------------------------------------ exam done
def exam_done(agent: "Agent", study_uid: str, index: ExamIndex) -> DoneResult:
    """Close the exam's open series now and record that the exam is over (reason 'operator').

    The pipeline's `exam_done` runs the exam-end protocol checks (missing series) and records
    ExamCompleted; an exam already ended (and not reopened by new images) is left as it is."""
    brief = index.brief(study_uid)
    already = brief is not None and brief.state == "completed"
    n = 0
    if not already:
        n = int(agent.pipeline.exam_done(study_uid) or 0)
        if n:
            _wake(agent)
    after = index.brief(study_uid)
    return DoneResult(study_uid=study_uid, events_recorded=n, exam_completed=after is not None and after.state == "completed",
                      already=already)


def _wake(agent: "Agent") -> None:
    with agent.pipeline.new_events:
        agent.pipeline.new_events.notify_all()


# ------------------------------------------------------------------------------------------ the app
def create_app(agent: Optional["Agent"] = None, *, requirements: Optional[Callable[[Optional[str]], Any]] = None) -> FastAPI:
    """The API for one agent. `create_app(None)` builds the same routes for publishing the schema."""
    docs = bool(agent is not None and agent.config.api.docs)  # off by default: Swagger UI loads a CDN script
    app = FastAPI(title="scanside agent API", version=_version(),
                  description="Scanner-side MRI inference agent: health, metrics, exams, alerts, live events. "
                              "No patient name, ID, birth date or accession number is ever returned.",
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None)
    notifier = EventNotifier()
    app.state.notifier = notifier
    app.state.agent = agent
    token: Optional[str] = None
    required = False
    index: Optional[ExamIndex] = None
    if agent is not None:
        token = agent.config.api.token_value()
        required = token_required(agent.config.api.host, token)
        if required and not token:
            raise RuntimeError("api.token is required when api.host is not a loopback address")
        index = ExamIndex(agent.store)
        from scanside.agent.outputs.sinks import CallbackSink

        app.state.sink = CallbackSink("api", notifier.notify)
        agent.sinks.add(app.state.sink, from_now=True)
    app.state.index = index
    heartbeat = agent.config.api.sse_heartbeat_s if agent is not None else 15.0
    requirements = requirements or profile_requirements(agent)
    security = HTTPBearer(auto_error=False, description="required when the agent listens beyond loopback, or a token is set")

    def authorised(request: Request, creds: Optional[HTTPAuthorizationCredentials]) -> bool:
        if not required:
            return True
        presented = creds.credentials if creds else bearer(request.headers.get("authorization"))
        return token_matches(presented, token) or token_matches(request.cookies.get(COOKIE), token)

    if agent is not None:
        from scanside.agent.service.apiguard import ApiGuard

        cfg = agent.config.api
        app.add_middleware(ApiGuard, bind_host=cfg.host, allowed_hosts=cfg.allowed_hosts, max_body_bytes=cfg.max_body_bytes,
                           authorised=lambda scope: authorised(Request(scope), None), docs=docs)

    def auth(request: Request, creds: Optional[HTTPAuthorizationCredentials] = Depends(security)) -> None:
        if not authorised(request, creds):
            raise HTTPException(401, "bearer token required", headers={"WWW-Authenticate": "Bearer"})

    def need_agent() -> "Agent":
        if agent is None:  # pragma: no cover - schema-only app
            raise HTTPException(503, "no agent")
        return agent

    def need_index() -> ExamIndex:
        if index is None:  # pragma: no cover
            raise HTTPException(503, "no agent")
        return index

    def valid_uid(study_uid: str) -> str:
        if len(study_uid) > 64 or not UID_RE.match(study_uid):
            raise HTTPException(404, "no such exam")  # also every '..', '/', '%2F' trick
        return study_uid

    # -------------------------------------------------------------- health, metrics
    @app.get("/healthz", response_model=Health, tags=["operations"])
    def healthz() -> Health:
        return Health(version=_version())

    @app.get("/readyz", response_model=Readiness, tags=["operations"], responses={503: {"model": Readiness}},
             dependencies=[Depends(auth)])
    def readyz(response: Response) -> Readiness:
        r = readiness(need_agent())
        if not r.ready:
            response.status_code = 503
        return r

    @app.get("/metrics", response_class=PlainTextResponse, tags=["operations"], dependencies=[Depends(auth)])
    def metrics() -> Response:
        from scanside.agent.service.metrics import CONTENT_TYPE

        return Response(need_agent().metrics.exposition(), media_type=CONTENT_TYPE)

    # -------------------------------------------------------------- exams and alerts
    @app.get("/v1/exams", response_model=list[ExamBrief], tags=["exams"], dependencies=[Depends(auth)])
    def list_exams(limit: int = Query(50, ge=1, le=1000)) -> list[ExamBrief]:
        return need_index().list_exams(limit)

    @app.get("/v1/exams/current", response_model=Optional[ExamView], tags=["exams"], dependencies=[Depends(auth)])
    def current_exam() -> Optional[ExamView]:
        idx = need_index()
        uid = idx.current()
        return exam_view(need_agent().store, uid, idx, requirements) if uid else None

    @app.get("/v1/image-checks", response_model=Check, tags=["exams"], dependencies=[Depends(auth)])
    def image_checks() -> Check:
        """Whether the image models alert yet: "image checks: learning this site (N exams)" in shadow mode."""
        return Check(ok=True, detail=image_checks_line(need_agent()))

    @app.get("/v1/exams/{study_uid}", response_model=ExamView, tags=["exams"], dependencies=[Depends(auth)])
    def get_exam(study_uid: str) -> ExamView:
        view = exam_view(need_agent().store, valid_uid(study_uid), need_index(), requirements)
        if view is None:
            raise HTTPException(404, "no such exam")
        return view

    @app.post("/v1/exams/{study_uid}/done", response_model=DoneResult, tags=["exams"], dependencies=[Depends(auth)])
    def post_exam_done(study_uid: str) -> DoneResult:
        idx = need_index()
        uid = valid_uid(study_uid)
        if idx.brief(uid) is None:
            raise HTTPException(404, "no such exam")
        return exam_done(need_agent(), uid, idx)

    @app.get("/v1/alerts", response_model=list[Alert], tags=["alerts"], dependencies=[Depends(auth)])
    def list_alerts(open: bool = False, unassigned: bool = False, study_uid: Optional[str] = None) -> list[Alert]:
        return need_index().list_alerts(open_only=open, unassigned=unassigned,
                                        study_uid=valid_uid(study_uid) if study_uid else None)

    @app.get("/v1/dead-letters", response_model=list[DeadLetter], tags=["outputs"], dependencies=[Depends(auth)])
    def list_dead_letters(output: Optional[str] = None) -> list[DeadLetter]:
        """Events an output (webhook, dicom) gave up on, oldest first per output (scanside.agent.outputs.retry)."""
        return [DeadLetter(output=r["sink"], seq=r["seq"], key=r["key"], reason=r["reason"], detail=r["detail"] or "",
                           created=r["created"]) for r in need_agent().store.dead_letters(output)]

    @app.post("/v1/alerts/{alert_id}/ack", response_model=AckResult, tags=["alerts"], dependencies=[Depends(auth)])
    def ack_alert(alert_id: str, body: Optional[AckRequest] = None) -> AckResult:
        ag, idx = need_agent(), need_index()
        if not ALERT_ID_RE.match(alert_id):
            raise HTTPException(404, "no such alert")
        alert = idx.alert(alert_id)
        if alert is None:
            raise HTTPException(404, "no such alert")
        by = (body.by or "").strip() if body else ""
        if by and not BY_RE.match(by):
            raise HTTPException(422, "'by' takes a short user name (letters, digits, space, . ' -)")
        event = AlertAcknowledged(key=f"alert_acknowledged:{alert_id}", alert_id=alert_id, study_uid=alert.study_uid,
                                  by=by or None)
        with ag.store.transaction():
            seq = ag.store.append_event(event)
        if seq is not None:
            _wake(ag)
        return AckResult(alert_id=alert_id, acknowledged=True, already=seq is None, seq=seq)

    # -------------------------------------------------------------- live events
    @app.get("/v1/events", tags=["events"], dependencies=[Depends(auth)],
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "server-sent events: `id` is the event seq, `event` its type, `data` its JSON"}})
    async def events(request: Request, after: Optional[int] = Query(None, ge=0, le=MAX_SEQ, description="start after this seq (else Last-Event-ID, else now)"),
                     study_uid: Optional[str] = None) -> StreamingResponse:
        ag = need_agent()
        study = valid_uid(study_uid) if study_uid else None
        last_id = request.headers.get("last-event-id")
        if after is None and last_id is not None:
            if not SEQ_RE.match(last_id.strip()):  # str.isdigit() takes '²', which int() refuses
                raise HTTPException(400, "Last-Event-ID must be an event seq")
            after = int(last_id)
        if after is None:
            after = await run_in_threadpool(ag.store.last_event_seq)
        return StreamingResponse(_sse(request, ag, notifier, after, study, heartbeat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------------- console
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/console", status_code=307)

    @app.get("/console", include_in_schema=False)
    def console(request: Request, token_param: Optional[str] = Query(None, alias="token")) -> Response:
        if required and token_param is not None:
            if not token_matches(token_param, token):
                return HTMLResponse(_LOGIN.format(msg="That token is not right."), status_code=401)
            resp = RedirectResponse("/console", status_code=303)
            resp.set_cookie(COOKIE, token_param, httponly=True, samesite="strict", path="/")
            return resp
        if not authorised(request, None):
            return HTMLResponse(_LOGIN.format(msg="This console needs the agent's access token."), status_code=401)
        return HTMLResponse((WEB_DIR / "console.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    def static(name: str) -> Callable[[Request], Response]:
        def serve(request: Request) -> Response:
            if not authorised(request, None):
                raise HTTPException(401, "token required")
            return Response((WEB_DIR / name).read_bytes(), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})
        return serve

    for name in STATIC:  # a fixed list: no path from the request ever reaches the file system
        app.add_api_route(f"/console/{name}", static(name), methods=["GET"], include_in_schema=False)

    _document_errors(app, auth)
    return app


_ERROR_BODY = {"application/json": {"schema": {"title": "Error", "type": "object", "required": ["detail"],
                                                "properties": {"detail": {"type": "string", "title": "Detail"}}}}}


def _document_errors(app: FastAPI, auth: Callable[..., None]) -> None:
    """List the 401 (token dependency) and 404 (an exam or alert named in the path or the query) answers
    in the schema: FastAPI documents only what a route declares, not what its dependencies raise."""
    from fastapi.routing import APIRoute

    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        if any(dep.dependency is auth for dep in route.dependencies):
            route.responses.setdefault(401, {"content": _ERROR_BODY, "description": "bearer token missing or wrong"})
        params = {p.name for p in (*route.dependant.path_params, *route.dependant.query_params)}
        if params & {"study_uid", "alert_id"}:
            route.responses.setdefault(404, {"content": _ERROR_BODY, "description": "no such exam or alert"})


def openapi_schema() -> dict[str, Any]:
    """The published schema (openapi.json at the repository root; `scanside schema openapi`)."""
    return create_app(None).openapi()


_LOGIN = """<!doctype html><meta charset="utf-8"><title>scanside console</title>
<body style="font:28px system-ui;background:#111;color:#fff;padding:2em">
<p>{msg}</p><form method="get" action="/console"><input name="token" type="password" autofocus
style="font-size:28px" aria-label="access token"> <button style="font-size:28px">Open</button></form></body>"""


async def _sse(request: Request, agent: "Agent", notifier: EventNotifier, after: int, study: Optional[str],
               heartbeat: float) -> AsyncIterator[str]:
    cursor = after
    yield "retry: 2000\n\n"
    while not notifier.closed:
        waiter = notifier.register()  # before reading, so an event landing in between still wakes us
        try:
            batch = await run_in_threadpool(agent.store.events_after, cursor, 200, study)
            if batch:
                for ev in batch:
                    cursor = ev.seq or cursor
                    yield f"id: {cursor}\nevent: {ev.type}\ndata: {ev.model_dump_json()}\n\n"
                continue
            try:
                await asyncio.wait_for(waiter[1].wait(), timeout=heartbeat)
            except asyncio.TimeoutError:
                yield ": keepalive\n\n"
        finally:
            notifier.unregister(waiter)
        if await request.is_disconnected():
            return


def profile_requirements(agent: Optional["Agent"]) -> Callable[[Optional[str]], Optional[list[Requirement]]]:
    """The checklist lines of the active protocol profile (its required series), when checks are on."""

    def requirements(_profile: Optional[str]) -> Optional[list[Requirement]]:
        checker = agent.pipeline.protocol if agent is not None else None
        profile = checker.profile if checker is not None else None
        if profile is None:
            return None
        try:
            return [Requirement(key=name, title=req.what, labels=list(req.labels), other_kinds=list(req.other_kinds),
                                planes=list(req.planes), b_min=req.b_min)
                    for name, req in profile.required.items() if req.enabled]
        except Exception as exc:  # the console must still show what was seen
            log.warning("protocol checklist unavailable: %s", exc)
            return None

    return requirements


# ------------------------------------------------------------------------------------------ server
class ApiServer(Worker):
    """uvicorn in a daemon thread; `start()` returns once it listens (or raises saying why not)."""

    def __init__(self, agent: "Agent", host: Optional[str] = None, port: Optional[int] = None):
        import uvicorn

        self.agent = agent
        self.app = create_app(agent)
        cfg = agent.config.api
        self.host = host or cfg.host
        from scanside.agent.service.apiguard import guarded_protocol

        self.config = uvicorn.Config(self.app, host=self.host, port=cfg.port if port is None else port,
                                     log_level="warning", access_log=False, log_config=None, lifespan="off",
                                     timeout_graceful_shutdown=2, timeout_keep_alive=5, server_header=False,
                                     http=guarded_protocol(cfg.max_connections, cfg.header_timeout_s, cfg.body_timeout_s),
                                     limit_concurrency=cfg.max_connections + 8,
                                     # asyncio accepts up to `backlog` queued connections per wake-up before the
                                     # ones over the cap are closed: this bounds the descriptors a flood holds
                                     backlog=2 * cfg.max_connections,
                                     h11_max_incomplete_event_size=16 * 1024)
        self.server = uvicorn.Server(self.config)
        self.worker = WorkerThread("scanside-api", self._serve, wake=self._shutdown)
        self._error: Optional[BaseException] = None

    def start(self, timeout: float = 15.0) -> "ApiServer":
        self.worker.start()
        end = threading.Event()
        waited = 0.0
        while not self.server.started and self.worker.alive() and waited < timeout:
            end.wait(0.02)
            waited += 0.02
        if not self.server.started:
            self.stop()
            raise RuntimeError(f"the API could not listen on {self.host}:{self.config.port}"
                               f"{f' ({self._error!r})' if self._error else ' (address in use?)'}")
        return self

    def _serve(self, _stop: threading.Event) -> None:  # uvicorn's own loop; _shutdown ends it
        try:
            self.server.run()
        except BaseException as exc:  # uvicorn exits the thread with SystemExit when it cannot bind
            self._error = exc

    @property
    def port(self) -> int:
        for server in getattr(self.server, "servers", []) or []:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self.config.port)

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    name = "api"

    def _shutdown(self) -> None:
        self.app.state.notifier.close()
        self.server.should_exit = True

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        try:
            self.agent.sinks.sinks.remove(self.app.state.sink)
        except ValueError:
            pass
