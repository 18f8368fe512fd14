"""Tasks of the fault-injection suite: each run of a task logs one side effect.

The side effects go to ``effect_log`` over a connection of their own, straight to the server
(``FAULTS_EFFECTS_DSN``, never through the proxy), so a task that ran twice shows up as two
rows for its number however the worker's own connections fare.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import psycopg

from tasklib_sqla import TaskRegistry

registry = TaskRegistry()

_pools: dict[int, Any] = {}


async def _pool() -> Any:
    import asyncpg

    loop = id(asyncio.get_running_loop())
    if loop not in _pools:
        _pools[loop] = await asyncpg.create_pool(
            os.environ["FAULTS_EFFECTS_DSN"], min_size=0, max_size=20
        )
    return _pools[loop]


_LOG = (
    "INSERT INTO effect_log (n, pid, worker_pid, at) "
    "VALUES ($1, $2, $3, extract(epoch FROM clock_timestamp()))"
)


@registry.task(name="faults.effect", max_retries=20)
async def effect(n: int, seconds: float) -> int:
    await asyncio.sleep(seconds)
    pool = await _pool()
    await pool.execute(_LOG, n, os.getpid(), os.getpid())
    return n


def _worker_pid() -> int:
    # A timed sync task runs in a child of the forkserver, itself a child of the worker.
    forkserver = os.getppid()
    with open(f"/proc/{forkserver}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@registry.task(name="faults.effect_in_child", max_retries=20, timeout_seconds=30.0)
def effect_in_child(n: int, seconds: float) -> int:
    worker = _worker_pid()
    time.sleep(seconds)
    with psycopg.connect(os.environ["FAULTS_EFFECTS_DSN"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO effect_log (n, pid, worker_pid, at) "
            "VALUES (%s, %s, %s, extract(epoch FROM clock_timestamp()))",
            (n, os.getpid(), worker),
        )
    return n
