"""The connection the claim loop and the finisher keep between their statements."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tasklib_sqla.errors import DB_ERRORS
from tasklib_sqla.held import HeldConnection

PID = text("SELECT pg_backend_pid()")


async def pid_of(conn: AsyncConnection) -> int:
    pid = await conn.scalar(PID)
    assert isinstance(pid, int)
    return pid


def checked_out(engine: AsyncEngine) -> int:
    n: int = engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
    return n


@pytest.fixture
async def held(engine: AsyncEngine) -> AsyncIterator[HeldConnection]:
    kept = HeldConnection(lambda: engine)
    yield kept
    await kept.close()
    assert checked_out(engine) == 0  # closing gives it back to the pool


async def test_one_connection_serves_every_use_and_stays_out_of_the_pool(
    engine: AsyncEngine, held: HeldConnection
) -> None:
    pids = []
    for _ in range(3):
        async with held.connect() as conn:
            pids.append(await pid_of(conn))
        assert checked_out(engine) == 1  # kept between uses, not given back
    assert len(set(pids)) == 1


async def test_a_failed_statement_gives_the_connection_back_and_the_next_use_works(
    engine: AsyncEngine, held: HeldConnection
) -> None:
    async with held.connect() as conn:
        await pid_of(conn)
    with pytest.raises(DBAPIError, match="division by zero"):
        async with held.connect() as conn:
            await conn.execute(text("SELECT 1 / 0"))
    assert checked_out(engine) == 0
    async with held.connect() as conn:
        assert await conn.scalar(text("SELECT 41 + 1")) == 42
    assert checked_out(engine) == 1


async def test_a_connection_killed_between_uses_is_replaced(
    engine: AsyncEngine, held: HeldConnection
) -> None:
    async with held.connect() as conn:
        first = await pid_of(conn)
    async with engine.connect() as other:
        assert await other.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
    # The first use after the kill meets the dead connection (as any pooled connection would)
    # and fails with a database error; the connection is dropped, and the next use gets a
    # live one. Which error depends on when the server's farewell arrives: SQLAlchemy wraps
    # it as a DBAPIError, but 2.0.30 lets asyncpg's InternalClientError ("another operation is
    # in progress") through unwrapped; the worker's DB_ERRORS holds both.
    with pytest.raises(DB_ERRORS):
        async with held.connect() as conn:
            await pid_of(conn)
    async with held.connect() as conn:
        second = await pid_of(conn)
    assert second != first


async def test_a_second_user_while_it_is_busy_gets_a_connection_of_its_own(
    engine: AsyncEngine, held: HeldConnection
) -> None:
    async with held.connect() as a:
        async with held.connect() as b:
            assert await pid_of(a) != await pid_of(b)
            assert checked_out(engine) == 2
        assert checked_out(engine) == 1  # the second one went back to the pool
    async with held.connect() as c:
        assert await pid_of(c) == await pid_of(a)  # the kept one
