"""Structured worker logs: fields on every task record, and JSON lines from the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tasklib_sqla import TaskClient
from tasklib_sqla.logs import JsonFormatter, configure
from tests import tasks as t

ROOT = Path(__file__).resolve().parents[1]


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord(
        "tasklib_sqla.worker", logging.WARNING, __file__, 1, "m %s", ("x",), None
    )
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_json_lines_carry_the_fields_present() -> None:
    line = json.loads(
        JsonFormatter().format(_record(task_id="abc", task_name="n", attempt=2, worker_id="w"))
    )
    assert line["message"] == "m x" and line["level"] == "WARNING"
    assert line["logger"] == "tasklib_sqla.worker" and line["ts"].endswith("+00:00")
    assert (line["task_id"], line["task_name"], line["attempt"], line["worker_id"]) == (
        "abc",
        "n",
        2,
        "w",
    )
    assert "error_type" not in line and "exception" not in line


def test_json_lines_hold_the_traceback_on_one_line() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = _record()
        record.exc_info = sys.exc_info()
    text = JsonFormatter().format(record)
    assert "\n" not in text
    assert "RuntimeError: boom" in json.loads(text)["exception"]


def test_configure_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="text or json"):
        configure("INFO", "yaml")  # type: ignore[arg-type]


@pytest.mark.slow
async def test_the_cli_worker_writes_json_lines(client: TaskClient[Any], db_url: str) -> None:
    ok = await client.submit(t.add, a=1, b=2)
    bad = await client.submit(t.always_fails, message="no")
    env = {**os.environ, "TASKLIB_DATABASE_URL": db_url, "TASKLIB_BASE_RETRY_DELAY_SECONDS": "0"}
    cmd = ["tasklib_sqla", "worker", "tests.tasks:registry", "--burst", "--log-format", "json"]
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", *cmd],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    about = {(r.get("task_id"), r["level"]): r for r in lines if "task_id" in r}
    completed = about[(str(ok), "INFO")]
    assert completed["task_name"] == "tests.add" and completed["attempt"] == 1
    assert completed["worker_id"] and "completed" in completed["message"]
    failed = about[(str(bad), "ERROR")]
    assert failed["error_type"] == "RuntimeError" and failed["attempt"] == 3
