"""The ``tasklib-sqla`` command: run a worker, or print the schema as SQL.

    tasklib-sqla worker myapp.tasks                 tasks registered with @task in myapp.tasks
    tasklib-sqla worker myapp.tasks:registry        a TaskRegistry of one's own
    tasklib-sqla migrate [--sql]                    create/upgrade the library's own tables
    tasklib-sqla status [--json] [--watch 2]        queues, leases, throughput, live workers
    tasklib-sqla healthcheck [--no-worker]          exit 0 when healthy, 1 (one line) if not
    tasklib-sqla tasks list|show|retry|cancel|purge  look at and act on single tasks
    tasklib-sqla queues list|pause|resume [QUEUE]    steer queues for every worker
    tasklib-sqla schema [--model myapp.models:Job]  the DDL, for teams without Alembic

The database URL comes from ``--database-url``, ``TASKLIB_DATABASE_URL`` or ``DATABASE_URL``;
every other ``Config`` field from its ``TASKLIB_*`` variable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from . import logs
from .config import Config
from .errors import DB_ERRORS, one_line
from .exceptions import ConfigError, TaskLibError, WorkerError
from .models import Task, TaskMixin
from .registry import TaskRegistry, default_registry
from .schema import schema_sql
from .worker import VERSION, TaskWorker


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tasklib-sqla",
        description=__doc__.split("\n\n")[0],
        epilog="Every command reads the database URL from --database-url, TASKLIB_DATABASE_URL "
        "or DATABASE_URL, and every Config field from its TASKLIB_* variable.",
    )
    p.add_argument("--version", action="version", version=f"tasklib-sqla {VERSION}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    w = sub.add_parser("worker", help="run a worker")
    w.add_argument("target", help="module[:attr] that registers the tasks (attr: a TaskRegistry)")
    w.add_argument(
        "--concurrency", "-c", type=int, default=10, help="tasks at once (default: %(default)s)"
    )
    w.add_argument(
        "--queue",
        "-q",
        action="append",
        dest="queues",
        metavar="QUEUE",
        help="a queue to work (repeatable); default: every queue",
    )
    w.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="claim only rows whose column has this value (repeatable; a per-tenant pool)",
    )
    w.add_argument("--burst", action="store_true", help="exit once no task is due")
    w.add_argument("--database-url", help="default: TASKLIB_DATABASE_URL or DATABASE_URL")
    w.add_argument("--model", help="module:Class of a TaskMixin model (default: tasklib's Task)")
    w.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("TASKLIB_LOG_FORMAT", "text"),
        help="text, or one JSON object per line with task_id, task_name, attempt and "
        "worker_id fields (default: %(default)s, or TASKLIB_LOG_FORMAT)",
    )
    w.add_argument(
        "--log-level",
        default=os.environ.get("TASKLIB_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (default: %(default)s, or TASKLIB_LOG_LEVEL)",
    )
    m = sub.add_parser(
        "migrate",
        help="create or upgrade the library's own tasks table (its shipped Alembic migrations)",
    )
    m.add_argument("--database-url", help="default: TASKLIB_DATABASE_URL or DATABASE_URL")
    m.add_argument("--revision", default="head", help="the revision to reach (default: head)")
    m.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    m.add_argument("--downgrade", metavar="REVISION", help="downgrade to REVISION (base: drop)")
    m.add_argument("--current", action="store_true", help="print the database's revision")
    st = sub.add_parser("status", help="queues by state, leases, throughput, live workers")
    st.add_argument("--database-url", help="default: TASKLIB_DATABASE_URL or DATABASE_URL")
    st.add_argument("--model", help="module:Class of a TaskMixin model (default: tasklib's Task)")
    st.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    st.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    hc = sub.add_parser(
        "healthcheck",
        help="exit 0 if the database answers, the table is there and a worker is alive",
    )
    hc.add_argument("--database-url", help="default: TASKLIB_DATABASE_URL or DATABASE_URL")
    hc.add_argument("--model", help="module:Class of a TaskMixin model (default: tasklib's Task)")
    hc.add_argument(
        "--no-worker", action="store_true", help="healthy without a live worker (for app pods)"
    )
    db = sub.add_parser(
        "dashboard",
        help="serve the web dashboard (password from TASKLIB_DASHBOARD_PASSWORD)",
    )
    db.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    db.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    db.add_argument("--read-only", action="store_true", help="no retry, cancel or purge")
    db.add_argument("--database-url", help="default: TASKLIB_DATABASE_URL or DATABASE_URL")
    db.add_argument("--model", help="module:Class of a TaskMixin model (default: tasklib's Task)")
    tk = sub.add_parser("tasks", help="list, show, retry, cancel or purge tasks")
    tsub = tk.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="default: TASKLIB_DATABASE_URL or DATABASE_URL")
    common.add_argument("--model", help="module:Class of a TaskMixin model (default: Task)")
    ls = tsub.add_parser("list", parents=[common], help="tasks, newest first")
    ls.add_argument("--state", action="append", default=[], help="repeatable")
    ls.add_argument("--queue")
    ls.add_argument("--name")
    ls.add_argument("--since", help="created within, e.g. 15m, 2h, 7d")
    ls.add_argument("--after", help="the cursor printed under the previous page")
    ls.add_argument("--limit", type=int, default=50, help="tasks per page (default: 50)")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    for action, what in (
        ("show", "one task: arguments, result, every attempt's error"),
        ("retry", "a failed or cancelled task back to pending"),
        ("cancel", "a pending task will not run; a running one is stopped"),
    ):
        one = tsub.add_parser(action, parents=[common], help=what)
        one.add_argument("id")
    pg = tsub.add_parser("purge", parents=[common], help="delete finished tasks, in batches")
    pg.add_argument("--older-than", required=True, help="e.g. 30d, 12h")
    pg.add_argument(
        "--state", action="append", default=[], help="completed, failed, cancelled (repeatable)"
    )
    pg.add_argument("--batch", type=int, default=1000, help="rows per statement (1000)")
    qs = sub.add_parser("queues", help="list, pause or resume queues (for every worker)")
    qsub = qs.add_subparsers(dest="action", required=True)
    qsub.add_parser("list", parents=[common], help="the paused and resumed queues")
    for action, what in (
        ("pause", "no worker claims from the queue; running tasks finish"),
        ("resume", "workers claim from the queue again"),
    ):
        one = qsub.add_parser(action, parents=[common], help=what)
        one.add_argument("queue")
    lm = sub.add_parser("limits", help="list, set or remove cluster-wide limits")
    lsub = lm.add_subparsers(dest="action", required=True)
    lsub.add_parser("list", parents=[common], help="every limit, with what it counts now")
    for action, what in (
        ("set", "limit a queue or a task name (replaces its limit)"),
        ("remove", "remove the limit on a queue or a task name"),
    ):
        one = lsub.add_parser(action, parents=[common], help=what)
        on = one.add_mutually_exclusive_group(required=True)
        on.add_argument("--queue", help="the queue to limit")
        on.add_argument("--name", help="the task name to limit")
        if action == "set":
            one.add_argument("--concurrency", type=int, help="at most N running at once")
            one.add_argument("--rate", type=int, help="at most N starts per --per seconds")
            one.add_argument("--per", type=float, help="the rate's period, in seconds")
    s = sub.add_parser("schema", help="print the schema of the task table as SQL")
    s.add_argument("--model", help="module:Class of a TaskMixin model (default: tasklib's Task)")
    s.add_argument("--channel", default=None, help="NOTIFY channel (default: the Config's)")
    return p


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"cannot import {exc.name!r}: no such module"
    if isinstance(exc, AttributeError):
        return f"cannot find it: {exc}"
    return str(exc)


def load_object(spec: str) -> Any:
    """Import ``module`` or ``module:attr`` given on the command line."""
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())  # like python -m: the current directory's modules
    module = importlib.import_module(module_name)
    if not attr:
        return module
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _model(spec: str | None) -> type[TaskMixin]:
    if spec is None:
        return Task
    model = load_object(spec)
    if not (isinstance(model, type) and issubclass(model, TaskMixin)):
        raise ConfigError(f"{spec} is not a TaskMixin model")
    return model


def _registry(target: str) -> TaskRegistry:
    obj = load_object(target)
    if isinstance(obj, TaskRegistry):
        return obj
    if ":" in target:
        raise ConfigError(f"{target} is not a TaskRegistry")
    return default_registry


def _where(model: type[TaskMixin], pairs: list[str]) -> dict[str, Any]:
    """``--where tenant_id=7`` as ``{"tenant_id": 7}``, each value of its column's type."""
    table: Any = model.__table__  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in table.c:
            raise ConfigError(
                f"--where {pair!r}: give COLUMN=VALUE with a column of {table.name!r} "
                f"({', '.join(table.c.keys())})"
            )
        try:
            kind = table.c[name].type.python_type
            out[name] = raw if kind is str else kind(raw)
        except (NotImplementedError, TypeError, ValueError) as exc:
            raise ConfigError(f"--where {pair!r}: {exc}") from None
    return out


