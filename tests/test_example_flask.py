"""examples/flask_app.py through Flask's own test client, against the real database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from sqlalchemy import MetaData

from examples import flask_app as ex
from tasklib_sqla import TaskMixin
from tasklib_sqla.testing import TaskQueue, TestDatabase


@pytest.fixture
def tasklib_metadata() -> MetaData:
    return ex.Base.metadata


@pytest.fixture
def tasklib_model() -> type[TaskMixin]:
    return ex.AppTask


@pytest.fixture
def client(tasklib: TaskQueue, tasklib_database: TestDatabase) -> Iterator[FlaskClient]:
    app = ex.create_app(tasklib_database.sync_url)
    app.config["TESTING"] = True
    yield app.test_client()
    with app.app_context():
        ex.db.engine.dispose()  # before the plugin drops the database


def test_an_order_and_its_receipt_task_commit_together(
    client: FlaskClient, tasklib: TaskQueue
) -> None:
    created = client.post("/orders", json={"item": "tea"})
    assert created.status_code == 201, created.text
    body = created.get_json()
    row = tasklib.assert_submitted(ex.send_receipt, order_id=body["order_id"], item="tea")
    assert str(row.id) == body["task_id"]
    assert client.get(f"/tasks/{body['task_id']}").get_json()["state"] == "pending"

    report = tasklib.run()
    assert [str(r.id) for r in report.completed] == [body["task_id"]]
    shown = client.get(f"/tasks/{body['task_id']}").get_json()
    assert shown["state"] == "completed"
    assert shown["result"] == f"receipt for order {body['order_id']} (tea)"
    assert client.get("/tasks/00000000-0000-0000-0000-000000000000").status_code == 404


def test_a_failed_request_leaves_no_task(client: FlaskClient, tasklib: TaskQueue) -> None:
    # No "item": the view fails before commit, and Flask-SQLAlchemy rolls the session back.
    with pytest.raises(KeyError):
        client.post("/orders", json={})
    tasklib.assert_not_submitted(ex.send_receipt)
