"""A web dashboard: an ASGI app to mount in the host's app, or ``tasklib-sqla dashboard``.

    app.mount("/tasks-admin", Dashboard(engine, model=AppTask))      # FastAPI / Starlette
    tasklib-sqla dashboard --port 8080                              # standalone, on 127.0.0.1

Pages: the overview (queues by state, throughput and failures per minute over the last hour,
tasks no live worker can run), the task list (filters, keyset pages), a task (arguments,
result, every attempt's error) and the workers. Actions (retry, cancel, purge) are POST forms
with a CSRF token (a SameSite=Strict cookie matched against the form), and are absent in
read-only mode. Everything is rendered on the server and escaped: task arguments are user
data. The pages carry no script at all, and a Content-Security-Policy that allows none.
Mounted, authentication is the host app's middleware; standalone, ``password`` (from
``TASKLIB_DASHBOARD_PASSWORD``) turns on HTTP basic authentication.

The app depends on nothing but the library: a plain ASGI callable.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import parse_qs, urlencode

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from . import admin
from .client import LoopEngines
from .config import Config
from .inspection import cancel, fetch_task, retry
from .models import FINISHED_STATES, Task, TaskMixin, TaskState
from .queries import COMPLETED, FAILED
from .urls import async_url

# The ASGI callable's types, as ASGI servers and frameworks spell them.
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

CSRF_COOKIE = "tasklib_csrf"
STATES = [s.value for s in TaskState]
_FINISHED = {s.value for s in FINISHED_STATES}
PAGE = 50

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.4em;align-items:center}
header a{color:#cfd6e4;text-decoration:none}header a:hover{color:#fff}
header strong{margin-right:1em}main{padding:1em 1.2em;max-width:1200px}
table{border-collapse:collapse;background:#fff;margin:.6em 0 1.2em;width:100%}
th,td{border:1px solid #dde1e8;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef0f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#fff;border:1px solid #dde1e8;padding:.6em;overflow:auto;white-space:pre-wrap}
.state{padding:.1em .5em;border-radius:.8em;font-size:.9em}
.pending{background:#e3ecff}.running{background:#fff2c6}.completed{background:#dcf5e3}
.failed{background:#fde0e0}.cancelled{background:#eee}
form.inline{display:inline}button{cursor:pointer;padding:.3em .9em}
.note{background:#fff8d6;border:1px solid #eedc8a;padding:.5em .8em}
.muted{color:#6b7385}.cards{display:flex;gap:1em;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde1e8;padding:.6em 1em;min-width:9em}
.card b{display:block;font-size:1.5em}
"""


class Response:
    def __init__(
        self,
        body: str = "",
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        content_type: str = "text/html; charset=utf-8",
    ) -> None:
        self.body = body.encode()
        self.status = status
        self.headers = {"content-type": content_type, **(headers or {})}

    async def send(self, send: Send) -> None:
        raw = [(k.encode(), v.encode()) for k, v in self.headers.items()]
        raw += [
            (b"content-security-policy", _CSP),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})


