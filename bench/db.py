"""The benchmark database: created fresh, shared by the library and the baseline."""

from __future__ import annotations

import os
import platform
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from tasklib_sqla.models import Task
from tasklib_sqla.schema import schema_sql

DB_NAME = "tasklib_bench"


def server_url() -> str:
    """SQLAlchemy URL of the server (any database); TASKLIB_BENCH_URL overrides."""
    return os.environ.get(
        "TASKLIB_BENCH_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    )


def bench_url() -> str:
    return make_url(server_url()).set(database=DB_NAME).render_as_string(hide_password=False)


def dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_database() -> None:
    conn = await asyncpg.connect(dsn(server_url()))
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {DB_NAME}")
    finally:
        await conn.close()
    # The library's schema, NOTIFY trigger included: both sides pay for it alike.
    conn = await asyncpg.connect(dsn(bench_url()))
    try:
        await conn.execute(schema_sql(Task))
        await conn.execute(
            "CREATE TABLE bench_users (id bigserial PRIMARY KEY, email text NOT NULL)"
        )
    finally:
        await conn.close()


async def reset(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE tasks, bench_users")


async def fill_finished(conn: asyncpg.Connection, n: int) -> None:
    """``n`` completed rows, as a long-lived table accumulates them."""
    await conn.execute(
        """
        INSERT INTO tasks (name, state, args, result, attempts, started_at, completed_at, worker_id)
        SELECT 'bench.noop_async', 'completed', jsonb_build_object('n', g), 'null', 1,
               now(), now(), 'old-worker'
        FROM generate_series(1, $1) g
        """,
        n,
    )
    await conn.execute("VACUUM ANALYZE tasks")


async def submit_noops(conn: asyncpg.Connection, n: int, name: str) -> None:
    """Pre-submit ``n`` tasks in one statement (the drain benchmarks' input)."""
    await conn.execute(
        "INSERT INTO tasks (name, args) SELECT $1, jsonb_build_object('n', g) FROM generate_series(1, $2) g",
        name,
        n,
    )
    await conn.execute("ANALYZE tasks")


async def verify_drained(conn: asyncpg.Connection, n: int, name: str) -> None:
    """Every task completed exactly once; nothing left pending or running."""
    rows = await conn.fetch(
        "SELECT state, attempts, count(*) AS c FROM tasks WHERE name = $1 AND worker_id IS DISTINCT FROM 'old-worker' GROUP BY 1, 2",
        name,
    )
    got = {(r["state"], r["attempts"]): r["c"] for r in rows}
    if got != {("completed", 1): n}:
        raise AssertionError(f"expected {n} tasks completed once, got {got}")


async def environment(conn: asyncpg.Connection) -> dict[str, Any]:
    settings = {
        r["name"]: r["setting"] + (r["unit"] or "")
        for r in await conn.fetch(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
            [
                "shared_buffers",
                "synchronous_commit",
                "fsync",
                "max_connections",
                "work_mem",
                "wal_level",
                "jit",
                "autovacuum",
            ],
        )
    }
    import asyncpg as apg
    import pydantic
    import sqlalchemy

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} {platform.release()}",
        "postgresql": await conn.fetchval("SHOW server_version"),
        "pg_settings": settings,
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "asyncpg": apg.__version__,
        "pydantic": pydantic.VERSION,
    }
