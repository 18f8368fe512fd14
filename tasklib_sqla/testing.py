"""A pytest plugin for testing code that submits tasks: a real database, no mocked queue.

Enable it in the ``conftest.py`` at the top of the tests::

    pytest_plugins = ["tasklib_sqla.testing"]

Each test that asks for ``tasklib`` gets a fresh PostgreSQL database of its own (cloned from a
template built once per run from ``tasklib_metadata``), a process-wide client installed for the
test (so ``submit_task`` and friends work), and a :class:`TaskQueue` to look at what the test
submitted and to run it::

    def test_signup(tasklib, client):
        client.post("/signup", json={"email": "ada@example.com"})
        row = tasklib.assert_submitted(send_welcome, address="ada@example.com")
        assert row.queue == "emails"
        tasklib.run()                   # runs it (and what it submits) in-process, then returns
        assert tasklib.assert_submitted(send_welcome).state == "completed"

Fixtures, each overridable in a ``conftest.py``:

- ``tasklib_metadata``: the ``MetaData`` (or a list of them) whose tables the test databases
  hold. Default: the library's own (the ``tasks`` table). Return your app's metadata when the
  task model is declared on it with ``TaskMixin``.
- ``tasklib_model`` (default :class:`~tasklib_sqla.Task`) and ``tasklib_registry`` (default
  :data:`~tasklib_sqla.default_registry`).
- ``tasklib_database``: the test's database (:class:`TestDatabase`: ``.url`` for asyncpg,
  ``.sync_url`` for psycopg). Point the app under test at it.
- ``tasklib_config``: a :class:`~tasklib_sqla.Config` for that database, with retries due at once.
- ``tasklib``: the :class:`TaskQueue`.

The server is ``postgres@127.0.0.1:5432`` unless ``TASKLIB_TEST_PG_HOST``, ``_PORT``, ``_USER`` and
``_PASSWORD`` say otherwise. Database names carry the run's start time and process id, so two
runs on one server never collide; databases a killed run left behind are dropped a day later.

Nothing here needs an async pytest plugin: every method has a plain form (usable from sync and
async tests alike) and an ``a``-prefixed coroutine form for async tests.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy import MetaData, func, select, update
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from . import client as _client
from .config import Config
from .models import FINISHED_STATES, Task, TaskMixin, TaskState
from .models import metadata as _library_metadata
from .registry import TaskDefinition, TaskRegistry, default_registry
from .urls import async_url
from .worker import TaskWorker

__all__ = ["RunReport", "TaskQueue", "TestDatabase"]

T = TypeVar("T")

ENV = "TASKLIB_TEST_PG_"
DB_PREFIX = "tasklib_p"
_LEFTOVER = re.compile(rf"^{DB_PREFIX}(\d+)_\d+_")
LEFTOVER_AGE = 24 * 3600


def _server_url(database: str, driver: str = "postgresql+asyncpg") -> URL:
    env = os.environ.get
    return URL.create(
        driver,
        username=env(ENV + "USER") or "postgres",
        password=env(ENV + "PASSWORD") or None,
        host=env(ENV + "HOST") or "127.0.0.1",
        port=int(env(ENV + "PORT") or "5432"),
        database=database,
    )


def _run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, also when this thread runs an event loop.

    A sync helper called from an async test must not block that test's loop with a nested
    ``asyncio.run`` (which would refuse): it gets a loop of its own on a short-lived thread.
    """

    async def main() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    box: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            box.append(asyncio.run(main()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="tasklib-testing")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]


# -- databases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestDatabase:
    """One test's database. ``url`` uses asyncpg, ``sync_url`` psycopg (the ``sync`` extra)."""

    __test__ = False  # not a test class, whatever its name says to pytest

    name: str
    url: str
    sync_url: str


