"""Flask with Flask-SQLAlchemy: tasks added to the request's (synchronous) session.

``POST /orders`` inserts an order and adds a receipt task with ``db.session``; one
``db.session.commit()`` writes both. ``GET /tasks/<id>`` shows a task. The task table is a
``TaskMixin`` model on the app's ``Base``, so Flask-Migrate/Alembic picks it up with the rest.

The app keeps its psycopg URL; workers accept the same URL (they connect with asyncpg)::

    export TASKLIB_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    flask --app examples.flask_app run
    tasklib-sqla worker examples.flask_app --model examples.flask_app:AppTask
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from flask import Flask, abort, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasklib_sqla import Config, TaskMixin, add_task, get_task, init, task


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(200))


class AppTask(TaskMixin, Base):
    __tablename__ = "tasks"


@task(name="examples.flask.send_receipt", max_retries=3)
def send_receipt(order_id: int, item: str) -> str:
    # A sync task runs on one of the worker's threads: blocking calls are fine here.
    time.sleep(0.01)
    return f"receipt for order {order_id} ({item})"


def create_app(database_url: str | None = None) -> Flask:
    config = Config.from_env(database_url=database_url) if database_url else Config.from_env()
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = config.database_url
    db.init_app(app)
    # add_task/get_task with db.session use the app's task model from here on.
    init(config, model=AppTask)

    @app.post("/orders")
    def create_order() -> tuple[dict[str, Any], int]:
        payload = request.get_json(force=True)
        order = Order(item=str(payload["item"]))
        db.session.add(order)
        db.session.flush()  # the order's id, for the task's arguments
        task_id = add_task(db.session, send_receipt, order_id=order.id, item=order.item)
        db.session.commit()  # the order and its task, together
        return {"order_id": order.id, "task_id": str(task_id)}, 201

    @app.get("/tasks/<uuid:task_id>")
    def show_task(task_id: uuid.UUID) -> dict[str, Any]:
        row = get_task(task_id, db.session)
        if row is None:
            abort(404)
        return {"id": str(row.id), "name": row.name, "state": row.state, "result": row.result}

    return app