async def _run_worker(args: argparse.Namespace) -> int:
    overrides = {"database_url": args.database_url} if args.database_url else {}
    config = Config.from_env(**overrides)
    if not config.database_url:
        raise ConfigError("no database URL: pass --database-url or set TASKLIB_DATABASE_URL")
    registry = _registry(args.target)
    model = _model(args.model)
    # Without an init() of the app's, the worker installs a client for its tasks' submits.
    worker = TaskWorker(
        config,
        concurrency=args.concurrency,
        queues=args.queues,
        registry=registry,
        model=model,
        burst=args.burst,
        where=_where(model, args.where) if args.where else None,
    )
    await worker.run()
    return 0


#: Exit codes: 1 the worker stopped on a database error; 2 a usage or configuration error.
EXIT_WORKER_ERROR = 1
EXIT_USAGE = 2


def _migrate(args: argparse.Namespace) -> int:
    from .migrate import current, downgrade, migrate

    url = _url(args)
    if args.current:
        sys.stdout.write(current(url) + "\n")
    elif args.downgrade:
        downgrade(url, args.downgrade)
    else:
        sys.stdout.write(migrate(url, args.revision, sql=args.sql))
    return 0


async def _status(args: argparse.Namespace) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine

    from .admin import health, queue_status, render_status
    from .urls import async_url

    engine = create_async_engine(async_url(_url(args)), pool_size=1, connect_args={"timeout": 10})
    try:
        if args.command == "healthcheck":
            problems, workers = await health(
                engine, _model(args.model), need_worker=not args.no_worker
            )
            if problems:
                sys.stdout.write("unhealthy: " + "; ".join(problems) + "\n")
                return EXIT_WORKER_ERROR
            sys.stdout.write(f"ok: {len(workers)} workers alive\n")
            return 0
        while True:
            status = await queue_status(engine, _model(args.model))
            text = json.dumps(status.as_dict()) if args.json else render_status(status)
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: refresh in place
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            if not args.watch:
                return 0
            await asyncio.sleep(args.watch)
    finally:
        await engine.dispose()


