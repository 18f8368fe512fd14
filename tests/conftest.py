"""Test fixtures: a real PostgreSQL, one fresh database per test cloned from a template.

Point the suite at a server with TASKLIB_TEST_PG_HOST / _PORT / _USER / _PASSWORD (or
pytest-postgresql's --postgresql-host/--postgresql-port/... options). Defaults: 127.0.0.1:5432,
user postgres.

Database names carry the run's start time and pid (``tasklib_t<epoch>_<pid>``, the template
``..._tmpl``), so two runs on one server never collide; databases that a killed run left
behind are dropped by a later run once they are over a day old.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from pytest_postgresql import factories
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tasklib_sqla import Config, TaskClient
from tasklib_sqla.models import metadata

ENV = "TASKLIB_TEST_PG_"

# The plugin users test their own code with serves the project's tests too (tests/test_testing.py,
# the framework examples); pytester runs a user's project against it.
pytest_plugins = ["tasklib_sqla.testing", "pytester"]


def _env(name: str) -> str | None:
    return os.environ.get(ENV + name) or None


def load_schema(
    host: str, port: int, user: str, dbname: str, password: str | None, **_: Any
) -> None:
    """Build the template database once; every test gets a copy of it."""
    engine = create_engine(_url("postgresql+psycopg", host, port, user, password, dbname))
    with engine.begin() as conn:
        metadata.create_all(conn)
    engine.dispose()


def _url(driver: str, host: str, port: int | str, user: str, password: str | None, db: str) -> str:
    return URL.create(
        driver, username=user, password=password, host=host, port=int(port), database=db
    ).render_as_string(hide_password=False)


RUN_DB_PREFIX = "tasklib_t"
RUN_DB = f"{RUN_DB_PREFIX}{int(time.time())}_{os.getpid()}"
_LEFTOVER = re.compile(rf"^{RUN_DB_PREFIX}(\d+)_\d+")
LEFTOVER_AGE = 24 * 3600

postgresql_server = factories.postgresql_noproc(
    host=_env("HOST"),
    port=_env("PORT"),
    user=_env("USER"),
    password=_env("PASSWORD"),
    dbname=RUN_DB,
    load=[load_schema],
)
postgresql = factories.postgresql("postgresql_server")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Fail at once, in one line, rather than a minute of connection retries per test.
    opt = session.config.getoption
    host = _env("HOST") or opt("postgresql_host") or "127.0.0.1"
    port = _env("PORT") or opt("postgresql_port") or "5432"
    user = _env("USER") or opt("postgresql_user") or "postgres"
    password = _env("PASSWORD") or opt("postgresql_password")
    try:
        with psycopg.connect(
            host=host,
            port=port,
            user=user,
            password=password,
            dbname="postgres",
            connect_timeout=3,
            autocommit=True,
        ) as conn:
            _drop_leftovers(conn)
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.exit(
            f"no PostgreSQL at {user}@{host}:{port} ({first}); point the tests at a server with "
            f"{ENV}HOST/{ENV}PORT/{ENV}USER/{ENV}PASSWORD",
            returncode=3,
        )


def _drop_leftovers(conn: psycopg.Connection[Any]) -> None:
    """Drop the databases of test runs that started over a day ago (killed runs leave them)."""
    now = time.time()
    names = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
    for name in names:
        m = _LEFTOVER.match(name)
        if m and now - int(m.group(1)) > LEFTOVER_AGE:
            if name.endswith("_tmpl"):
                conn.execute(f'ALTER DATABASE "{name}" IS_TEMPLATE false')
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_info(postgresql: psycopg.Connection[Any]) -> dict[str, Any]:
    info = postgresql.info
    return {
        "host": info.host,
        "port": info.port,
        "user": info.user,
        "password": info.password or None,
        "db": info.dbname,
    }


@pytest.fixture
def db_url(pg_info: dict[str, Any]) -> str:
    """asyncpg URL of this test's own database."""
    return _url("postgresql+asyncpg", **pg_info)


@pytest.fixture
def sync_url(pg_info: dict[str, Any]) -> str:
    return _url("postgresql+psycopg", **pg_info)


@pytest.fixture
def config(db_url: str) -> Config:
    return Config(database_url=db_url, base_retry_delay_seconds=0.0)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(db_url)
    yield eng
    await eng.dispose()


@pytest.fixture
def sync_engine(sync_url: str) -> Iterator[Engine]:
    eng = create_engine(sync_url)
    yield eng
    eng.dispose()


@pytest.fixture
async def client(config: Config, engine: AsyncEngine) -> TaskClient[Any]:
    return TaskClient(config, engine=engine)
