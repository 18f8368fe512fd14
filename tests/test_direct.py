"""A standalone submit's INSERT on asyncpg's own connection (``tasklib_sqla.direct``): the same
row, the same errors and the same care for broken connections as through SQLAlchemy."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Boolean, Numeric, bindparam, event, exc, func, literal, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tasklib_sqla import Config, Task, TaskClient, TaskState, direct
from tasklib_sqla.errors import sqlstate
from tasklib_sqla.queries import WorkerQueries
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


# -- the worker's statements: direct.fetch ----------------------------------------------------


async def test_the_workers_claims_and_finishes_return_what_sqlalchemy_returns(
    db_url: str, client: TaskClient[Any]
) -> None:
    """The worker's claims (plain, levelled, steered) and finish statement on asyncpg's
    connection and through SQLAlchemy: the same columns, values and types. (The claim that
    carries outcomes goes through the same call in test_carried.py's worker runs.)"""
    plain, watched = create_async_engine(db_url), create_async_engine(db_url)
    observe(watched)
    queries = WorkerQueries.for_model(Task)
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319b-b7ad6b7169203331-01"}
    try:
        got: dict[str, list[tuple[Any, ...]]] = {}
        for label, engine in (("direct", plain), ("sqlalchemy", watched)):
            assert direct.usable(engine) is (label == "direct")
            await client.submit(t.sleep_async.options(queue="q", priority=3), seconds=0.5)
            added = await client.submit(t.add, a=1)
            async with plain.begin() as conn:  # as a traced submit leaves it
                await conn.execute(update(Task).where(Task.id == added).values(trace_context=trace))
            params = {
                "names": [t.sleep_async.name, t.add.name],
                "queues": [],
                "owner": f"w-{label}",
                "lease": timedelta(seconds=30),
                "limit": 1,
            }
            rows: list[tuple[Any, ...]] = []
            async with engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                for statement in (queries.claim_levelled, queries.claim):
                    rows += [tuple(r) for r in await direct.fetch(conn, statement, params)]
                for statement in (queries.claim_steered, queries.claim_levelled):
                    assert await direct.fetch(conn, statement, params) == []  # none left
                finished = [r[0] for r in rows]
                batch = (
                    "["
                    + ",".join(
                        f'{{"id":"{i}","attempt":1,"state":"completed","result":1,"error":null,'
                        '"err":null,"delay":null,"refund":0}'
                        for i in finished
                    )
                    + "]"
                )
                written = await direct.fetch(
                    conn,
                    queries.finish,
                    {"batch": batch, "owner": f"w-{label}", "done_channel": "tasklib_done"},
                )
            assert sorted(r[0] for r in written) == sorted(finished)
            got[label] = rows
        for one, other in zip(got["direct"], got["sqlalchemy"], strict=True):
            assert len(one) == len(other) == 13
            for i, (a, b) in enumerate(zip(one, other, strict=True)):
                assert type(a) is type(b), i
                if i not in (0, 8):  # the id, scheduled_at
                    assert a == b, i
        names = [r[1] for r in got["direct"]]
        assert names == [t.sleep_async.name, t.add.name]  # priority 3 first
        assert got["direct"][1][10] == trace
    finally:
        await plain.dispose()
        await watched.dispose()


async def test_fetch_binds_as_sqlalchemy_binds_and_keeps_result_processors(
    small_engine: AsyncEngine, path: str
) -> None:
    """Values the statement binds itself and the types' bind processors go in as SQLAlchemy
    sends them; a column SQLAlchemy converts on the way out keeps its execution."""
    flags: Any = select(
        literal(7).label("seven"),
        bindparam("flag", type_=Boolean).label("flag"),
        bindparam("word").label("word"),
    )
    rounded = text("SELECT 1.5::numeric AS x").columns(x=Numeric(asdecimal=False))
    async with small_engine.connect() as conn:
        assert [tuple(r) for r in await direct.fetch(conn, flags, {"flag": 1, "word": "w"})] == [
            (7, True, "w")
        ]
        (row,) = await direct.fetch(conn, rounded, {})
        assert row[0] == 1.5 and not isinstance(row[0], Decimal)  # SQLAlchemy's float
    entry = direct.compiled(small_engine.dialect, rounded)
    assert entry is not None and (entry.plain_rows is False) is (path == "direct")


async def test_a_failed_fetch_raises_sqlalchemys_error_and_a_lost_one_invalidates(
    small_engine: AsyncEngine, other: asyncpg.Connection, path: str
) -> None:
    boom = select(func.to_number(text("'x'"), text("'9'")))
    async with small_engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")  # as the worker's
        # SQLAlchemy's asyncpg dialect raises its base class for this one; direct, DataError
        # (a subclass of it, by SQLSTATE): the worker decides by the SQLSTATE either way.
        with pytest.raises(exc.DBAPIError) as refused:
            await direct.fetch(conn, boom, {})
        assert sqlstate(refused.value) == "22P02" and not conn.invalidated
        assert [tuple(r) for r in await direct.fetch(conn, select(literal(1)), {})] == [(1,)]
        pid = await conn.scalar(text("SELECT pg_backend_pid()"))
        assert await other.fetchval("SELECT pg_terminate_backend($1)", pid)
        await asyncio.sleep(0.1)
        with pytest.raises(exc.DBAPIError) as lost:
            await direct.fetch(conn, select(literal(2)), {})
        assert lost.value.connection_invalidated and conn.invalidated
    async with small_engine.connect() as conn:  # the pool's connection was replaced
        assert [tuple(r) for r in await direct.fetch(conn, select(literal(3)), {})] == [(3,)]
