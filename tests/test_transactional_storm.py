"""The proof of transactional tasks: kill -9 storms and lost leases write each task once.

Three CLI workers drain transactional tasks (each books one ``ledger`` row in the worker's
transaction, then waits a little) side by side with their ordinary twins (the same row, written
in a transaction of its own). Meanwhile a worker is SIGKILLed every second and another started,
and now and then one is frozen (SIGSTOP) past its lease so that its tasks are run again
elsewhere while it still holds them, then thawed. Every task must end completed; each
transactional task must have written exactly one row; the ordinary ones show the duplicates
that at-least-once delivery allows.

``TASKLIB_FAULTS_PROFILE=long`` runs 5,000 tasks of each kind instead of 600.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from tasklib_sqla import TaskClient
from tests import tx_tasks as tx
from tests.test_multiprocess import Workers, scalar

pytestmark = pytest.mark.slow

LONG = os.environ.get("TASKLIB_FAULTS_PROFILE") == "long"
PER_KIND = 5000 if LONG else 600
ENV = {
    "TASKLIB_LOCK_TIMEOUT_SECONDS": "2",
    "TASKLIB_BASE_RETRY_DELAY_SECONDS": "0",
    "TASKLIB_POLL_INTERVAL_SECONDS": "0.2",
}


def _thaw_later(proc: subprocess.Popen[str], after: float) -> None:
    def thaw() -> None:
        time.sleep(after)
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    threading.Thread(target=thaw, daemon=True).start()


@pytest.mark.timeout(600)
async def test_kill_storm_and_lost_leases_write_each_transactional_task_once(
    db_url: str, sync_engine: Engine, client: TaskClient[Any], tmp_path: Path
) -> None:
    tx.Base.metadata.create_all(sync_engine)
    for start in range(0, PER_KIND, 500):
        ns = range(start, min(start + 500, PER_KIND))
        await client.submit_many(tx.book, [{"n": n, "seconds": 0.1} for n in ns])
        await client.submit_many(tx.plain_book, [{"n": n, "seconds": 0.1} for n in ns])
    workers = Workers(db_url, tmp_path)
    rng = random.Random(7)
    kills = freezes = 0
    started = time.monotonic()

    def spawn() -> subprocess.Popen[str]:
        return workers.start("--concurrency", "10", target="tests.tx_tasks:registry", **ENV)

    live = [spawn() for _ in range(3)]
    try:
        while scalar(sync_engine, "SELECT count(*) FROM tasks WHERE state <> 'completed'"):
            assert time.monotonic() - started < 500, "the storm never drained"
            await asyncio.sleep(1.0)
            victim = live.pop(rng.randrange(len(live)))
            victim.send_signal(signal.SIGCONT)  # a frozen worker dies as well as any other
            victim.kill()
            victim.wait(10)
            kills += 1
            live.append(spawn())
            if kills % 4 == 0:
                frozen = rng.choice(live)
                frozen.send_signal(signal.SIGSTOP)
                _thaw_later(frozen, 3.5)  # past the 2 s lease: its tasks are taken over
                freezes += 1
    finally:
        for p in live:
            p.send_signal(signal.SIGCONT)
        workers.stop_all()
    drained = time.monotonic() - started

    states = scalar(sync_engine, "SELECT string_agg(DISTINCT state, ',') FROM tasks")
    assert states == "completed"
    rows_per_task = dict(
        (kind, scalar(sync_engine, f"SELECT count(*) FROM ledger WHERE transactional = {kind}"))
        for kind in (0, 1)
    )
    twice_tx = scalar(
        sync_engine,
        "SELECT count(*) FROM (SELECT n FROM ledger WHERE transactional = 1 "
        "GROUP BY n HAVING count(*) > 1) d",
    )
    missing_tx = PER_KIND - scalar(
        sync_engine, "SELECT count(DISTINCT n) FROM ledger WHERE transactional = 1"
    )
    twice_plain = scalar(
        sync_engine,
        "SELECT count(*) FROM (SELECT n FROM ledger WHERE transactional = 0 "
        "GROUP BY n HAVING count(*) > 1) d",
    )
    reruns = scalar(
        sync_engine, "SELECT count(*) FROM tasks WHERE attempts > 1 AND name = 'tx.book'"
    )
    print(
        f"\ntransactional storm: {PER_KIND} + {PER_KIND} tasks drained in {drained:.1f} s, "
        f"{kills} kills, {freezes} freezes past the lease; transactional: "
        f"{rows_per_task[1]} rows, {twice_tx} written twice, {missing_tx} missing, "
        f"{reruns} tasks run more than once; ordinary: {rows_per_task[0]} rows, "
        f"{twice_plain} written twice"
    )
    assert (twice_tx, missing_tx, rows_per_task[1]) == (0, 0, PER_KIND)
    # The faults did hit running tasks: transactional ones were rerun, ordinary ones
    # show the duplicates of at-least-once delivery.
    assert reruns > 0
    assert twice_plain > 0
    assert kills >= 5
