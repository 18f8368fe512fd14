"""Fault injection: workers under server restarts, cut and stalled connections, kill -9 storms,
row locks and slow statements, each checked from the database afterwards.

Two profiles: ``short`` (the default, seconds per scenario, run by CI) and ``long`` (the figures
in docs/reliability.md)::

    TASKLIB_FAULTS_PROFILE=long TASKLIB_FAULTS_REPORT=faults.jsonl \\
        uv run --extra test pytest tests/faults -p no:randomly -s
    uv run --extra test python -m tests.faults.report faults.jsonl

Every scenario drains tasks submitted while the faults happen, and checks:

- no acknowledged submit is missing, and none is left pending or running once leases expire;
- each task ended once: its error history has exactly one entry per attempt that did not
  complete (no double and no missing outcome);
- side effects, logged per run through a connection of their own, repeat only where the
  scenario allows it (a worker killed while running the task), never from an orphan;
- no worker died of an unhandled exception, and live workers exit 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine

from tasklib_sqla.models import metadata
from tests.faults.harness import Cluster, Proxy, Submitter, Workers, pg_bindir, running

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

PROFILE = os.environ.get("TASKLIB_FAULTS_PROFILE", "short")
if PROFILE not in ("short", "long"):
    raise ValueError(f"TASKLIB_FAULTS_PROFILE must be short or long, not {PROFILE!r}")
LONG = PROFILE == "long"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries here (pg_ctl): the fault suite needs its own")
    c = Cluster(bindir)
    c.init()
    c.start()
    dsn = c.url("postgres").replace("postgresql://", "postgresql+psycopg://")
    c.sql("CREATE DATABASE faults_tmpl")
    engine = create_engine(dsn.rsplit("/", 1)[0] + "/faults_tmpl")
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.exec_driver_sql(
            "CREATE TABLE effect_log (n int NOT NULL, pid int NOT NULL, worker_pid int NOT NULL,"
            " at double precision NOT NULL)"
        )
    engine.dispose()
    yield c
    c.destroy()


@dataclass
class Figures:
    """What one scenario measured; the report renders these."""

    scenario: str
    profile: str = PROFILE
    seconds: float = 0.0
    acked: int = 0
    refused: int = 0
    completed: int = 0
    failed: int = 0
    missing: int = 0
    unfinished: int = 0
    outcome_mismatches: int = 0
    #: Attempts that live workers lost: LeaseLost, or WorkerLost naming a worker not killed.
    lease_losses: int = 0
    #: Attempts taken over from killed workers (WorkerLost naming a killed worker).
    rescued_from_killed: int = 0
    repeats: int = 0
    repeats_of_killed: int = 0
    #: Repeats that follow a failed run of the task itself (its side effect's commit answer
    #: was lost with the connection): the side effect's own at-least-once.
    repeats_after_task_error: int = 0
    repeats_after_lease_lost: int = 0
    orphan_effects: int = 0
    crashes: list[str] = field(default_factory=list)
    bad_exits: int = 0
    kills: int = 0
    first_completion_after_back: float | None = None
    repeat_list: list[dict[str, Any]] = field(default_factory=list)
    notes: str = ""


class Run:
    """One scenario: a fresh database, workers, a submitter, and the fault in between."""

    def __init__(
        self,
        cluster: Cluster,
        tmp: Path,
        name: str,
        *,
        via_proxy: bool = False,
        workers: int = 3,
        lease: float = 10.0,
        heartbeat: float = 2.0,
        statement_timeout: float = 30.0,
        submit_every: float = 0.05,
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.db = f"faults_{name}_{os.getpid()}_{random.randrange(10**6)}"
        cluster.sql(f"CREATE DATABASE {self.db} TEMPLATE faults_tmpl")
        self.direct = cluster.url(self.db)
        self.proxy = Proxy(cluster.port) if via_proxy else None
        worker_port = self.proxy.port if self.proxy else None
        self.lease = lease
        env = {
            "FAULTS_EFFECTS_DSN": self.direct,
            "TASKLIB_LOCK_TIMEOUT_SECONDS": str(lease),
            "TASKLIB_HEARTBEAT_INTERVAL_SECONDS": str(heartbeat),
            "TASKLIB_POLL_INTERVAL_SECONDS": "0.5",
            "TASKLIB_BASE_RETRY_DELAY_SECONDS": "0.2",
            "TASKLIB_MAX_RETRY_DELAY_SECONDS": "2",
            "TASKLIB_SHUTDOWN_GRACE_SECONDS": "5",
            "TASKLIB_DB_STATEMENT_TIMEOUT_SECONDS": str(statement_timeout),
            "TASKLIB_LOG_LEVEL": "WARNING",
        }
        self.workers = Workers(cluster.url(self.db, worker_port), tmp, env)
        self.n_workers = workers
        self.submitter = Submitter(self.direct, every=submit_every)
        self.figures = Figures(name)
        self.started = time.monotonic()

    def go(self, fault: Callable[[Run], None], *, warmup: float = 1.0, after: float = 1.0) -> None:
        if self.proxy:
            self.proxy.start()
        with running(self.workers, *([self.proxy] if self.proxy else [])):
            for _ in range(self.n_workers):
                self.workers.start()
            self.submitter.start()
            try:
                time.sleep(warmup)
                fault(self)
                time.sleep(after)
            finally:
                self.submitter.stop()
            self._settle()
            self._until_registered()
            codes = self.workers.stop()
        self.figures.bad_exits = sum(1 for c in codes.values() if c != 0)
        if self.figures.bad_exits:
            self.figures.notes += f" exit codes: {codes};"
        self.figures.crashes = self.workers.crash_lines()
        self.figures.kills = sum(1 for w in self.workers.procs if w.killed_at is not None)
        self._measure()
        self.figures.seconds = round(time.monotonic() - self.started, 1)
        _report(self.figures)

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.direct, autocommit=True) as conn:
            cur = conn.execute(statement.encode(), params or None)
            return cur.fetchall() if cur.description else []

    def _settle(self) -> None:
        # Tasks of killed workers come back once their leases expire; then the rest drains.
        deadline = time.monotonic() + self.lease * 3 + 60
        while time.monotonic() < deadline:
            (left,) = self.sql("SELECT count(*) FROM tasks WHERE state IN ('pending','running')")[0]
            if left == 0:
                return
            if not self.workers.alive():
                self.workers.start()
            time.sleep(0.2)

    def _until_registered(self) -> None:
        # A worker killed by SIGTERM while Python still imports it has no handler yet and ends
        # with -15 having done nothing: wait until each live worker has registered.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = {w.proc.pid for w in self.workers.alive()}
            seen = {r[0] for r in self.sql("SELECT pid FROM tasks_workers")}
            if pids <= seen:
                return
            time.sleep(0.1)

    def _measure(self) -> None:
        f = self.figures
        f.acked, f.refused = len(self.submitter.acked), len(self.submitter.refused)
        rows = self.sql(
            "SELECT (args->>'n')::int, state, attempts, errors FROM tasks"
            " WHERE name LIKE 'faults.%'"
        )
        by_n = {r[0]: r for r in rows}
        f.missing = len(self.submitter.acked - set(by_n))
        f.completed = sum(1 for r in rows if r[1] == "completed")
        f.failed = sum(1 for r in rows if r[1] == "failed")
        f.unfinished = sum(1 for r in rows if r[1] in ("pending", "running"))
        if f.unfinished:
            f.notes += "unfinished: " + repr(
                self.sql(
                    "SELECT state, attempts, worker_id, locked_until < now(), scheduled_at < now()"
                    " FROM tasks WHERE state IN ('pending','running') LIMIT 5"
                )
            )
        killed = {w.proc.pid: w.killed_at for w in self.workers.procs if w.killed_at}
        for _, state, attempts, errors in rows:
            numbers = [e.get("attempt") for e in errors]
            expected = attempts - 1 if state == "completed" else attempts
            if len(numbers) != len(set(numbers)) or (
                state in ("completed", "failed") and len(numbers) != expected
            ):
                f.outcome_mismatches += 1
            for e in errors:
                of_killed = _pid(e.get("worker_id")) in killed
                if e["type"] == "WorkerLost" and of_killed:
                    f.rescued_from_killed += 1
                elif e["type"] in ("WorkerLost", "LeaseLost"):
                    f.lease_losses += 1
                    f.notes += f" {e['type']}: {e.get('message', '')[:120]};"
        runs = self.sql("SELECT n, count(*) FROM effect_log GROUP BY n HAVING count(*) > 1")
        for n, count in runs:
            errors = by_n[n][3] if n in by_n else []
            of_killed = any(
                e["type"] == "WorkerLost" and _pid(e.get("worker_id")) in killed for e in errors
            )
            kinds = {e["type"] for e in errors}
            f.repeats += 1
            f.repeats_of_killed += int(of_killed)
            f.repeats_after_lease_lost += int("LeaseLost" in kinds)
            f.repeats_after_task_error += int(
                not of_killed and bool(kinds - {"WorkerLost", "LeaseLost"})
            )
            f.repeat_list.append({"n": n, "runs": count, "errors": [e["type"] for e in errors][:6]})
        for wpid, at in self.sql("SELECT worker_pid, at FROM effect_log"):
            if wpid in killed and at > killed[wpid] + 0.5:
                f.orphan_effects += 1

    def check(
        self,
        *,
        repeats_allowed_for_killed: bool = False,
        repeats_allowed_for_lease_lost: bool = False,
        lease_losses: int = 0,
    ) -> None:
        f = self.figures
        assert f.acked > 0 and f.completed > 0, f
        assert f.missing == 0, f"acknowledged submits missing: {f}"
        assert f.unfinished == 0, f"tasks left pending or running: {f}"
        assert f.failed == 0, f"tasks failed for good: {f}"
        assert f.outcome_mismatches == 0, f"double or missing outcomes: {f}"
        assert f.crashes == [] and f.bad_exits == 0, f"workers crashed: {f}"
        assert f.orphan_effects == 0, f"orphaned children ran on: {f}"
        assert f.lease_losses <= lease_losses, f"live workers lost leases: {f}"
        unexplained = (
            f.repeats
            - f.repeats_after_task_error
            - (f.repeats_of_killed if repeats_allowed_for_killed else 0)
            - (f.repeats_after_lease_lost if repeats_allowed_for_lease_lost else 0)
        )
        assert unexplained == 0, f"tasks ran twice: {f.repeat_list}"


def _pid(worker_id: str | None) -> int | None:
    try:
        return int((worker_id or "").split(":")[1])
    except (IndexError, ValueError):
        return None


def _report(figures: Figures) -> None:
    line = json.dumps(asdict(figures))
    print(f"\nFAULTS {line}")
    path = os.environ.get("TASKLIB_FAULTS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


def _server_back(run: Run) -> float:
    """The server's clock once it answers again (it is this machine's clock too)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return float(run.sql("SELECT extract(epoch FROM clock_timestamp())")[0][0])
        except psycopg.Error:
            assert time.monotonic() < deadline, "the server did not come back"
            time.sleep(0.05)