class DatabaseFactory:
    """Creates per-test databases on the test server, each a copy of a per-run template."""

    def __init__(self) -> None:
        self.run_prefix = f"{DB_PREFIX}{int(time.time())}_{os.getpid()}_"
        self._templates: dict[tuple[int, ...], str] = {}
        self._count = 0
        self._cleaned = False

    async def _admin(self) -> asyncpg.Connection:
        url = _server_url("postgres")
        try:
            return await asyncpg.connect(
                host=url.host,
                port=url.port,
                user=url.username,
                password=url.password,
                database="postgres",
                timeout=5,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            pytest.fail(
                f"tasklib_sqla.testing: no PostgreSQL at {url.username}@{url.host}:{url.port} "
                f"({exc}); set {ENV}HOST/{ENV}PORT/{ENV}USER/{ENV}PASSWORD",
                pytrace=False,
            )

    async def create(self, metadatas: Sequence[MetaData]) -> TestDatabase:
        conn = await self._admin()
        try:
            if not self._cleaned:
                await _drop_leftovers(conn)
                self._cleaned = True
            key = tuple(id(m) for m in metadatas)
            template = self._templates.get(key)
            if template is None:
                template = f"{self.run_prefix}tmpl{len(self._templates)}"
                await conn.execute(f'CREATE DATABASE "{template}"')
                self._templates[key] = template
                await _create_tables(template, metadatas)
            self._count += 1
            name = f"{self.run_prefix}{self._count}"
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        finally:
            await conn.close()
        return TestDatabase(
            name=name,
            url=_server_url(name).render_as_string(hide_password=False),
            sync_url=_server_url(name, "postgresql+psycopg").render_as_string(hide_password=False),
        )

    async def drop(self, name: str) -> None:
        conn = await self._admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    async def drop_templates(self) -> None:
        if not self._templates:
            return
        conn = await self._admin()
        try:
            for name in self._templates.values():
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        self._templates.clear()


async def _create_tables(database: str, metadatas: Sequence[MetaData]) -> None:
    engine = create_async_engine(_server_url(database), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            for md in metadatas:
                await conn.run_sync(md.create_all)
    finally:
        await engine.dispose()


async def _drop_leftovers(conn: asyncpg.Connection) -> None:
    """Drop databases of runs that started over a day ago (a killed run leaves them)."""
    now = time.time()
    for record in await conn.fetch("SELECT datname FROM pg_database"):
        m = _LEFTOVER.match(record["datname"])
        if m and now - int(m.group(1)) > LEFTOVER_AGE:
            await conn.execute(f'DROP DATABASE IF EXISTS "{record["datname"]}" WITH (FORCE)')


# -- the queue ---------------------------------------------------------------------------------


@dataclass
class RunReport:
    """What :meth:`TaskQueue.run` ran: the rows that finished during the run, by outcome."""

    completed: list[Any] = field(default_factory=list)
    failed: list[Any] = field(default_factory=list)
    cancelled: list[Any] = field(default_factory=list)

    @property
    def finished(self) -> list[Any]:
        return [*self.completed, *self.failed, *self.cancelled]


class TaskQueue:
    """The task table of one test's database: what was submitted, and running it.

    Rows are returned as detached instances of the task model (host columns included), read
    after the fact from the real table: a task added in a transaction that rolled back is not
    there, exactly as in production.
    """

    def __init__(
        self,
        config: Config,
        *,
        model: type[TaskMixin] = Task,
        registry: TaskRegistry = default_registry,
    ) -> None:
        self.config = config
        self.model = model
        self.registry = registry

    # -- reading -----------------------------------------------------------------------------

    def submitted(
        self, fn: TaskDefinition[Any, Any] | None = None, /, *, state: str | None = None
    ) -> list[Any]:
        """Tasks in the table, oldest first; only ``fn``'s and only in ``state`` if given."""
        return _run_sync(lambda: self.asubmitted(fn, state=state))

    async def asubmitted(
        self, fn: TaskDefinition[Any, Any] | None = None, /, *, state: str | None = None
    ) -> list[Any]:
        query = select(self.model).order_by(self.model.created_at, self.model.id)
        if fn is not None:
            query = query.where(self.model.name == fn.name)
        if state is not None:
            query = query.where(self.model.state == TaskState(state))
        return await self._read(query)

    def assert_submitted(self, fn: TaskDefinition[Any, Any], /, **args: Any) -> Any:
        """The one task of ``fn`` whose arguments include ``args``; AssertionError otherwise.

        ``args`` are validated like a submit's (a pydantic model or a date compares with what
        was stored). Check options on the row returned: ``.queue``, ``.priority``, ...
        """
        return _run_sync(lambda: self.aassert_submitted(fn, **args))

    async def aassert_submitted(self, fn: TaskDefinition[Any, Any], /, **args: Any) -> Any:
        rows = await self.asubmitted(fn)
        matching = self._matching(fn, rows, args)
        if len(matching) == 1:
            return matching[0]
        wanted = f"{fn.name}({_kwargs(args)})" if args else fn.name
        if not matching:
            raise AssertionError(f"no task {wanted} was submitted; {await self._inventory()}")
        raise AssertionError(
            f"{len(matching)} tasks {wanted} were submitted, expected one; "
            f"narrow the arguments or check tasklib.submitted({fn.name})"
        )

    def assert_not_submitted(self, fn: TaskDefinition[Any, Any], /, **args: Any) -> None:
        """AssertionError if a task of ``fn`` whose arguments include ``args`` was submitted."""
        _run_sync(lambda: self.aassert_not_submitted(fn, **args))

    async def aassert_not_submitted(self, fn: TaskDefinition[Any, Any], /, **args: Any) -> None:
        matching = self._matching(fn, await self.asubmitted(fn), args)
        if matching:
            found = ", ".join(f"{r.id} ({r.state})" for r in matching)
            raise AssertionError(f"task {fn.name} was submitted: {found}")

    @staticmethod
    def _matching(fn: TaskDefinition[Any, Any], rows: list[Any], args: dict[str, Any]) -> list[Any]:
        expected = fn.dump_some_args(args)
        return [r for r in rows if all(r.args.get(k, _ABSENT) == v for k, v in expected.items())]

    async def _inventory(self) -> str:
        rows = await self.asubmitted()
        if not rows:
            return "the table holds no tasks"
        shown = "; ".join(f"{r.name}({_kwargs(r.args)}) [{r.state}]" for r in rows[:20])
        more = f" and {len(rows) - 20} more" if len(rows) > 20 else ""
        return f"the table holds {len(rows)}: {shown}{more}"

    async def _read(self, query: Any) -> list[Any]:
        engine = self._engine()
        try:
            async with async_sessionmaker(engine, expire_on_commit=False)() as session:
                return list((await session.scalars(query)).all())
        finally:
            await engine.dispose()

    def _engine(self) -> AsyncEngine:
        # NullPool: each helper call may run on a loop of its own, so nothing is kept between.
        return create_async_engine(async_url(self.config.database_url), poolclass=NullPool)

    # -- running -----------------------------------------------------------------------------

    def run(
        self, *, include_scheduled: bool = False, check: bool = True, concurrency: int = 4
    ) -> RunReport:
        """Run every due task, and the tasks those submit, until none is due; then return.

        A real worker in burst mode, in this process, against the test's database: retries
        happen (due at once with ``tasklib_config``), timeouts apply, chains follow.
        ``include_scheduled`` first makes tasks scheduled in the future due. With ``check``
        (the default), a task that ended ``failed`` raises AssertionError with its error.
        """
        return _run_sync(
            lambda: self.arun(
                include_scheduled=include_scheduled, check=check, concurrency=concurrency
            )
        )

    async def arun(
        self, *, include_scheduled: bool = False, check: bool = True, concurrency: int = 4
    ) -> RunReport:
        started = await self._now()
        # Scheduled tasks made due can schedule more; a bound keeps a self-rescheduling task
        # from turning the test into an endless loop.
        for _ in range(100):
            if include_scheduled:
                await self._make_scheduled_due()
            worker = TaskWorker(
                self.config,
                concurrency=concurrency,
                registry=self.registry,
                model=self.model,
                burst=True,
                handle_signals=False,
                worker_id=f"pytest-{uuid.uuid4().hex[:8]}",
            )
            await worker.run()
            if not include_scheduled or not await self._scheduled_pending():
                break
        report = await self._report(started)
        if check and report.failed:
            lines = "\n".join(f"  {r.name} {r.id}: {r.error}" for r in report.failed)
            raise AssertionError(f"{len(report.failed)} task(s) failed:\n{lines}")
        return report

    async def _now(self) -> Any:
        engine = self._engine()
        try:
            async with engine.connect() as conn:
                return (await conn.execute(select(_sql_now()))).scalar_one()
        finally:
            await engine.dispose()

    async def _make_scheduled_due(self) -> None:
        engine = self._engine()
        model = self.model
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    update(model)
                    .where(model.state == TaskState.PENDING, model.scheduled_at > _sql_now())
                    .values(scheduled_at=_sql_now())
                )
        finally:
            await engine.dispose()

    async def _scheduled_pending(self) -> bool:
        model = self.model
        names = sorted(self.registry.names)
        rows = await self._read(
            select(model).where(model.state == TaskState.PENDING, model.name.in_(names)).limit(1)
        )
        return bool(rows)

    async def _report(self, since: Any) -> RunReport:
        model = self.model
        rows = await self._read(
            select(model)
            .where(model.state.in_(FINISHED_STATES), model.completed_at >= since)
            .order_by(model.completed_at, model.id)
        )
        report = RunReport()
        for row in rows:
            {
                TaskState.COMPLETED: report.completed,
                TaskState.FAILED: report.failed,
                TaskState.CANCELLED: report.cancelled,
            }[TaskState(row.state)].append(row)
        return report


_ABSENT = object()


def _sql_now() -> Any:
    return func.now()


def _kwargs(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _tasklib_databases() -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory()
    yield factory
    _run_sync(factory.drop_templates)


@pytest.fixture
def tasklib_metadata() -> MetaData | Sequence[MetaData]:
    """The metadata whose tables each test database holds: override to return your app's."""
    return _library_metadata


@pytest.fixture
def tasklib_model() -> type[TaskMixin]:
    """The task model: override when your app declares its own with ``TaskMixin``."""
    return Task


@pytest.fixture
def tasklib_registry() -> TaskRegistry:
    """The registry whose tasks :meth:`TaskQueue.run` runs."""
    return default_registry


@pytest.fixture
def tasklib_database(
    _tasklib_databases: DatabaseFactory, tasklib_metadata: MetaData | Sequence[MetaData]
) -> Iterator[TestDatabase]:
    """A fresh database for this test holding ``tasklib_metadata``'s tables; dropped after."""
    metadatas = [tasklib_metadata] if isinstance(tasklib_metadata, MetaData) else tasklib_metadata
    database = _run_sync(lambda: _tasklib_databases.create(list(metadatas)))
    yield database
    _run_sync(lambda: _tasklib_databases.drop(database.name))


@pytest.fixture
def tasklib_config(tasklib_database: TestDatabase) -> Config:
    """A ``Config`` for the test's database; failed attempts are retried at once."""
    return Config(database_url=tasklib_database.url, base_retry_delay_seconds=0.0)


@pytest.fixture
def tasklib(
    tasklib_config: Config, tasklib_model: type[TaskMixin], tasklib_registry: TaskRegistry
) -> Iterator[TaskQueue]:
    """The test's :class:`TaskQueue`, with the process-wide client pointed at its database."""
    # No pool: a test's event loop may close without disposing of what it opened (older
    # pytest-asyncio releases skip that step), and a connection must not outlive its loop.
    engine = create_async_engine(tasklib_config.database_url, poolclass=NullPool)
    installed = _client.TaskClient(
        tasklib_config, model=tasklib_model, registry=tasklib_registry, engine=engine
    )
    previous = _client.install(installed)
    try:
        yield TaskQueue(tasklib_config, model=tasklib_model, registry=tasklib_registry)
    finally:
        _client.install(previous)
        _run_sync(installed.dispose)
        _run_sync(engine.dispose)