#: Usage and configuration mistakes: one line on stderr, exit status 2.
USAGE_ERRORS = (TaskLibError, ValueError, ImportError, AttributeError, OSError)


def _usage_error(exc: BaseException) -> int:
    sys.stderr.write(f"tasklib-sqla: error: {_describe(exc)}\n")
    return EXIT_USAGE


def _guarded(run: Callable[[], int], *, db_prefix: str = "", to_stdout: bool = False) -> int:
    """Run a command: a database error is one line and exit 1, a usage mistake one line and 2."""
    try:
        return run()
    except DB_ERRORS as exc:  # before USAGE_ERRORS: OSError is how an unreachable server fails
        out = sys.stdout if to_stdout else sys.stderr
        out.write(f"{db_prefix or 'tasklib-sqla: error'}: {one_line(exc)}\n")
        return EXIT_WORKER_ERROR
    except USAGE_ERRORS as exc:
        return _usage_error(exc)


def _admin_command(args: argparse.Namespace) -> int:
    # status and healthcheck answer on stdout, errors included: probes read one place.
    prefix = "unhealthy" if args.command == "healthcheck" else ""
    try:
        return _guarded(lambda: asyncio.run(_status(args)), db_prefix=prefix, to_stdout=True)
    except KeyboardInterrupt:
        return 0


def _migrate_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
    return _guarded(lambda: _migrate(args))


def _schema_command(args: argparse.Namespace) -> int:
    try:
        channel = args.channel or Config.from_env().notify_channel
        sys.stdout.write(schema_sql(_model(args.model), channel))
    except USAGE_ERRORS as exc:
        return _usage_error(exc)
    return 0


def _worker_command(args: argparse.Namespace) -> int:
    try:
        logs.configure(args.log_level, args.log_format)
        code = asyncio.run(_run_worker(args))
    except WorkerError as exc:
        logging.getLogger("tasklib_sqla").error("%s", exc)
        code = EXIT_WORKER_ERROR
    except (TaskLibError, ValueError, ImportError, AttributeError) as exc:
        logging.getLogger("tasklib_sqla").error("%s", _describe(exc))
        code = EXIT_USAGE
    logging.shutdown()
    if any(t.name.startswith("tasklib") and t.is_alive() for t in threading.enumerate()):
        # A sync task still runs in a thread that cannot be stopped; its task was handed back
        # (or its lease will expire), so leave now rather than wait for it.
        os._exit(code)
    return code


def _url(args: argparse.Namespace) -> str:
    overrides = {"database_url": args.database_url} if args.database_url else {}
    url = Config.from_env(**overrides).database_url
    if not url:
        raise ConfigError("no database URL: pass --database-url or set TASKLIB_DATABASE_URL")
    return url