def _first_completion_after(run: Run, back: float) -> float | None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            (first,) = run.sql(
                "SELECT min(extract(epoch FROM completed_at)) FROM tasks"
                " WHERE state = 'completed' AND completed_at > to_timestamp(%s)",
                back,
            )[0]
        except psycopg.Error as exc:  # the server may still be finishing its recovery
            print(f"completion probe failed: {exc}")
            time.sleep(0.05)
            continue
        if first is not None:
            return round(float(first) - back, 2)
        time.sleep(0.05)
    return None


# -- server restarts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,down",
    [("fast", 0.0), ("immediate", 0.0), ("fast", 30.0 if LONG else 3.0)],
    ids=["restart-fast", "restart-immediate", "outage"],
)
def test_server_restart_during_a_drain(
    cluster: Cluster, tmp_path: Path, mode: str, down: float
) -> None:
    name = f"restart_{mode}" if not down else f"outage_{int(down)}s"
    run = Run(cluster, tmp_path, name, lease=60.0, heartbeat=5.0)
    backs: list[float] = []

    def fault(r: Run) -> None:
        for _ in range(3 if LONG else 1):
            time.sleep(2.0)
            if down:
                cluster.stop(mode)
                time.sleep(down)
                cluster.start()
            else:
                cluster.restart(mode)
            backs.append(_server_back(r))
            first = _first_completion_after(r, backs[-1])
            assert first is not None, "no task completed within 30 s of the server's return"
            r.figures.first_completion_after_back = max(
                r.figures.first_completion_after_back or 0.0, first
            )

    run.go(fault, after=2.0)
    run.check()
    back = run.figures.first_completion_after_back
    # The target (2 s) is measured by the long profile and published in docs/reliability.md;
    # here, on a loaded CI machine, the check only guards against a gross regression (before
    # the error policy, the first completion came 18 s after the server was back).
    assert back is not None and back <= (2.0 if LONG else 5.0), run.figures


