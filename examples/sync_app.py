"""A synchronous app (Flask, Django-style scripts, cron jobs) submitting tasks with a sync Session.

    uv run --extra sync python examples/sync_app.py

The app's writes and the task share one transaction on a psycopg connection; the worker that
runs the task is the usual async one (here in burst mode, in the same script, for the demo;
in production: ``tasklib-sqla worker examples.sync_app:tasks``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from sqlalchemy import String, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tasklib_sqla import Config, Task, TaskRegistry, TaskWorker, add_task, get_task
from tasklib_sqla.models import metadata as tasklib_metadata

tasks = TaskRegistry()


class Base(DeclarativeBase):
    pass


class Report(Base):
    __tablename__ = "reports"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))


@tasks.task(name="reports.render", timeout_seconds=60)
def render_report(report_id: int, pages: int) -> dict[str, int]:
    """A sync task with a timeout: the worker runs it in a child process it can kill."""
    return {"report_id": report_id, "pages_rendered": pages}


def main() -> None:
    url = os.environ.get("TASKLIB_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    sync_engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    with sync_engine.begin() as conn:
        Base.metadata.drop_all(conn)
        tasklib_metadata.drop_all(conn)
        tasklib_metadata.create_all(conn)
        Base.metadata.create_all(conn)

    with Session(sync_engine) as session, session.begin():
        session.add(Report(id=1, title="Quarterly numbers"))
        task_id = add_task(session, render_report, report_id=1, pages=12)
    print(f"committed report 1 and task {task_id}")

    logging.basicConfig(level=logging.INFO, format="  worker | %(message)s", stream=sys.stdout)
    asyncio.run(TaskWorker(Config(database_url=url), registry=tasks, burst=True).run())

    with Session(sync_engine) as session:
        task = get_task(task_id, session=session)  # a plain call with a sync Session
        assert task is not None
        print(f"task {task.name}: {task.state}, result {task.result}")
        print("tasks in the table:", session.scalars(select(Task.name)).all())
    sync_engine.dispose()


if __name__ == "__main__":
    main()
