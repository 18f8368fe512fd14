"""SQLModel with tasklib-sqla: the task table on the SQLModel app's own metadata.

SQLModel table classes are pydantic models, and ``TaskMixin`` is a SQLAlchemy declarative mixin;
the two do not mix in one class. They do not need to: a declarative base that shares
``SQLModel.metadata`` puts the task table beside the SQLModel tables, so
``SQLModel.metadata.create_all()`` and Alembic autogenerate (pointed at ``SQLModel.metadata``)
include it, and SQLModel's sessions (SQLAlchemy sessions underneath) take tasks like any other.

Run it (a worker in the same script, in burst mode, for the demonstration)::

    TASKLIB_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/postgres \\
        python examples/sqlmodel_app.py
"""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tasklib_sqla import (
    Config,
    TaskMixin,
    TaskWorker,
    add_task,
    get_client,
    get_task,
    init,
    task,
)
from tasklib_sqla.urls import async_url


class Hero(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str
    welcomed: bool = False


class TaskBase(DeclarativeBase):
    # The SQLModel app's metadata: one create_all, one set of migrations.
    metadata = SQLModel.metadata


class AppTask(TaskMixin, TaskBase):
    __tablename__ = "tasks"


@task(name="examples.sqlmodel.welcome_hero")
async def welcome_hero(hero_id: int) -> str:
    # A task uses the app's models and sessions like any other code of the app. The installed
    # client's engine (init(), or the worker's own) is one for the running event loop.
    async with AsyncSession(get_client().engine) as session, session.begin():
        hero = await session.get(Hero, hero_id)
        if hero is None:
            return "gone"
        hero.welcomed = True
        return f"welcome, {hero.name}"


async def recruit(session: AsyncSession, name: str) -> tuple[int, uuid.UUID]:
    """Add a hero and its welcome task to the caller's transaction; return both ids."""
    hero = Hero(name=name)
    session.add(hero)
    await session.flush()
    assert hero.id is not None
    return hero.id, add_task(session, welcome_hero, hero_id=hero.id)


async def main() -> None:
    config = Config.from_env()
    engine = create_async_engine(async_url(config.database_url))
    init(config, model=AppTask, engine=engine)
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)

    async with AsyncSession(engine) as session, session.begin():
        hero_id, task_id = await recruit(session, "Deadpond")
    print(f"hero {hero_id} recruited, task {task_id} submitted with it")

    await TaskWorker(config, model=AppTask, burst=True, handle_signals=False).run()

    async with AsyncSession(engine) as session:
        row = await get_task(task_id, session)
        heroes = (await session.exec(select(Hero).where(Hero.welcomed))).all()
    assert row is not None
    print(f"task {row.state}: {row.result!r}; welcomed: {[h.name for h in heroes]}")
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
