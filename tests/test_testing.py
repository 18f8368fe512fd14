"""The pytest plugin users test their own code with (``tasklib_sqla.testing``)."""

from __future__ import annotations

import asyncio
import textwrap
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from tasklib_sqla import TaskRegistry, add_task, get_task, submit_task
from tasklib_sqla.testing import TaskQueue, TestDatabase, _server_url
from tests import tasks as t


@pytest.fixture
def tasklib_registry() -> TaskRegistry:
    return t.registry


def test_each_test_gets_its_own_database(tasklib_database: TestDatabase) -> None:
    assert tasklib_database.name.startswith("tasklib_p")
    assert tasklib_database.url.startswith("postgresql+asyncpg://")
    assert tasklib_database.sync_url.startswith("postgresql+psycopg://")


def test_a_sync_test_submits_and_runs(tasklib: TaskQueue) -> None:
    task_id = asyncio.run(submit_task(t.add, a=1, b=2))
    row = tasklib.assert_submitted(t.add, a=1)
    assert row.id == task_id and row.queue == "default" and row.state == "pending"
    report = tasklib.run()
    assert [r.id for r in report.completed] == [task_id]
    done = tasklib.assert_submitted(t.add, a=1)
    assert done.state == "completed" and done.result == 3


async def test_an_async_test_runs_what_tasks_submit(tasklib: TaskQueue) -> None:
    parent = await submit_task(t.spawn, a=4)
    report = await tasklib.arun()
    assert {r.name for r in report.completed} == {"tests.spawn", "tests.add"}
    child = await tasklib.aassert_submitted(t.add, a=4)
    assert child.result == 5
    row = await get_task(parent)
    assert row is not None and row.result == str(child.id)


async def test_sync_helpers_work_inside_an_async_test(tasklib: TaskQueue) -> None:
    await submit_task(t.add, a=7)
    # The plain forms must not trip over the running loop (they use a thread of their own).
    assert tasklib.assert_submitted(t.add, a=7).state == "pending"
    assert len(tasklib.run().completed) == 1


async def test_the_outbox_is_seen_only_after_commit(tasklib: TaskQueue, engine_url: str) -> None:
    engine = create_async_engine(engine_url)
    try:
        async with AsyncSession(engine) as session:
            async with session.begin():
                add_task(session, t.add, a=10)
                await session.flush()
                await session.rollback()
            await tasklib.aassert_not_submitted(t.add)
            async with session.begin():
                add_task(session, t.add, a=11)
        await tasklib.aassert_submitted(t.add, a=11)
        await tasklib.aassert_not_submitted(t.add, a=10)
    finally:
        await engine.dispose()


@pytest.fixture
def engine_url(tasklib_database: TestDatabase) -> str:
    return tasklib_database.url


async def test_arguments_match_in_their_stored_form(tasklib: TaskQueue) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = uuid.uuid4()
    order = t.Order(sku="A-1", quantity=2)
    await submit_task(
        t.rich, when=when, ident=ident, color=t.Color.RED, point=t.Point(1, 2), order=order
    )
    row = await tasklib.aassert_submitted(t.rich, order=order, color=t.Color.RED, when=when)
    assert row.args["ident"] == str(ident)
    with pytest.raises(AssertionError, match=r"no task tests\.rich"):
        await tasklib.aassert_submitted(t.rich, order=t.Order(sku="A-1", quantity=3))


async def test_assertion_messages_say_what_is_there(tasklib: TaskQueue) -> None:
    with pytest.raises(AssertionError, match="the table holds no tasks"):
        await tasklib.aassert_submitted(t.add)
    await submit_task(t.add, a=1)
    await submit_task(t.add, a=1, b=5)
    with pytest.raises(AssertionError, match=r"no task tests.add\(a=2\).*holds 2: tests.add"):
        await tasklib.aassert_submitted(t.add, a=2)
    with pytest.raises(AssertionError, match=r"2 tasks tests\.add"):
        await tasklib.aassert_submitted(t.add, a=1)
    assert (await tasklib.aassert_submitted(t.add, a=1, b=5)).args == {"a": 1, "b": 5}
    with pytest.raises(AssertionError, match=r"task tests\.add was submitted"):
        await tasklib.aassert_not_submitted(t.add, b=5)
    with pytest.raises(ValueError, match="no parameters"):
        await tasklib.aassert_submitted(t.add, c=1)
    assert len(await tasklib.asubmitted(t.add, state="pending")) == 2


async def test_failures_raise_unless_asked_not_to(tasklib: TaskQueue) -> None:
    await submit_task(t.always_fails, message="boom")
    with pytest.raises(AssertionError, match=r"1 task\(s\) failed:\n  tests.fail .*boom"):
        await tasklib.arun()
    await submit_task(t.always_fails, message="again")
    report = await tasklib.arun(check=False)
    (failed,) = report.failed
    # Retries ran for real, due at once (tasklib_config sets no retry delay): 1 + max_retries.
    assert failed.attempts == 3 and "again" in (failed.error or "")


async def test_scheduled_tasks_run_only_when_asked(tasklib: TaskQueue) -> None:
    later = await submit_task(t.add.options(delay=3600), a=1)
    assert (await tasklib.arun()).finished == []
    report = await tasklib.arun(include_scheduled=True)
    assert [r.id for r in report.completed] == [later]


async def test_tasks_no_registry_knows_stay_pending(tasklib: TaskQueue) -> None:
    other = TaskRegistry()

    @other.task(name="elsewhere.only")
    def only_elsewhere() -> None: ...

    await submit_task(only_elsewhere)
    await submit_task(t.add, a=1)
    report = await tasklib.arun()
    assert [r.name for r in report.completed] == ["tests.add"]
    assert (await tasklib.aassert_submitted(only_elsewhere)).state == "pending"


def test_a_users_project_uses_the_plugin(pytester: pytest.Pytester) -> None:
    """As a user would: their own model on their own metadata, the plugin from conftest.py."""
    pytester.makeconftest(
        """
        import pytest
        pytest_plugins = ["tasklib_sqla.testing"]

        @pytest.fixture
        def tasklib_metadata():
            from app import Base
            return Base.metadata

        @pytest.fixture
        def tasklib_model():
            from app import Job
            return Job

        @pytest.fixture
        def tasklib_registry():
            from app import registry
            return registry
        """
    )
    pytester.makepyfile(
        app=textwrap.dedent(
            """
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
            from tasklib_sqla import TaskMixin, TaskRegistry

            class Base(DeclarativeBase):
                pass

            class Job(TaskMixin, Base):
                __tablename__ = "jobs"
                tenant: Mapped[str | None] = mapped_column(default=None)

            registry = TaskRegistry()

            @registry.task(name="app.double")
            def double(n: int) -> int:
                return 2 * n
            """
        ),
        test_app=textwrap.dedent(
            """
            import asyncio
            from tasklib_sqla import submit_task
            from app import double

            def test_double(tasklib):
                asyncio.run(submit_task(double, n=21))
                assert tasklib.assert_submitted(double, n=21).tenant is None
                tasklib.run()
                assert tasklib.assert_submitted(double).result == 42

            def test_isolated(tasklib, tasklib_database):
                assert tasklib.submitted() == []
                with open("names.txt", "a") as f:
                    f.write(tasklib_database.name + "\\n")
            """
        ),
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    # The test's database and the run's template are gone once the run ends.
    (name,) = (pytester.path / "names.txt").read_text().split()
    prefix = name.rsplit("_", 1)[0] + "_"
    url = _server_url("postgres")
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname="postgres"
    ) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
        ).fetchall()
    assert left == []
