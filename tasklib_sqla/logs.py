"""Worker logs with structured fields, as text for people or one JSON object per line.

Every record about a task carries ``task_id``, ``task_name``, ``attempt`` and ``worker_id`` as
attributes of the ``LogRecord`` (``logging``'s ``extra``), whatever the format: a JSON
formatter of your own, or a log shipper's, finds them there. :class:`JsonFormatter` writes
them, with the time, level, logger and message, as one JSON object per line
(``tasklib-sqla worker --log-format json``).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

#: The structured fields a record may carry, in the order JSON lines show them.
FIELDS = ("task_id", "task_name", "attempt", "worker_id", "queue", "error_type")

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LogFormat = Literal["text", "json"]


class _Job(Protocol):
    @property
    def id(self) -> Any: ...
    @property
    def name(self) -> str: ...
    @property
    def attempt(self) -> int: ...


def task_fields(job: _Job, worker_id: str, **more: Any) -> dict[str, Any]:
    """``extra=`` for a log call about one attempt of a task."""
    return {
        "task_id": str(job.id),
        "task_name": job.name,
        "attempt": job.attempt,
        "worker_id": worker_id,
        **more,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message``, the structured
    fields present, and ``exception`` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Send logs to stderr as ``fmt`` at ``level`` (what the CLI does; apps keep their own)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}: text or json")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
