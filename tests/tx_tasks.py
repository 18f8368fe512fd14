"""Transactional tasks for the tests: each books one ledger row in its worker's transaction.

``ledger`` has no unique constraint on purpose: a write that happened twice shows up as two
rows. The CLI workers of the kill-storm test import this module.
"""

from __future__ import annotations

import asyncio
import os

from sqlalchemy import Integer, MetaData, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tasklib_sqla import CONTEXT, SESSION, TaskContext, TaskRegistry, get_client

registry = TaskRegistry()


class Base(DeclarativeBase):
    metadata = MetaData()


class Ledger(Base):
    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    n: Mapped[int]
    pid: Mapped[int]
    #: 1 for a transactional task's row, 0 for an ordinary task's.
    transactional: Mapped[int] = mapped_column(default=1)


@registry.task(name="tx.book", transactional=True, max_retries=50)
async def book(n: int, seconds: float = 0.0, session: AsyncSession = SESSION) -> int:
    session.add(Ledger(n=n, pid=os.getpid()))
    await session.flush()  # the row is written (and locked) before the wait
    if seconds:
        await asyncio.sleep(seconds)
    return n


@registry.task(name="tx.plain_book", max_retries=50)
async def plain_book(n: int, seconds: float = 0.0) -> int:
    """The ordinary twin of ``book``: its write commits on its own, before the completion."""
    async with get_client().engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO ledger (n, pid, transactional) VALUES (:n, :pid, 0)"),
            {"n": n, "pid": os.getpid()},
        )
    if seconds:
        await asyncio.sleep(seconds)
    return n


@registry.task(name="tx.book_then_fail", transactional=True, max_retries=0)
async def book_then_fail(n: int, session: AsyncSession = SESSION) -> int:
    session.add(Ledger(n=n, pid=os.getpid()))
    await session.commit()  # only a flush: the worker commits, or not
    raise RuntimeError("after booking")


@registry.task(name="tx.book_sync", transactional=True)
def book_sync(n: int, session: Session = SESSION) -> int:
    session.add(Ledger(n=n, pid=os.getpid()))
    session.flush()
    return session.query(Ledger).filter_by(n=n).count()


@registry.task(name="tx.book_with_timeout", transactional=True, timeout_seconds=0.3, max_retries=0)
async def book_with_timeout(n: int, session: AsyncSession = SESSION) -> int:
    session.add(Ledger(n=n, pid=os.getpid()))
    await session.flush()
    await asyncio.sleep(5)
    return n


@registry.task(name="tx.book_bad_result", transactional=True)
async def book_bad_result(n: int, session: AsyncSession = SESSION) -> int:
    session.add(Ledger(n=n, pid=os.getpid()))
    return "not an int"  # type: ignore[return-value]


@registry.task(name="tx.book_and_spawn", transactional=True)
async def book_and_spawn(
    n: int, session: AsyncSession = SESSION, ctx: TaskContext = CONTEXT
) -> int:
    session.add(Ledger(n=n, pid=os.getpid()))
    ctx.add(session, book, n=n + 1000)  # the child exists if and only if this attempt commits
    return n


@registry.task(name="tx.rolls_back", transactional=True, max_retries=0)
async def rolls_back(n: int, session: AsyncSession = SESSION) -> int:
    session.add(Ledger(n=n, pid=os.getpid()))
    await session.flush()
    await session.rollback()
    return n
