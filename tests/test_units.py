"""Pure logic, no database: retry decisions, Config, task definitions, the public API."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta

import pytest

import tasklib_sqla
from tasklib_sqla import (
    Config,
    ConfigError,
    TaskDefinitionError,
    TaskRegistry,
    TaskState,
    UnknownTaskError,
    backoff_delay,
    decide_retry,
)
from tasklib_sqla.collector import young_threshold
from tasklib_sqla.runner import safe_str
from tests.tasks import Order

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_backoff_schedule_matches_the_faq() -> None:
    assert [backoff_delay(n, 5.0, 2.0) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert backoff_delay(2, 10.0, 3.0) == 30.0
    with pytest.raises(ValueError):
        backoff_delay(0, 5.0, 2.0)


def test_decide_retry_until_max_retries_then_fail() -> None:
    kw = {"max_retries": 3, "now": NOW, "base_seconds": 5.0, "multiplier": 2.0}
    decisions = [decide_retry(attempt=a, **kw) for a in (1, 2, 3, 4)]  # type: ignore[arg-type]
    assert [d.state for d in decisions] == [TaskState.PENDING] * 3 + [TaskState.FAILED]
    assert [d.run_at for d in decisions[:3]] == [NOW + timedelta(seconds=s) for s in (5, 10, 20)]
    assert decisions[0].will_retry and not decisions[3].will_retry
    assert decisions[3].run_at is None and decisions[3].delay_seconds is None
    assert decide_retry(attempt=1, retryable=False, **kw).state is TaskState.FAILED  # type: ignore[arg-type]
    assert (
        decide_retry(attempt=1, max_retries=0, now=NOW, base_seconds=5, multiplier=2).state
        == "failed"
    )


def test_config_defaults_match_the_faq() -> None:
    c = Config()
    assert (c.base_retry_delay_seconds, c.retry_backoff_multiplier, c.lock_timeout_seconds) == (
        5.0,
        2.0,
        600.0,
    )
    assert c.heartbeat_seconds == 200.0


def test_config_from_env() -> None:
    env = {
        "TASKLIB_DATABASE_URL": "postgresql://u@h/db",
        "TASKLIB_LOCK_TIMEOUT_SECONDS": "120",
        "TASKLIB_CLAIM_BATCH_SIZE": "50",
        "TASKLIB_NOTIFY_CHANNEL": "jobs",
    }
    c = Config.from_env(env, poll_interval_seconds=0.5)
    assert (c.database_url, c.lock_timeout_seconds, c.claim_batch_size) == (
        "postgresql://u@h/db",
        120.0,
        50,
    )
    assert (c.notify_channel, c.poll_interval_seconds) == ("jobs", 0.5)
    assert Config.from_env({"DATABASE_URL": "postgresql://x/y"}).database_url == "postgresql://x/y"
    with pytest.raises(ConfigError, match="not a number"):
        Config.from_env({"TASKLIB_LOCK_TIMEOUT_SECONDS": "ten"})


def test_config_gc_threshold_from_env() -> None:
    assert Config().gc_threshold == 10_000
    assert Config.from_env({"TASKLIB_GC_THRESHOLD": "5000"}).gc_threshold == 5000
    assert Config.from_env({"TASKLIB_GC_THRESHOLD": "none"}).gc_threshold is None
    with pytest.raises(ConfigError, match="gc_threshold"):
        Config(gc_threshold=0)


def test_the_collector_threshold_is_raised_while_workers_run_and_put_back() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        first, second = young_threshold(10_000), young_threshold(5_000)
        first.__enter__()
        assert gc.get_threshold() == (10_000, 10, 10)
        second.__enter__()  # a second worker in the process: the first one's setting holds
        assert gc.get_threshold() == (10_000, 10, 10)
        first.__exit__(None, None, None)  # not the last one to stop: nothing put back yet
        assert gc.get_threshold() == (10_000, 10, 10)
        second.__exit__(None, None, None)
        assert gc.get_threshold() == (700, 10, 10)
        with young_threshold(None):
            assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(20_000, 10, 10)
        with young_threshold(10_000):  # higher already: never lowered
            assert gc.get_threshold() == (20_000, 10, 10)
        assert gc.get_threshold() == (20_000, 10, 10)
        gc.set_threshold(700, 10, 10)
        with young_threshold(10_000):
            gc.set_threshold(3_000, 10, 10)  # the application changed it meanwhile: it stays
        assert gc.get_threshold() == (3_000, 10, 10)
        with pytest.raises(RuntimeError), young_threshold(10_000):
            raise RuntimeError("a worker that fails still puts it back")
        assert gc.get_threshold() == (3_000, 10, 10)
    finally:
        gc.set_threshold(*before)


@pytest.mark.parametrize(
    "bad",
    [
        {"lock_timeout_seconds": 0},
        {"retry_backoff_multiplier": 0.5},
        {"base_retry_delay_seconds": -1},
        {"heartbeat_interval_seconds": 700},
        {"claim_batch_size": 0},
        {"notify_channel": "bad channel; drop"},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Config(**bad)  # type: ignore[arg-type]


def test_task_names_are_stable_and_unique() -> None:
    reg = TaskRegistry()

    @reg.task
    def plain(x: int) -> int:
        return x

    assert plain.name == f"{__name__}.test_task_names_are_stable_and_unique.<locals>.plain"
    assert plain(2) == 2  # calling the definition calls the function

    @reg.task(name="emails.send")
    def send_v1(to: str) -> None: ...

    with pytest.raises(TaskDefinitionError, match="already registered"):

        @reg.task(name="emails.send")
        def send_v2(to: str) -> None: ...

    assert reg.get("emails.send") is send_v1
    with pytest.raises(UnknownTaskError, match="no task named 'nope'"):
        reg.get("nope")
    assert "emails.send" in reg and len(reg) == 2


def test_bad_task_definitions() -> None:
    reg = TaskRegistry()
    with pytest.raises(TaskDefinitionError, match="named parameter"):
        reg.task(name="a")(lambda *args: None)
    with pytest.raises(TaskDefinitionError, match="max_retries"):
        reg.task(name="b", max_retries=-1)(lambda: None)
    with pytest.raises(TaskDefinitionError, match="timeout_seconds"):
        reg.task(name="c", timeout_seconds=0)(lambda: None)
    with pytest.raises(TaskDefinitionError, match="module level"):

        @reg.task(name="d", timeout_seconds=1)
        def nested() -> None: ...

    with pytest.raises(TaskDefinitionError, match="name"):
        reg.task(name="")(lambda: None)


def test_safe_str_survives_a_broken_str() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("nope")

    assert safe_str(ValueError("x")) == "x"
    assert safe_str(Broken(1)).startswith("<unprintable ") and "Broken: (1,)" in safe_str(Broken(1))


def test_public_api_is_pinned() -> None:
    assert sorted(tasklib_sqla.__all__) == [
        "CONTEXT",
        "Config",
        "ConfigError",
        "FailNow",
        "Limit",
        "MemberOutcome",
        "RetryDecision",
        "RetryPolicy",
        "SESSION",
        "Schedule",
        "Snooze",
        "Task",
        "TaskArgumentsError",
        "TaskCall",
        "TaskCancelledError",
        "TaskClient",
        "TaskContext",
        "TaskDefinition",
        "TaskDefinitionError",
        "TaskFailedError",
        "TaskHandle",
        "TaskLibError",
        "TaskMixin",
        "TaskNotFoundError",
        "TaskRegistry",
        "TaskResultError",
        "TaskState",
        "TaskTimeoutError",
        "TaskWorker",
        "UnknownTaskError",
        "WorkerError",
        "WorkerStats",
        "add_group",
        "add_task",
        "add_tasks",
        "backoff_delay",
        "cancel_task",
        "claim_index",
        "decide_retry",
        "default_registry",
        "get_client",
        "get_task",
        "init",
        "insert_task",
        "is_completed",
        "metadata",
        "notify_trigger_sql",
        "pause_queue",
        "remove_limit",
        "resume_queue",
        "retry_task",
        "schema_sql",
        "set_limit",
        "submit_group",
        "submit_task",
        "submit_task_sync",
        "submit_tasks",
        "submit_tasks_sync",
        "task",
        "task_table_args",
    ]
    for name in tasklib_sqla.__all__:
        assert getattr(tasklib_sqla, name) is not None


def test_errors_are_also_builtin_errors() -> None:
    assert issubclass(tasklib_sqla.TaskArgumentsError, ValueError)
    assert issubclass(tasklib_sqla.TaskTimeoutError, TimeoutError)
    assert issubclass(tasklib_sqla.TaskNotFoundError, LookupError)
    assert issubclass(UnknownTaskError, KeyError)


def test_results_are_validated_and_stored_as_json() -> None:
    import json

    from tasklib_sqla import TaskResultError

    reg = TaskRegistry()

    @reg.task(name="r.float")
    def r_float() -> float:
        raise NotImplementedError

    @reg.task(name="r.none")
    def r_none() -> None: ...

    @reg.task(name="r.model")
    def r_model() -> Order:
        raise NotImplementedError

    @reg.task(name="r.any")
    def r_any(): ...  # type: ignore[no-untyped-def]

    assert r_float.dump_result(1.5) == "1.5"
    with pytest.raises(TaskResultError, match="non-JSON"):
        r_float.dump_result(float("nan"))
    with pytest.raises(TaskResultError, match="does not match"):
        r_float.dump_result("1.5")  # strict: no str -> float
    assert r_none.dump_result(None) == "null"
    with pytest.raises(TaskResultError, match="does not match"):
        r_none.dump_result(3)
    assert json.loads(r_model.dump_result(Order(sku="a", quantity=1))) == {
        "sku": "a",
        "quantity": 1,
    }
    with pytest.raises(TaskResultError):
        r_model.dump_result({"sku": "a", "quantity": "1"})
    assert json.loads(r_any.dump_result({"k": [1, "x"]})) == {"k": [1, "x"]}
    with pytest.raises(TaskResultError, match="non-JSON"):
        r_any.dump_result(object())
    with pytest.raises(TaskResultError, match="NUL"):
        r_any.dump_result("a\x00b")


# -- the error policy ---------------------------------------------------------------------------


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"error {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    "code,kind",
    [
        ("57P01", "transient"),  # the server is shutting down
        ("57P03", "transient"),  # the server is starting up
        ("08006", "transient"),  # connection failure
        ("40001", "transient"),  # serialization failure
        ("40P01", "transient"),  # deadlock
        ("55P03", "transient"),  # lock_timeout
        ("57014", "transient"),  # statement_timeout
        ("53300", "transient"),  # too many connections
        ("3D000", "fatal"),  # no such database
        ("28P01", "fatal"),  # wrong password
        ("28000", "fatal"),  # no such role
        ("42P01", "fatal"),  # no such table
        ("42501", "fatal"),  # no privilege
        ("25006", "fatal"),  # a read-only standby
        ("22P02", "data"),  # a value that does not cast
        ("23505", "data"),  # a unique violation
    ],
)
def test_database_errors_are_classified_by_sqlstate(code: str, kind: str) -> None:
    from sqlalchemy.exc import DBAPIError

    from tasklib_sqla.errors import classify

    wrapped = DBAPIError("SELECT 1", None, _PgError(code))
    assert classify(wrapped).value == kind
    assert classify(_PgError(code)).value == kind


def test_errors_without_sqlstate_are_classified() -> None:
    import socket

    from sqlalchemy.exc import ArgumentError, InterfaceError

    from tasklib_sqla.errors import ErrorKind, classify

    assert classify(ConnectionRefusedError()) is ErrorKind.TRANSIENT
    assert classify(TimeoutError()) is ErrorKind.TRANSIENT
    assert classify(InterfaceError("x", None, Exception("connection is closed"))) is (
        ErrorKind.TRANSIENT
    )
    assert classify(socket.gaierror(-2, "Name or service not known")) is ErrorKind.FATAL
    assert classify(ArgumentError("bad URL")) is ErrorKind.FATAL


def test_raw_asyncpg_errors_are_database_errors() -> None:
    """Older SQLAlchemy lets these out unwrapped; the worker must retry them, not end."""
    import asyncpg

    from tasklib_sqla.errors import DB_ERRORS, ErrorKind, classify

    busy = asyncpg.InternalClientError(
        "cannot switch to state 12; another operation is in progress"
    )
    assert isinstance(busy, DB_ERRORS) and classify(busy) is ErrorKind.TRANSIENT
    gone = asyncpg.InvalidCatalogNameError('database "x" does not exist')
    assert isinstance(gone, DB_ERRORS) and classify(gone) is ErrorKind.FATAL


def test_error_backoff_is_short_and_capped() -> None:
    from tasklib_sqla.errors import error_backoff

    assert [error_backoff(n) for n in (1, 2, 3)] == [0.05, 0.1, 0.2]
    assert error_backoff(10) == error_backoff(10_000) == 1.0


def test_backoff_never_overflows_and_is_capped() -> None:
    from tasklib_sqla.retry import backoff_delay, exponent_cap

    assert backoff_delay(37, 5.0, 2.0) == 3600.0
    assert backoff_delay(10_000, 5.0, 10.0) == 3600.0
    assert backoff_delay(10_000, 5.0, 10.0, max_seconds=60.0) == 60.0
    assert backoff_delay(3, 5.0, 2.0) == 20.0  # below the cap: unchanged
    assert exponent_cap(5.0, 2.0, 3600.0) == 10  # 5 * 2**10 = 5120 >= 3600
    assert exponent_cap(5.0, 1.0, 3600.0) == 0
    assert exponent_cap(0.0, 2.0, 3600.0) == 0


def test_failure_summary_is_one_line_and_nul_free() -> None:
    from tasklib_sqla.runner import SUMMARY_LIMIT, Failure

    f = Failure.from_exception(ValueError("first\nsecond\x00third"))
    assert "\x00" not in f.message and "\x00" not in (f.traceback or "")
    assert f.summary == "ValueError: first second\\x00third"
    long = Failure("E", "x" * 5000, None).summary
    assert len(long) == SUMMARY_LIMIT and "\n" not in long


async def test_error_policy_gives_up_on_fatal_errors_after_its_time() -> None:
    import asyncio

    from tasklib_sqla.errors import ErrorPolicy

    now = [0.0]
    gave_up: list[Exception] = []
    policy = ErrorPolicy(10.0, gave_up.append, asyncio.Event(), clock=lambda: now[0])
    fatal = _PgError("42P01")
    await policy.failed("claim", fatal)
    now[0] = 5.0
    await policy.failed("claim", ConnectionResetError())  # transient: no change
    assert not gave_up
    policy.succeeded("claim")  # a success ends the episode: the clock starts again
    now[0] = 20.0
    await policy.failed("claim", fatal)
    assert not gave_up
    now[0] = 30.0
    await policy.failed("claim", fatal)
    assert len(gave_up) == 1 and "giving up after 10 s" in str(gave_up[0])


def test_which_pending_levels_the_plain_claim_would_walk() -> None:
    from tasklib_sqla.worker import foreign_names, later_above_due

    levels = [
        ("default", "a", 5, False),  # later, above a's due tasks
        ("default", "a", 0, True),
        ("mail", "b", 9, False),
        ("mail", "b", 1, True),
        ("other", "x", 0, True),
    ]
    assert foreign_names(levels, ["a", "b"], []) == ["x"]
    assert foreign_names(levels, ["a", "b"], ["default", "mail"]) == []
    assert later_above_due(levels, ["a"], [])
    assert later_above_due(levels, ["a", "b"], ["mail"])
    # Across queues only for a worker of every queue, which reads them in one order.
    across = [("default", "a", 5, False), ("mail", "a", 0, True)]
    assert later_above_due(across, ["a"], [])
    assert not later_above_due(across, ["a"], ["default", "mail"])
    # Below the due ones, of another name, or all due: nothing is walked.
    assert not later_above_due([("default", "a", 0, False), ("default", "a", 5, True)], ["a"], [])
    assert not later_above_due([("default", "x", 5, False), ("default", "a", 0, True)], ["a"], [])
    assert not later_above_due([("default", "a", 5, True), ("default", "a", 0, True)], ["a"], [])
