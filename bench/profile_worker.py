"""Profile one in-process worker draining no-op tasks.

    python -m bench.profile_worker [--concurrency 100] [--batch 100] [--kind async|sync] [--tasks 20000]

Prints tasks/s and CPU seconds, then the cProfile functions with the most own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

import asyncpg

from bench import db
from bench.tasks import registry
from tasklib_sqla import Config, TaskWorker


async def main(args: argparse.Namespace) -> None:
    await db.create_database()
    conn = await asyncpg.connect(db.dsn(db.bench_url()))
    name = f"bench.noop_{args.kind}"
    await db.submit_noops(conn, args.tasks, name)
    config = Config(database_url=db.bench_url(), claim_batch_size=args.batch)
    worker = TaskWorker(config, concurrency=args.concurrency, registry=registry, burst=True)
    profile = cProfile.Profile()
    wall, cpu = time.perf_counter(), time.process_time()
    profile.enable()
    await worker.run()
    profile.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await db.verify_drained(conn, args.tasks, name)
    await conn.close()
    print(f"{args.tasks / wall:,.0f} tasks/s under the profiler, {cpu:.2f} CPU s, {worker.stats}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.profile_worker")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--kind", choices=["async", "sync"], default="async")
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--top", type=int, default=25)
    asyncio.run(main(p.parse_args()))
