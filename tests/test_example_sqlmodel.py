"""examples/sqlmodel_app.py: a TaskMixin table on SQLModel's metadata, SQLModel's sessions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from examples import sqlmodel_app as ex
from tasklib_sqla import TaskMixin
from tasklib_sqla.testing import TaskQueue, TestDatabase

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tasklib_metadata() -> MetaData:
    return SQLModel.metadata


@pytest.fixture
def tasklib_model() -> type[TaskMixin]:
    return ex.AppTask


def test_the_task_table_lives_in_sqlmodels_metadata() -> None:
    assert SQLModel.metadata.tables["tasks"] is ex.AppTask.__table__
    assert "hero" in SQLModel.metadata.tables


async def test_a_hero_and_its_task_commit_together(
    tasklib: TaskQueue, tasklib_database: TestDatabase
) -> None:
    engine = create_async_engine(tasklib_database.url)
    try:
        async with AsyncSession(engine) as session:
            async with session.begin():
                await ex.recruit(session, "Rusty-Man")
                await session.rollback()  # changed its mind: no hero, no task
            async with session.begin():
                hero_id, task_id = await ex.recruit(session, "Deadpond")
        assert (await tasklib.aassert_submitted(ex.welcome_hero, hero_id=hero_id)).id == task_id
        assert len(await tasklib.asubmitted()) == 1

        await tasklib.arun()
        async with AsyncSession(engine) as session:
            welcomed = (await session.exec(select(Hero).where(Hero.welcomed))).all()
        assert [h.name for h in welcomed] == ["Deadpond"]
        assert (await tasklib.aassert_submitted(ex.welcome_hero)).result == "welcome, Deadpond"
    finally:
        await engine.dispose()


Hero = ex.Hero


@pytest.mark.slow
def test_the_script_runs(tasklib_database: TestDatabase) -> None:
    env = {**os.environ, "TASKLIB_DATABASE_URL": tasklib_database.url}
    done = subprocess.run(
        [sys.executable, "examples/sqlmodel_app.py"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "task completed: 'welcome, Deadpond'; welcomed: ['Deadpond']" in done.stdout
