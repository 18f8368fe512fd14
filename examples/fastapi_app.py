"""FastAPI with tasklib-sqla: a task submitted inside the request's transaction.

``POST /users`` inserts a user and adds a welcome task in one transaction: both are committed,
or (a duplicate address, say) neither. ``GET /tasks/{id}`` shows a task. The task table is
declared with ``TaskMixin`` on the app's own ``Base``, so the app's Alembic migrations carry it.

Run the app and, beside it, a worker (any number, on any machines)::

    export TASKLIB_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/postgres
    uvicorn examples.fastapi_app:app
    tasklib-sqla worker examples.fastapi_app --model examples.fastapi_app:AppTask

For a small deployment the app can run a worker itself, in its lifespan:
``create_app(run_worker=True)`` (or ``TASKLIB_RUN_WORKER=1``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy import String
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasklib_sqla import Config, TaskMixin, TaskWorker, add_task, get_task, init, task
from tasklib_sqla.urls import async_url


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)


class AppTask(TaskMixin, Base):
    __tablename__ = "tasks"


@task(name="examples.fastapi.send_welcome", max_retries=5)
async def send_welcome(user_id: int, email: str) -> str:
    await asyncio.sleep(0)  # an email API call would go here
    return f"welcome sent to {email} (user {user_id})"


class NewUser(BaseModel):
    email: str


async def db_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


DB = Annotated[AsyncSession, Depends(db_session)]


def create_app(database_url: str | None = None, *, run_worker: bool | None = None) -> FastAPI:
    config = Config.from_env(database_url=database_url) if database_url else Config.from_env()
    if run_worker is None:
        run_worker = os.environ.get("TASKLIB_RUN_WORKER") == "1"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_async_engine(async_url(config.database_url))
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        # add_task/get_task use the app's task model from here on.
        init(config, model=AppTask, engine=engine)
        worker = runner = None
        if run_worker:
            worker = TaskWorker(config, concurrency=4, model=AppTask, handle_signals=False)
            runner = asyncio.create_task(worker.run())
        try:
            yield
        finally:
            if worker is not None and runner is not None:
                worker.stop()  # running tasks get shutdown_grace_seconds to finish
                await runner
            await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/users", status_code=201)
    async def create_user(body: NewUser, db: DB) -> dict[str, Any]:
        try:
            async with db.begin():
                user = User(email=body.email)
                db.add(user)
                await db.flush()  # the user's id, for the task's arguments
                task_id = add_task(db, send_welcome, user_id=user.id, email=user.email)
        except IntegrityError:
            # Rolled back: no user, and no welcome task either.
            raise HTTPException(409, f"{body.email} is already registered") from None
        return {"user_id": user.id, "task_id": str(task_id)}

    @app.get("/tasks/{task_id}")
    async def show_task(task_id: uuid.UUID, db: DB) -> dict[str, Any]:
        row = await get_task(task_id, db)
        if row is None:
            raise HTTPException(404, "no such task")
        return {
            "id": str(row.id),
            "name": row.name,
            "state": row.state,
            "attempts": row.attempts,
            "result": row.result,
            "error": row.error,
        }

    return app


# For `uvicorn examples.fastapi_app:app`: configured from the environment, connects at startup.
app = create_app()
