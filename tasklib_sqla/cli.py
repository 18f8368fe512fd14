"""The ``tasklib-sqla`` command: run a worker, or print the schema as SQL.

    tasklib-sqla worker myapp.tasks                 tasks registered with @task in myapp.tasks
    tasklib-sqla worker myapp.tasks:registry        a TaskRegistry of one's own
    tasklib-sqla migrate [--sql]                    create/upgrade the library's own tables
    tasklib-sqla schema [--model myapp.models:Job]  the DDL, for teams without Alembic

The database URL comes from ``--database-url``, ``TASKLIB_DATABASE_URL`` or ``DATABASE_URL``;
every other ``Config`` field from its ``TASKLIB_*`` variable.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .config import Config
from .errors import DB_ERRORS, one_line
from .exceptions import ConfigError, TaskLibError, WorkerError
from .models import Task, TaskMixin
from .registry import TaskRegistry, default_registry
from .schema import schema_sql
from .worker import TaskWorker

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tasklib-sqla", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run a worker")
    w.add_argument("target", help="module[:attr] that registers the tasks (attr: a TaskRegistry)")
    w.add_argument("--concurrency", "-c", type=int, default=10)
    w.add_argument(
        "--queue",
        "-q",
        action="append",
        dest="queues",
        metavar="QUEUE",
        help="a queue to work (repeatable); default: every queue",
    )
    w.add_argument("--burst", action="store_true", help="exit once no task is due")
    w.add_argument("--database-url")
    w.add_argument("--model", help="module:Class of a TaskMixin model (default: tasklib's Task)")
    w.add_argument("--log-level", default=os.environ.get("TASKLIB_LOG_LEVEL", "INFO"))
    m = sub.add_parser(
        "migrate",
        help="create or upgrade the library's own tasks table (its shipped Alembic migrations)",
    )
    m.add_argument("--database-url", help="default: TASKLIB_DATABASE_URL or DATABASE_URL")
    m.add_argument("--revision", default="head", help="the revision to reach (default: head)")
    m.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    m.add_argument("--downgrade", metavar="REVISION", help="downgrade to REVISION (base: drop)")
    m.add_argument("--current", action="store_true", help="print the database's revision")
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
    )
    await worker.run()
    return 0


#: Exit codes: 1 the worker stopped on a database error; 2 a usage or configuration error.
EXIT_WORKER_ERROR = 1
EXIT_USAGE = 2


def _migrate(args: argparse.Namespace) -> int:
    from .migrate import current, downgrade, migrate

    overrides = {"database_url": args.database_url} if args.database_url else {}
    url = Config.from_env(**overrides).database_url
    if not url:
        raise ConfigError("no database URL: pass --database-url or set TASKLIB_DATABASE_URL")
    if args.current:
        sys.stdout.write(current(url) + "\n")
    elif args.downgrade:
        downgrade(url, args.downgrade)
    else:
        sys.stdout.write(migrate(url, args.revision, sql=args.sql))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "migrate":
        logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
        try:
            return _migrate(args)
        except (TaskLibError, ValueError, ImportError, OSError) as exc:
            sys.stderr.write(f"tasklib-sqla: error: {_describe(exc)}\n")
            return EXIT_USAGE
        except DB_ERRORS as exc:
            sys.stderr.write(f"tasklib-sqla: error: {one_line(exc)}\n")
            return EXIT_WORKER_ERROR
    if args.command == "schema":
        try:
            channel = args.channel or Config.from_env().notify_channel
            sys.stdout.write(schema_sql(_model(args.model), channel))
        except (TaskLibError, ValueError, ImportError, AttributeError) as exc:
            sys.stderr.write(f"tasklib-sqla: error: {_describe(exc)}\n")
            return EXIT_USAGE
        return 0
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    try:
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


if __name__ == "__main__":
    raise SystemExit(main())
