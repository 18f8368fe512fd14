"""The threads that run ``def`` tasks (``tasklib_sqla.threads``), without a database."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

import pytest

from tasklib_sqla.threads import TaskThreads

_var: contextvars.ContextVar[str] = contextvars.ContextVar("_var", default="unset")


async def test_results_errors_and_the_callers_context_come_back() -> None:
    pool = TaskThreads(4, "t")
    try:
        _var.set("the caller's")
        assert await pool.run(lambda a, b: a + b, 2, 3) == 5
        assert await pool.run(_var.get) == "the caller's"
        with pytest.raises(ValueError, match="bad"):
            await pool.run(_raise, ValueError("bad"))
        with pytest.raises(RuntimeError, match="StopIteration"):  # a future refuses it as is
            await pool.run(_raise, StopIteration())
        try:
            await pool.run(_raise, SystemExit(3))  # the task's, handed back like any error
        except SystemExit as exc:
            assert exc.code == 3
        else:
            raise AssertionError("SystemExit was not handed back")
        assert threading.current_thread() is threading.main_thread()
        assert (await pool.run(lambda: threading.current_thread().name)).startswith("t_")
    finally:
        pool.shutdown()


async def test_threads_are_started_as_needed_up_to_size_and_reused() -> None:
    pool = TaskThreads(3)
    try:
        for _ in range(20):  # one at a time: one thread does them all
            await pool.run(time.sleep, 0)
        assert len(pool._threads) == 1
        gate = threading.Event()
        running = [pool.run(gate.wait, 5) for _ in range(10)]
        await asyncio.sleep(0.05)
        assert len(pool._threads) == 3  # never more than size, the rest wait their turn
        gate.set()
        assert await asyncio.gather(*running) == [True] * 10
    finally:
        pool.shutdown()


async def test_calls_that_end_together_are_settled_by_one_callback() -> None:
    pool = TaskThreads(10)
    settled: list[int] = []
    settle = pool._settle

    def counting() -> None:
        settled.append(len(pool._finished))
        settle()

    pool._settle = counting  # type: ignore[method-assign]
    try:
        gate = threading.Barrier(10)
        futures = [pool.run(gate.wait, 5) for _ in range(10)]
        # Hold the event loop (a blocking wait, on purpose) until every call has ended: their
        # outcomes wait together for the loop, which must then need one wake-up for all ten.
        deadline = time.monotonic() + 10
        while len(pool._finished) < 10 and time.monotonic() < deadline:
            time.sleep(0.005)  # noqa: ASYNC251 (blocking the loop is the point)
        assert sorted(await asyncio.gather(*futures)) == list(range(10))
        assert settled == [10]
    finally:
        pool.shutdown()


async def test_a_cancelled_call_runs_on_and_its_outcome_is_dropped() -> None:
    pool = TaskThreads(1)
    try:
        started, release = threading.Event(), threading.Event()
        done: list[str] = []

        def slow() -> str:
            started.set()
            release.wait(5)
            done.append("ran")
            return "late"

        future = pool.run(slow)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        future.cancel()
        release.set()
        assert await pool.run(lambda: "next") == "next"  # the same thread, after slow()
        assert done == ["ran"] and future.cancelled()
    finally:
        pool.shutdown()


async def test_shutdown_cancels_calls_not_started_and_ends_the_threads() -> None:
    pool = TaskThreads(1)
    gate = threading.Event()
    first = pool.run(gate.wait, 5)
    queued = pool.run(lambda: "never")
    await asyncio.sleep(0.05)
    pool.shutdown()
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.run(lambda: None)
    gate.set()
    assert await first is True  # the call that had started still ends, and is handed back
    pool._threads[0].join(5)
    assert not pool._threads[0].is_alive()


def _raise(exc: BaseException) -> Any:
    raise exc