async def _tasks(args: argparse.Namespace) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine

    from . import admin
    from .client import TaskClient
    from .urls import async_url

    model = _model(args.model)
    url = async_url(_url(args))
    engine = create_async_engine(url, pool_size=1, connect_args={"timeout": 10})
    client: TaskClient[Any] = TaskClient(Config(database_url=url), model=model, engine=engine)
    try:
        if args.action == "list":
            lines = await admin.list_tasks(
                engine,
                model,
                states=args.state,
                queue=args.queue,
                name=args.name,
                since=admin.parse_duration(args.since) if args.since else None,
                after=args.after,
                limit=args.limit,
            )
            if args.json:
                for line in lines:
                    sys.stdout.write(json.dumps(dataclasses.asdict(line)) + "\n")
            else:
                sys.stdout.write(admin.render_tasks(lines) + "\n")
                if len(lines) == args.limit:
                    sys.stdout.write(f"next page: --after {admin.cursor_of(lines[-1])}\n")
            return 0
        if args.action == "show":
            row = await client.get(args.id)
            if row is None:
                sys.stderr.write(f"tasklib-sqla: no task {args.id}\n")
                return EXIT_WORKER_ERROR
            sys.stdout.write(json.dumps(admin.describe_task(row), indent=2) + "\n")
            return 0
        if args.action in ("retry", "cancel"):
            changed = await getattr(client, args.action)(args.id)
            verb = "retried" if args.action == "retry" else "cancelled"
            sys.stdout.write(f"{verb} {args.id}\n" if changed else f"not {verb}: {args.id}\n")
            return 0 if changed else EXIT_WORKER_ERROR
        states = args.state or ["completed", "failed", "cancelled"]
        n = await admin.purge_in_batches(
            engine, model, admin.parse_duration(args.older_than), states, args.batch
        )
        sys.stdout.write(f"deleted {n} tasks\n")
        return 0
    finally:
        await engine.dispose()


def _tasks_command(args: argparse.Namespace) -> int:
    return _guarded(lambda: asyncio.run(_tasks(args)))


async def _queues(args: argparse.Namespace) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine

    from . import admin
    from .urls import async_url

    model = _model(args.model)
    engine = create_async_engine(async_url(_url(args)), pool_size=1, connect_args={"timeout": 10})
    channel = Config.from_env().notify_channel
    try:
        if args.action == "list":
            for queue, paused in (await admin.queue_settings(engine, model)).items():
                sys.stdout.write(f"{queue}\t{'paused' if paused else 'running'}\n")
            return 0
        await admin.set_paused(engine, model, args.queue, args.action == "pause", channel)
        sys.stdout.write(f"{args.action}d {args.queue}\n")
        return 0
    finally:
        await engine.dispose()


def _queues_command(args: argparse.Namespace) -> int:
    return _guarded(lambda: asyncio.run(_queues(args)))


async def _limits(args: argparse.Namespace) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine

    from . import admin, limits
    from .urls import async_url

    model = _model(args.model)
    if args.action != "list":
        kind, key = limits.target(args.queue, args.name)
    if args.action == "set":
        checked = limits.settings(args.concurrency, args.rate, args.per)
    engine = create_async_engine(async_url(_url(args)), pool_size=1, connect_args={"timeout": 10})
    channel = Config.from_env().notify_channel
    try:
        if args.action == "list":
            rows = admin.render_limits(await limits.list_limits(engine, model))
            sys.stdout.write("".join(f"{line}\n" for line in rows) if len(rows) > 1 else "")
            return 0
        if args.action == "set":
            await limits.set_limit(engine, model, channel, kind, key, *checked)
            sys.stdout.write(f"limited {kind} {key}\n")
            return 0
        if not await limits.remove_limit(engine, model, channel, kind, key):
            sys.stderr.write(f"tasklib-sqla: error: no limit on {kind} {key}\n")
            return EXIT_WORKER_ERROR
        sys.stdout.write(f"removed the limit on {kind} {key}\n")
        return 0
    finally:
        await engine.dispose()


def _limits_command(args: argparse.Namespace) -> int:
    return _guarded(lambda: asyncio.run(_limits(args)))


def _dashboard_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        sys.stderr.write(
            "tasklib-sqla: error: the dashboard command needs uvicorn: "
            "pip install 'tasklib-sqla[dashboard]'\n"
        )
        return EXIT_USAGE
    from .dashboard import Dashboard

    try:
        password = os.environ.get("TASKLIB_DASHBOARD_PASSWORD") or None
        app = Dashboard(
            _url(args), model=_model(args.model), read_only=args.read_only, password=password
        )
    except USAGE_ERRORS as exc:
        return _usage_error(exc)
    if password is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(
            f"tasklib-sqla: warning: serving on {args.host} without a password; set "
            "TASKLIB_DASHBOARD_PASSWORD, or put it behind your own authentication\n"
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "tasks": _tasks_command,
        "queues": _queues_command,
        "limits": _limits_command,
        "worker": _worker_command,
        "migrate": _migrate_command,
        "status": _admin_command,
        "healthcheck": _admin_command,
        "schema": _schema_command,
        "dashboard": _dashboard_command,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
