"""A standalone submit's INSERT on asyncpg's own connection (``tasklib_sqla.direct``): the same
row, the same errors and the same care for broken connections as through SQLAlchemy."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, exc, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tasklib_sqla import Config, Task, TaskClient, TaskState, direct
from tasklib_sqla.errors import sqlstate
from tests import tasks as t


def observe(engine: AsyncEngine) -> list[str]:
    """Listen to the engine's statements (as a tracer would); the list of those seen."""
    seen: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    return seen


@pytest.fixture
async def small_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """One pooled connection and no overflow: a broken one handed out again would show."""
    eng = create_async_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=5)
    yield eng
    await eng.dispose()


@pytest.fixture
def small_client(db_url: str, small_engine: AsyncEngine) -> TaskClient[Any]:
    return TaskClient(Config(database_url=db_url), engine=small_engine)


@pytest.fixture
async def other(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own, beside the pool's."""
    conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg", "postgresql"))
    yield conn
    await conn.close()


@pytest.fixture(params=["direct", "sqlalchemy"])
def path(request: pytest.FixtureRequest, small_engine: AsyncEngine) -> str:
    """Run the test both ways: a listener sends the submit through SQLAlchemy's execution."""
    if request.param == "sqlalchemy":
        observe(small_engine)
    assert direct.usable(small_engine) is (request.param == "direct")
    return str(request.param)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many statements went the direct way."""
    calls: list[int] = []
    real = direct.execute

    async def counting(*args: Any) -> None:
        calls.append(1)
        await real(*args)

    monkeypatch.setattr(direct, "execute", counting)
    return calls


async def test_both_ways_write_the_same_row(db_url: str, counted: list[int]) -> None:
    plain, watched = create_async_engine(db_url), create_async_engine(db_url)
    seen = observe(watched)
    try:
        at = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
        parent = uuid.uuid4()
        calls: list[tuple[Any, dict[str, Any]]] = [
            (t.add, {"a": 2, "b": 3}),
            (t.sleep_async.options(queue="q3", priority=-7, delay=60), {"seconds": 0.25}),
            (t.always_fails.options(run_at=at), {"message": "x"}),
            (t.add.then(t.async_add, "a", b=5), {"a": 5}),
            (t.echo, {"data": {"text": "ü \\ \" '", "n": [1, 2.5, None]}}),
        ]
        rows: dict[str, list[Task]] = {}
        for label, engine in (("direct", plain), ("sqlalchemy", watched)):
            client: TaskClient[Any] = TaskClient(Config(database_url=db_url), engine=engine)
            ids = [await client.submit_call(fn, (), kw, parent_id=parent) for fn, kw in calls]
            got = [await client.get(i) for i in ids]
            assert all(r is not None for r in got)
            rows[label] = [r for r in got if r is not None]
        assert len(counted) == len(calls)  # the plain engine's, all of them
        assert sum("INSERT INTO tasks" in s for s in seen) == len(calls)  # the watched one's
        skip = {"id", "created_at", "scheduled_at"}
        for one, other in zip(rows["direct"], rows["sqlalchemy"], strict=True):
            for column in Task.__table__.columns:
                if column.key not in skip:
                    assert getattr(one, column.key) == getattr(other, column.key), column.key
            assert abs((one.scheduled_at - other.scheduled_at).total_seconds()) < 5
            assert one.state is TaskState.PENDING and one.errors == [] and one.attempts == 0
            assert one.parent_id == parent
        delayed, pinned = rows["direct"][1], rows["direct"][2]
        assert delayed.scheduled_at > delayed.created_at + timedelta(seconds=55)
        assert (delayed.queue, delayed.priority) == ("q3", -7)
        assert (delayed.timeout_seconds, pinned.scheduled_at, pinned.max_retries) == (0.5, at, 2)
        assert rows["direct"][3].chain and rows["direct"][4].args == calls[4][1]
    finally:
        await plain.dispose()
        await watched.dispose()


async def test_a_refused_insert_raises_sqlalchemys_error_and_keeps_the_connection(
    small_client: TaskClient[Any], small_engine: AsyncEngine, path: str
) -> None:
    client = small_client
    await client.submit(t.add, a=1)
    async with small_engine.begin() as conn:
        await conn.execute(text("ALTER TABLE tasks ADD CONSTRAINT no_sevens CHECK (priority <> 7)"))
    with pytest.raises(exc.IntegrityError) as refused:
        await client.submit(t.add.options(priority=7), a=1)
    assert sqlstate(refused.value) == "23514"
    assert isinstance(refused.value.orig, Exception) and not refused.value.connection_invalidated
    assert "no_sevens" in str(refused.value)
    async with small_engine.begin() as conn:
        await conn.execute(text("ALTER TABLE tasks RENAME TO tasks_away"))
    with pytest.raises(exc.ProgrammingError) as missing:
        await client.submit(t.add, a=1)
    assert sqlstate(missing.value) == "42P01"
    async with small_engine.begin() as conn:
        await conn.execute(text("ALTER TABLE tasks_away RENAME TO tasks"))
    await client.submit(t.add, a=2)
    async with small_engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(Task)) == 2


async def test_a_killed_connection_is_replaced(
    small_client: TaskClient[Any], small_engine: AsyncEngine, other: asyncpg.Connection, path: str
) -> None:
    await small_client.submit(t.add, a=1)
    async with small_engine.connect() as conn:  # the pool's one connection
        pid = await conn.scalar(text("SELECT pg_backend_pid()"))
    assert await other.fetchval("SELECT pg_terminate_backend($1)", pid)
    await asyncio.sleep(0.1)
    with pytest.raises(exc.DBAPIError) as lost:
        await small_client.submit(t.add, a=2)
    assert lost.value.connection_invalidated
    await small_client.submit(t.add, a=3)  # on a new connection, not the dead one
    names = await other.fetch("SELECT args->>'a' AS a FROM tasks ORDER BY created_at")
    assert [r["a"] for r in names] == ["1", "3"]


async def test_a_cancelled_submit_leaves_no_connection_behind(
    small_client: TaskClient[Any], other: asyncpg.Connection, path: str
) -> None:
    await small_client.submit(t.add, a=1)
    async with other.transaction():
        await other.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(small_client.submit(t.add, a=2), 0.3)
    # The pool's only connection must come back usable (or be replaced), not stuck in the
    # cancelled statement: this submit would fail with "another operation is in progress".
    await asyncio.wait_for(small_client.submit(t.add, a=3), 10)
    args = await other.fetch("SELECT args->>'a' AS a FROM tasks")
    assert {"1", "3"} <= {r["a"] for r in args}


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (asyncpg.UniqueViolationError("dup"), exc.IntegrityError),
        (asyncpg.CheckViolationError("check"), exc.IntegrityError),
        (asyncpg.NumericValueOutOfRangeError("big"), exc.DataError),
        (asyncpg.UndefinedTableError("gone"), exc.ProgrammingError),
        (asyncpg.InsufficientPrivilegeError("no"), exc.ProgrammingError),
        (asyncpg.FeatureNotSupportedError("no"), exc.NotSupportedError),
        (asyncpg.AdminShutdownError("bye"), exc.OperationalError),
        (asyncpg.ConnectionDoesNotExistError("gone"), exc.OperationalError),
        (asyncpg.QueryCanceledError("timeout"), exc.OperationalError),
        (asyncpg.DeadlockDetectedError("deadlock"), exc.OperationalError),
        (asyncpg.InternalServerError("xx"), exc.InternalError),
        (asyncpg.RaiseError("P0001"), exc.DatabaseError),
        (asyncpg.InterfaceError("closed"), exc.InterfaceError),
        (ConnectionResetError("reset"), exc.OperationalError),
    ],
)
def test_errors_are_classed_as_sqlalchemy_classes_them(
    error: Exception, expected: type[exc.DBAPIError]
) -> None:
    assert direct.dbapi_class(error) is expected
    wrapped = direct.dbapi_error(error, "INSERT 1", [1], invalidated=False, hide=True)
    assert type(wrapped) is expected and wrapped.orig is error
    assert "[parameters: " not in str(wrapped)  # hidden when the engine hides them


@pytest.mark.parametrize(
    "watch",
    [
        "echo",
        "logger",
        "before_execute",
        "after_cursor_execute",
        "handle_error",
        "schema_translate_map",
        "psycopg",
    ],
)
async def test_anything_watching_the_engine_keeps_sqlalchemys_execution(
    db_url: str, watch: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_async_engine(
        db_url.replace("+asyncpg", "+psycopg") if watch == "psycopg" else db_url,
        echo=watch == "echo",
    )
    assert direct.usable(engine) or watch in ("echo", "psycopg")
    if watch == "logger":
        caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    elif watch in ("before_execute", "after_cursor_execute", "handle_error"):
        event.listen(engine.sync_engine, watch, lambda *args: None)
    elif watch == "schema_translate_map":
        engine = engine.execution_options(schema_translate_map={None: "public"})
    try:
        assert not direct.usable(engine)
        client: TaskClient[Any] = TaskClient(Config(database_url=db_url), engine=engine)
        task_id = await client.submit(t.add, a=1)  # and the submit still works
        assert await client.get(task_id) is not None
    finally:
        await engine.dispose()