_CSP = (
    b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class Request:
    def __init__(self, scope: Scope, body: bytes) -> None:
        self.scope = scope
        self.method: str = scope["method"]
        self.root: str = scope.get("root_path", "")
        path: str = scope["path"]
        # Starlette hands mounted apps the full path with the mount point as root_path.
        self.path = path[len(self.root) :] if path.startswith(self.root) else path
        self.path = self.path or "/"
        self.query = {
            k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()
        }
        self.headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        form = parse_qs(body.decode()) if self.method == "POST" else {}
        self.form = {k: v[-1] for k, v in form.items()}
        self.cookies: dict[str, str] = {}
        for part in self.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name:
                self.cookies[name] = value

    def url(self, path: str, **query: str | None) -> str:
        q = {k: v for k, v in query.items() if v}
        return self.root + path + ("?" + urlencode(q) if q else "")


def per_minute(model: type[TaskMixin]) -> Any:
    """Tasks completed and failed in each minute of the last hour (the overview's chart)."""
    minute = func.date_trunc("minute", model.completed_at)
    return (
        select(
            minute,
            func.count().filter(model.state == COMPLETED),
            func.count().filter(model.state == FAILED),
        )
        .where(
            # The state lets the history's index (state, completed_at) read the last hour;
            # inlined, like the worker's, so that every plan knows which states it reads.
            model.state.in_([COMPLETED, FAILED]),
            model.completed_at > func.now() - text("interval '60 minutes'"),
        )
        .group_by(minute)
        .order_by(minute)
    )


class Dashboard:
    """The dashboard as an ASGI app, for one task table.

    ``engine``: the app's ``AsyncEngine`` or a database URL (the dashboard then opens a small
    pool of its own, closed by :meth:`dispose`).
    """

    def __init__(
        self,
        engine: AsyncEngine | str,
        *,
        model: type[TaskMixin] = Task,
        read_only: bool = False,
        password: str | None = None,
        title: str = "tasklib-sqla",
        notify_channel: str | None = None,
    ) -> None:
        if isinstance(engine, str):
            url = async_url(engine)
            # A small pool per event loop, closed with its loop: a server runs one loop, test
            # clients run theirs, and connections must never cross from one to another.
            self._engines: LoopEngines | None = LoopEngines(
                lambda: create_async_engine(url, pool_size=2, max_overflow=2)
            )
            self._callers: AsyncEngine | None = None
        else:
            self._engines, self._callers = None, engine
        self.model = model
        self.read_only = read_only
        self.password = password
        self.title = title
        self.channel = notify_channel or Config.from_env().notify_channel

    @property
    def _engine(self) -> AsyncEngine:
        if self._engines is not None:
            return self._engines.get(None)
        assert self._callers is not None
        return self._callers

    def _sessions(self) -> AsyncSession:
        return AsyncSession(self._engine, expire_on_commit=False)

    async def dispose(self) -> None:
        """Close the connections this dashboard opened (never the caller's engine's)."""
        if self._engines is not None:
            await self._engines.dispose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = Request(scope, body)
        response = await self._respond(request)
        await response.send(send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.dispose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- routing -----------------------------------------------------------------------------

    async def _respond(self, req: Request) -> Response:
        if self.password is not None and not self._authorized(req):
            return Response(
                "authentication required",
                401,
                {"www-authenticate": 'Basic realm="tasklib-sqla", charset="UTF-8"'},
                "text/plain; charset=utf-8",
            )
        token = req.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        try:
            response = await self._route(req, token)
        except (ValueError, LookupError) as exc:
            response = self._page(req, "Error", f"<p class=note>{escape(str(exc))}</p>", 400)
        if req.cookies.get(CSRF_COOKIE) != token:
            response.headers["set-cookie"] = (
                f"{CSRF_COOKIE}={token}; Path={req.root or '/'}; HttpOnly; SameSite=Strict"
            )
        return response

    async def _route(self, req: Request, token: str) -> Response:
        parts = [p for p in req.path.split("/") if p]
        if req.method == "POST":
            return await self._action(req, token, parts)
        if req.method not in ("GET", "HEAD"):
            return Response("method not allowed", 405, {"allow": "GET, POST"}, "text/plain")
        if not parts:
            return await self._overview(req, token)
        if parts == ["tasks"]:
            return await self._tasks(req)
        if len(parts) == 2 and parts[0] == "tasks":
            return await self._task(req, token, parts[1])
        if parts == ["workers"]:
            return await self._workers(req)
        return self._page(req, "Not found", "<p>No such page.</p>", 404)

    def _authorized(self, req: Request) -> bool:
        scheme, _, value = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            _, _, given = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False
        assert self.password is not None
        return hmac.compare_digest(given.encode(), self.password.encode())

    # -- actions -----------------------------------------------------------------------------

    async def _action(self, req: Request, token: str, parts: list[str]) -> Response:
        if self.read_only:
            return Response("the dashboard is read-only", 403, content_type="text/plain")
        sent = req.form.get("csrf", "")
        if not (req.cookies.get(CSRF_COOKIE) and hmac.compare_digest(sent, token)):
            return Response("CSRF check failed: reload the page", 403, content_type="text/plain")
        if len(parts) == 3 and parts[0] == "tasks" and parts[2] in ("retry", "cancel"):
            task_id = _task_id(parts[1])
            async with self._sessions() as session, session.begin():
                if parts[2] == "retry":
                    done = await session.run_sync(
                        lambda s: retry(s, self.model, task_id, self.channel)
                    )
                else:
                    done = await session.run_sync(
                        lambda s: cancel(s, self.model, task_id, f"{self.channel}_done")
                    )
            note = f"{parts[2]}: {'done' if done else 'nothing to do in this state'}"
            return _redirect(req.url(f"/tasks/{task_id}", note=note))
        if parts == ["purge"]:
            older = admin.parse_duration(req.form.get("older_than", ""))
            states = [s for s in req.form.get("states", "").split(",") if s] or [
                s.value for s in FINISHED_STATES
            ]
            n = await admin.purge_in_batches(self._engine, self.model, older, states)
            return _redirect(req.url("/", note=f"purged {n} tasks"))
        return Response("not found", 404, content_type="text/plain")

    # -- pages -------------------------------------------------------------------------------

    async def _overview(self, req: Request, token: str) -> Response:
        st = await admin.queue_status(self._engine, self.model)
        minutes = await self._per_minute()
        cards = [
            ("running", st.running),
            ("expired leases", st.expired_leases),
            ("failed, last hour", st.failed_last_hour),
            ("done/min, 5 min", f"{st.throughput_per_minute.get('5m', 0):.1f}"),
            ("workers alive", len(st.workers)),
        ]
        html = [_note(req)]
        html.append(
            "<div class=cards>"
            + "".join(f"<div class=card><b>{escape(str(v))}</b>{escape(k)}</div>" for k, v in cards)
            + "</div>"
        )
        rows = []
        for q in st.queues:
            cells = [f"<td>{escape(q.queue)}</td>"]
            for state in STATES:
                n = getattr(q, state)
                if st.estimated and state in _FINISHED:
                    n = f"~{n}"  # sampled: see admin.queue_status
                link = req.url("/tasks", queue=q.queue, state=state)
                cells.append(f'<td class=n><a href="{escape(link)}">{n}</a></td>')
            cells.append(f"<td class=n>{q.due}</td><td>{admin.age(q.oldest_due_seconds)}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        head = "".join(f"<th>{s}</th>" for s in ["queue", *STATES, "due now", "oldest due"])
        html.append(f"<h2>Queues</h2><table><tr>{head}</tr>{''.join(rows)}</table>")
        if st.estimated:
            html.append(
                "<p class=note>~: estimated from a sample of the table (it holds more than "
                f"{admin.EXACT_LIMIT:,} tasks); the other counts are exact.</p>"
            )
        if st.paused:
            html.append(
                "<h2>Paused queues</h2><p class=note>No worker claims from these until they are "
                "resumed; running tasks finish.</p><ul>"
                + "".join(f"<li>{escape(q)}</li>" for q in st.paused)
                + "</ul>"
            )
        if st.limits:
            head = "".join(
                f"<th>{h}</th>"
                for h in ["kind", "key", "concurrency", "running", "rate", "started in period"]
            )
            body = "".join(
                f"<tr><td>{escape(lim.kind)}</td><td>{escape(lim.key)}</td>"
                f"<td class=n>{lim.concurrency or '-'}</td><td class=n>{lim.running}</td>"
                f"<td>{'-' if lim.rate is None else f'{lim.rate} / {lim.per_seconds:g} s'}</td>"
                f"<td class=n>{'-' if lim.rate is None else lim.recent_starts}</td></tr>"
                for lim in st.limits
            )
            html.append(f"<h2>Limits</h2><table><tr>{head}</tr>{body}</table>")
        if st.unserved:
            items = "".join(
                f"<li>{escape(name)}: {n} pending</li>" for name, n in sorted(st.unserved.items())
            )
            html.append(
                "<h2>Waiting for a worker</h2><p class=note>No live worker registers these "
                f"task names for their queue; they stay pending until one does.</p><ul>{items}</ul>"
            )
        html.append("<h2>Last hour, per minute</h2>" + _chart(minutes))
        if not self.read_only:
            html.append(
                f'<h2>Purge</h2><form method=post action="{escape(req.url("/purge"))}">'
                f"{_csrf(token)}finished tasks older than "
                '<input name=older_than value="30d" size=6> in states '
                '<input name=states value="completed,failed,cancelled" size=28> '
                "<button>Purge</button></form>"
            )
        return self._page(req, "Overview", "".join(html))

    async def _per_minute(self) -> list[tuple[datetime, int, int]]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(per_minute(self.model))
            return [(r[0], int(r[1]), int(r[2])) for r in rows]

    async def _tasks(self, req: Request) -> Response:
        state, queue, name = (req.query.get(k) or None for k in ("state", "queue", "name"))
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        lines = await admin.list_tasks(
            self._engine,
            self.model,
            states=[state] if state else (),
            queue=queue,
            name=name,
            after=req.query.get("after"),
            limit=PAGE,
        )
        options = "".join(
            f"<option{' selected' if s == state else ''}>{s}</option>" for s in ["", *STATES]
        )
        html = [
            f'<form method=get action="{escape(req.url("/tasks"))}">'
            f"state <select name=state>{options}</select> "
            f'queue <input name=queue value="{escape(queue or "")}" size=12> '
            f'name <input name=name value="{escape(name or "")}" size=24> '
            "<button>Filter</button></form>"
        ]
        rows = "".join(
            "<tr>"
            f'<td><a href="{escape(req.url("/tasks/" + ln.id))}">{escape(ln.id[:8])}</a></td>'
            f"<td>{escape(ln.name)}</td><td>{escape(ln.queue)}</td><td>{_state(ln.state)}</td>"
            f"<td class=n>{ln.attempts}</td><td>{escape(ln.created_at[:19])}</td>"
            f"<td>{escape((ln.error or '')[:120])}</td></tr>"
            for ln in lines
        )
        head = "<tr><th>id</th><th>name</th><th>queue</th><th>state</th><th>attempts</th>"
        head += "<th>created</th><th>error</th></tr>"
        html.append(f"<table>{head}{rows}</table>" if lines else "<p>No tasks match.</p>")
        if len(lines) == PAGE:
            nxt = req.url(
                "/tasks", state=state, queue=queue, name=name, after=admin.cursor_of(lines[-1])
            )
            html.append(f'<p><a href="{escape(nxt)}">Next page</a></p>')
        return self._page(req, "Tasks", "".join(html))

    async def _task(self, req: Request, token: str, raw_id: str) -> Response:
        task_id = _task_id(raw_id)
        async with self._sessions() as session:
            row = await session.run_sync(lambda s: fetch_task(s, self.model, task_id))
        if row is None:
            return self._page(req, "Not found", "<p>No such task.</p>", 404)
        info = admin.describe_task(row)
        html = [_note(req)]
        fields = [
            "id",
            "name",
            "queue",
            "priority",
            "state",
            "attempts",
            "max_retries",
            "scheduled_at",
            "created_at",
            "started_at",
            "completed_at",
            "worker_id",
            "locked_until",
            "parent_id",
        ]
        cells = "".join(
            f"<tr><th>{k}</th><td>"
            + (_state(info[k]) if k == "state" else escape(_text(info.get(k))))
            + "</td></tr>"
            for k in fields
            if k in info
        )
        html.append(f"<table>{cells}</table>")
        if not self.read_only:
            buttons = []
            if info["state"] in ("failed", "cancelled"):
                buttons.append(("retry", "Retry"))
            if info["state"] in ("pending", "running"):
                buttons.append(("cancel", "Cancel"))
            for action, label in buttons:
                url = req.url(f"/tasks/{task_id}/{action}")
                buttons_html = f"{_csrf(token)}<button name=action value={action}>{label}</button>"
                html.append(
                    f'<form class=inline method=post action="{escape(url)}">{buttons_html}</form> '
                )
        html.append(f"<h2>Arguments</h2><pre>{escape(_json(info.get('args')))}</pre>")
        html.append(f"<h2>Result</h2><pre>{escape(_json(info.get('result')))}</pre>")
        errors = info.get("errors") or []
        html.append(f"<h2>Attempts with errors ({len(errors)})</h2>")
        for e in errors:
            head = f"attempt {e.get('attempt')} · {e.get('at')} · {e.get('worker_id')}"
            html.append(
                f"<h3>{escape(head)}</h3><p><b>{escape(str(e.get('type')))}</b>: "
                f"{escape(str(e.get('message')))}</p>"
                + (f"<pre>{escape(str(e['traceback']))}</pre>" if e.get("traceback") else "")
            )
        return self._page(req, f"Task {info['name']}", "".join(html))

    async def _workers(self, req: Request) -> Response:
        workers = await admin.live_workers(self._engine, self.model)
        rows = "".join(
            f"<tr><td>{escape(w.id)}</td><td>{escape(w.host)}</td><td class=n>{w.pid}</td>"
            f"<td>{escape(', '.join(w.queues) or 'all')}</td><td class=n>{w.running}</td>"
            f"<td class=n>{w.concurrency}</td><td>{admin.age(w.seen_seconds_ago)} ago</td>"
            f"<td>{admin.age(w.started_seconds_ago)}</td><td>{escape(w.version)}</td></tr>"
            for w in workers
        )
        head = "<tr><th>worker</th><th>host</th><th>pid</th><th>queues</th><th>running</th>"
        head += "<th>concurrency</th><th>last seen</th><th>up</th><th>version</th></tr>"
        body = f"<table>{head}{rows}</table>" if workers else "<p>No live worker.</p>"
        return self._page(req, "Workers", body)

    def _page(self, req: Request, title: str, body: str, status: int = 200) -> Response:
        nav = "".join(
            f'<a href="{escape(req.url(path))}">{label}</a>'
            for path, label in [("/", "Overview"), ("/tasks", "Tasks"), ("/workers", "Workers")]
        )
        mode = " <span class=muted>(read-only)</span>" if self.read_only else ""
        html = (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{escape(title)} · {escape(self.title)}</title>"
            f"<style>{CSS}</style></head><body><header><strong>{escape(self.title)}</strong>"
            f"{nav}{mode}</header><main><h1>{escape(title)}</h1>{body}</main></body></html>"
        )
        return Response(html, status)


# -- helpers -----------------------------------------------------------------------------------


def _task_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise LookupError(f"not a task id: {raw!r}") from None


def _redirect(location: str) -> Response:
    return Response("", 303, {"location": location}, "text/plain")


def _csrf(token: str) -> str:
    return f'<input type=hidden name=csrf value="{escape(token)}">'


def _note(req: Request) -> str:
    note = req.query.get("note")
    return f"<p class=note>{escape(note)}</p>" if note else ""


def _state(state: str) -> str:
    s = escape(state)
    return f"<span class='state {s}'>{s}</span>"


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _chart(points: list[tuple[datetime, int, int]]) -> str:
    """Completed (green) and failed (red) tasks per minute, as an inline SVG bar chart."""
    if not points:
        return "<p class=muted>Nothing finished in the last hour.</p>"
    width, height, bar = 720, 140, 720 / 60
    top = max(max(c, f) for _, c, f in points) or 1
    first = points[-1][0].timestamp() - 59 * 60
    bars = []
    for minute, completed, failed in points:
        x = (minute.timestamp() - first) / 60 * bar
        for i, (n, color) in enumerate(((completed, "#3aa65a"), (failed, "#d64545"))):
            h = n / top * (height - 20)
            bars.append(
                f'<rect x="{x + i * bar / 2:.1f}" y="{height - h:.1f}" width="{bar / 2 - 1:.1f}" '
                f'height="{h:.1f}" fill="{color}"><title>{minute:%H:%M} '
                f"{'failed' if i else 'completed'}: {n}</title></rect>"
            )
    return (
        f'<svg role=img aria-label="tasks finished per minute" width="{width}" '
        f'height="{height}" style="background:#fff;border:1px solid #dde1e8">'
        f'<text x="4" y="14" font-size="11" fill="#6b7385">max {top}/min</text>'
        + "".join(bars)
        + "</svg>"
    )