# -- connections cut, stalled, half-open ----------------------------------------------------------


def test_connections_cut_again_and_again(cluster: Cluster, tmp_path: Path) -> None:
    run = Run(cluster, tmp_path, "cut_every_second", via_proxy=True)

    def fault(r: Run) -> None:
        assert r.proxy is not None
        for _ in range(30 if LONG else 6):
            time.sleep(1.0)
            r.proxy.cut()

    run.go(fault)
    run.check()


def test_connections_stalled_for_less_than_a_lease(cluster: Cluster, tmp_path: Path) -> None:
    run = Run(cluster, tmp_path, "stall", via_proxy=True, lease=10.0, heartbeat=2.0)

    def fault(r: Run) -> None:
        assert r.proxy is not None
        for _ in range(3 if LONG else 1):
            r.proxy.stall(5.0)
            time.sleep(7.0)

    run.go(fault)
    run.check()


def test_connections_stalled_past_the_lease(cluster: Cluster, tmp_path: Path) -> None:
    """Every worker goes silent past its lease: each stops its running tasks itself (the
    watchdog) before another could take them over; none is run twice at the same time."""
    run = Run(cluster, tmp_path, "stall_past_lease", via_proxy=True, lease=4.0, heartbeat=1.0)

    def fault(r: Run) -> None:
        assert r.proxy is not None
        r.proxy.stall(7.0)
        time.sleep(9.0)

    run.go(fault)
    # Attempts stopped by the watchdog are recorded (LeaseLost) and retried: allowed here.
    run.check(lease_losses=10**6, repeats_allowed_for_lease_lost=True)


