"""Retry control: Snooze, FailNow, retry_on / no_retry_on, per-task backoff and jitter."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from tasklib_sqla import Config, RetryPolicy, Snooze, TaskRegistry, submit_task
from tasklib_sqla.finisher import outcome_for
from tasklib_sqla.models import TaskState
from tasklib_sqla.retry import jittered
from tasklib_sqla.runner import ClaimedTask, Failure
from tasklib_sqla.testing import TaskQueue
from tests import tasks as t


@pytest.fixture
def tasklib_registry() -> TaskRegistry:
    return t.registry


# -- pure decisions ---------------------------------------------------------------------------


def test_jitter_spreads_delays_within_its_fraction_and_the_cap() -> None:
    assert jittered(10.0, 0.1, 100.0, lambda: 0.0) == 9.0
    assert jittered(10.0, 0.1, 100.0, lambda: 0.5) == 10.0
    assert jittered(10.0, 0.1, 100.0, lambda: 0.999999) == pytest.approx(11.0, abs=1e-4)
    assert jittered(100.0, 0.5, 100.0, lambda: 0.99) == 100.0  # never past the cap
    assert jittered(10.0, 0.0, 100.0, lambda: 0.0) == 10.0  # off


def test_a_policy_overrides_the_config_field_by_field() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=3.0, jitter=0.0)
    delays = [
        policy.delay(n, base=5.0, multiplier=2.0, max_seconds=3600.0, jitter=0.1)
        for n in (1, 2, 3, 4)
    ]
    assert delays == [1.0, 2.0, 3.0, 3.0]  # the Config's multiplier, the policy's base and cap


def test_which_exceptions_are_retried() -> None:
    p = RetryPolicy(retry_on=(ConnectionError,), no_retry_on=(ConnectionRefusedError,))
    assert p.retries(ConnectionResetError())
    assert not p.retries(ConnectionRefusedError())  # no_retry_on wins
    assert not p.retries(ValueError())
    assert RetryPolicy().retries(ValueError())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_delay": -1},
        {"multiplier": 0.5},
        {"max_delay": -1},
        {"jitter": 2},
        {"retry_on": [ValueError]},
        {"no_retry_on": (ValueError, 3)},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="invalid RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_snooze_needs_a_delay() -> None:
    with pytest.raises(ValueError):
        Snooze(-1)


def _job(attempt: int, max_retries: int = 3) -> ClaimedTask:
    return ClaimedTask(uuid.uuid4(), "n", "{}", attempt, max_retries, None)


def test_outcomes_for_snoozes_policies_and_jitter() -> None:
    cfg = Config(base_retry_delay_seconds=10.0, retry_jitter=0.2)
    snoozed = outcome_for(_job(1), Failure("Snooze", "s", None, snooze=7.0), cfg)
    assert (snoozed.state, snoozed.delay, snoozed.snoozed) == (TaskState.PENDING, 7.0, True)
    assert snoozed.failure is None
    retried = outcome_for(_job(1), Failure("E", "m", None), cfg, rand=lambda: 0.0)
    assert (retried.state, retried.delay) == (TaskState.PENDING, 8.0)  # 10 s - 20%
    final = outcome_for(_job(4), Failure("E", "m", None), cfg)
    assert (final.state, final.delay) == (TaskState.FAILED, None)
    now = outcome_for(_job(1), Failure("E", "m", None, retryable=False), cfg)
    assert now.state is TaskState.FAILED


# -- against the database ----------------------------------------------------------------------


async def test_snooze_runs_again_later_without_spending_an_attempt(tasklib: TaskQueue) -> None:
    key = uuid.uuid4().hex
    # max_retries=0: a counted attempt would have failed the task for good.
    await submit_task(t.snoozer, key=key, times=2)
    report = await tasklib.arun()
    (row,) = report.completed
    assert row.result == {"calls": 3, "attempt": 1}
    assert row.attempts == 1 and row.errors == [] and row.error is None


async def test_fail_now_ends_the_task_whatever_retries_remain(tasklib: TaskQueue) -> None:
    await submit_task(t.fail_now, reason="card declined")
    await submit_task(t.fail_now_child, reason="in a child")
    report = await tasklib.arun(check=False)
    by_name = {r.name: r for r in report.failed}
    row = by_name["tests.fail_now"]
    assert row.attempts == 1 and row.error == "FailNow: gave up: card declined"
    assert "KeyError" in row.errors[0]["traceback"]  # the cause is kept
    child = by_name["tests.fail_now_child"]
    assert child.attempts == 1 and child.error == "FailNow: in a child"


@pytest.mark.parametrize(("kind", "attempts"), [("conn", 3), ("refused", 1), ("value", 1)])
async def test_retry_on_and_no_retry_on(tasklib: TaskQueue, kind: str, attempts: int) -> None:
    await submit_task(t.picky, kind=kind)
    (row,) = (await tasklib.arun(check=False)).failed
    assert row.attempts == attempts


async def test_a_task_sets_its_own_backoff(tasklib: TaskQueue) -> None:
    await submit_task(t.slow_retry)
    await tasklib.arun(check=False)
    row = await tasklib.aassert_submitted(t.slow_retry)
    assert row.state == "pending" and row.attempts == 1
    wait = (row.scheduled_at - datetime.now(UTC)).total_seconds()
    assert 3600 * 0.9 - 5 < wait <= 3600 * 1.1  # its own base delay, with the default jitter
