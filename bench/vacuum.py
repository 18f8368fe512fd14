"""Autovacuum settings for the task table, measured under steady churn.

    python -m bench.vacuum [--finished 1000000] [--seconds 180] [--enable-autovacuum] [--rate 2000]

For each variant, the table starts with ``--finished`` completed rows (a month of history,
say) and one worker process (the library's, default settings: concurrency 10) runs tasks
submitted at ``--rate`` per second for ``--seconds``. Measured: the tasks completed, their
submit-to-start latency (p50, p99), how often autovacuum visited the table, the most dead rows
seen, the share of HOT updates, and the sizes of the heap and the claim indexes at the end.

Variants: PostgreSQL's defaults (autovacuum after 20% of the table changed) and a fixed
threshold (after 50,000 changes, whatever the table's size), the setting ``docs/scaling.md``
discusses. Each run takes ``--seconds`` plus about 20 s of setup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from dataclasses import dataclass

import asyncpg

from bench import db

VARIANTS = {
    "defaults": "ALTER TABLE tasks RESET (autovacuum_vacuum_scale_factor, "
    "autovacuum_vacuum_threshold, autovacuum_vacuum_insert_scale_factor, "
    "autovacuum_vacuum_insert_threshold)",
    "fixed threshold": "ALTER TABLE tasks SET (autovacuum_vacuum_scale_factor = 0, "
    "autovacuum_vacuum_threshold = 50000, autovacuum_vacuum_insert_scale_factor = 0, "
    "autovacuum_vacuum_insert_threshold = 50000)",
}
INDEXES = ("ix_tasks_claim", "ix_tasks_claim_queue", "ix_tasks_claim_stream", "pk_tasks")
STATS = (
    "SELECT autovacuum_count, n_tup_upd, n_tup_hot_upd, n_dead_tup "
    "FROM pg_stat_user_tables WHERE relname = 'tasks'"
)


@dataclass
class Outcome:
    variant: str
    completed: int
    p50_ms: float
    p99_ms: float
    autovacuums: int
    most_dead: int
    hot_share: float
    sizes_mb: dict[str, float]


async def _submit_steadily(conn: asyncpg.Connection, rate: int, seconds: float) -> None:
    # Ten inserts a second, each stamped with its own time: the probe task's argument.
    per_tick, tick = max(1, rate // 10), 0.1
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        await conn.execute(
            "INSERT INTO tasks (name, args) SELECT 'bench.probe', "
            "jsonb_build_object('sent', extract(epoch FROM clock_timestamp())) "
            "FROM generate_series(1, $1)",
            per_tick,
        )
        n += 1
        await asyncio.sleep(max(0.0, start + n * tick - time.monotonic()))


async def run_variant(variant: str, args: argparse.Namespace) -> Outcome:
    conn = await asyncpg.connect(db.dsn(db.bench_url()))
    try:
        await db.reset(conn)
        await db.fill_finished(conn, args.finished)
        await conn.execute(VARIANTS[variant])
        await conn.execute("VACUUM ANALYZE tasks")
        await asyncio.sleep(1.0)  # the statistics collector catches up
        before = await conn.fetchrow(STATS)
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.workerproc",
            "lib",
            "--kind",
            "probe",
            stdout=asyncio.subprocess.PIPE,
        )
        assert worker.stdout is not None
        await worker.stdout.readline()  # "ready"
        most_dead = 0
        sampler_stop = asyncio.Event()

        async def sample() -> None:
            nonlocal most_dead
            watch = await asyncpg.connect(db.dsn(db.bench_url()))
            try:
                while not sampler_stop.is_set():
                    row = await watch.fetchrow(STATS)
                    most_dead = max(most_dead, int(row["n_dead_tup"]))
                    await asyncio.sleep(1.0)
            finally:
                await watch.close()

        sampler = asyncio.create_task(sample())
        await _submit_steadily(conn, args.rate, args.seconds)
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.communicate(), 60)
        sampler_stop.set()
        await sampler
        await asyncio.sleep(1.0)
        after = await conn.fetchrow(STATS)
        latencies = [
            float(json.loads(r))
            for r in await conn.fetchval(
                "SELECT array_agg(result::text) FROM tasks "
                "WHERE name = 'bench.probe' AND state = 'completed'"
            )
            or []
        ]
        sizes = {
            rel: float(await conn.fetchval("SELECT pg_relation_size($1::regclass)", rel)) / 2**20
            for rel in ("tasks", *INDEXES)
        }
    finally:
        await conn.close()
    updates = int(after["n_tup_upd"]) - int(before["n_tup_upd"])
    hot = int(after["n_tup_hot_upd"]) - int(before["n_tup_hot_upd"])
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Outcome(
        variant,
        len(latencies),
        cuts[49],
        cuts[98],
        int(after["autovacuum_count"]) - int(before["autovacuum_count"]),
        most_dead,
        hot / updates if updates else 0.0,
        sizes,
    )


def render(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    lines = [
        f"{args.finished:,} finished rows, {args.rate:,} tasks/s submitted for {args.seconds} s, "
        "one worker process (concurrency 10):",
        "",
        "| autovacuum | completed | latency p50 / p99, ms | autovacuum runs | most dead rows "
        "| HOT updates | heap, MB | " + " | ".join(f"{i}, MB" for i in INDEXES) + " |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(INDEXES),
    ]
    for o in outcomes:
        lines.append(
            f"| {o.variant} | {o.completed:,} | {o.p50_ms:.1f} / {o.p99_ms:.1f} | "
            f"{o.autovacuums} | {o.most_dead:,} | {o.hot_share:.0%} | {o.sizes_mb['tasks']:,.0f} | "
            + " | ".join(f"{o.sizes_mb[i]:,.1f}" for i in INDEXES)
            + " |"
        )
    return "\n".join(lines)


async def _autovacuum(on: bool | None) -> bool:
    """Whether autovacuum is on; with ``on``, switch it (ALTER SYSTEM, reloaded) first."""
    conn = await asyncpg.connect(db.dsn(db.server_url()))
    try:
        if on is not None:
            await conn.execute(
                "ALTER SYSTEM SET autovacuum = on" if on else "ALTER SYSTEM RESET autovacuum"
            )
            await conn.execute("SELECT pg_reload_conf()")
            await asyncio.sleep(1.0)
        return bool(await conn.fetchval("SELECT current_setting('autovacuum') = 'on'"))
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> None:
    switched = False
    if not await _autovacuum(None):
        if not args.enable_autovacuum:
            raise SystemExit(
                "autovacuum is off on this server: nothing to compare. Run with "
                "--enable-autovacuum to switch it on for the run (ALTER SYSTEM; reset after)."
            )
        switched = await _autovacuum(True)
    try:
        await db.create_database()
        outcomes = [await run_variant(v, args) for v in VARIANTS]
        print(render(outcomes, args))
    finally:
        if switched:
            await _autovacuum(False)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.vacuum")
    p.add_argument("--finished", type=int, default=1_000_000)
    p.add_argument("--seconds", type=int, default=180)
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument(
        "--enable-autovacuum",
        action="store_true",
        help="if the server runs without autovacuum, switch it on for the run and back after",
    )
    asyncio.run(main(p.parse_args()))
