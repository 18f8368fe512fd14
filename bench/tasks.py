"""The benchmark's tasks: no-ops, and a probe that measures submit-to-start latency."""

from __future__ import annotations

import time

from tasklib_sqla import TaskRegistry

registry = TaskRegistry()


@registry.task(name="bench.noop_async")
async def noop_async(n: int) -> None:
    return None


@registry.task(name="bench.noop_sync")
def noop_sync(n: int) -> None:
    return None


@registry.task(name="bench.probe")
async def probe(sent: float) -> float:
    """Returns how long after ``sent`` (a wall-clock time) the task started, in ms."""
    return (time.time() - sent) * 1000.0