def test_half_open_connections(cluster: Cluster, tmp_path: Path) -> None:
    """Connections that stay open and carry nothing: statements time out, new ones work."""
    run = Run(
        cluster,
        tmp_path,
        "half_open",
        via_proxy=True,
        lease=20.0,
        heartbeat=3.0,
        statement_timeout=2.0,
    )

    def fault(r: Run) -> None:
        assert r.proxy is not None
        for _ in range(3 if LONG else 1):
            r.proxy.half_open()
            time.sleep(10.0)

    run.go(fault, after=3.0)
    run.check()


# -- kill -9 storms -------------------------------------------------------------------------------


def test_kill_storm(cluster: Cluster, tmp_path: Path) -> None:
    """SIGKILL a worker every few seconds (and start another): repeats only for tasks whose
    worker died while running them, none from orphaned children."""
    run = Run(cluster, tmp_path, "kill_storm", lease=4.0, heartbeat=1.0, submit_every=0.1)

    def fault(r: Run) -> None:
        from tasklib_sqla import Config, TaskClient
        from tests.faults.fault_tasks import effect_in_child

        # Timed sync tasks run in child processes: the orphans of killed workers, if any.
        async def submit_children() -> None:
            c: TaskClient[Any] = TaskClient(Config(database_url=r.direct))
            calls = [{"n": 10**6 + i, "seconds": 0.5 + (i % 5) * 0.2} for i in range(60)]
            await c.submit_many(effect_in_child, calls)
            await c.dispose()

        import asyncio

        asyncio.run(submit_children())
        rng = random.Random(7)
        until = time.monotonic() + (60.0 if LONG else 12.0)
        while time.monotonic() < until:
            time.sleep(3.0 if LONG else 2.0)
            live = r.workers.alive()
            if live:
                r.workers.kill(rng.choice(live))
            r.workers.start()

    run.go(fault, after=1.0)
    run.check(repeats_allowed_for_killed=True)
    assert run.figures.kills >= (15 if LONG else 4)


# -- live workers under pressure keep their leases --------------------------------------------


def test_host_locks_and_slow_statements_cost_no_lease(cluster: Cluster, tmp_path: Path) -> None:
    """An app holds FOR UPDATE locks on running rows past the lease, then every statement that
    changes a task takes seconds (up to 5 s): no live worker loses a lease, no task runs twice."""
    slow = 5.0 if LONG else 2.0
    lease, beat = (20.0, 4.0) if LONG else (8.0, 2.0)
    run = Run(cluster, tmp_path, "locks_and_slow", lease=lease, heartbeat=beat)

    def fault(r: Run) -> None:
        with psycopg.connect(r.direct) as app:  # a transaction of the app's
            for _ in range(3 if LONG else 1):
                app.execute(b"SELECT id FROM tasks WHERE state = 'running' LIMIT 5 FOR UPDATE")
                time.sleep(r.lease + 2)  # held past the lease
                app.commit()
        # Every UPDATE of the task table (claims, heartbeats, outcomes, rescues) now sleeps.
        r.sql(
            "CREATE FUNCTION slow_down() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" PERFORM pg_sleep({slow}); RETURN NULL; END $$"
        )
        r.sql(
            "CREATE TRIGGER slow_down BEFORE UPDATE ON tasks"
            " FOR EACH STATEMENT EXECUTE FUNCTION slow_down()"
        )
        time.sleep(r.lease * 1.5)
        r.sql("DROP TRIGGER slow_down ON tasks")

    run.go(fault, after=2.0)
    run.check()
