"""A worker process for the benchmarks: the library's TaskWorker or the asyncpg baseline.

    python -m bench.workerproc lib|baseline --kind async|sync|probe --concurrency C --batch B

Drains until nothing is due (``probe``: until SIGTERM) and prints one JSON line:
start and end (wall clock), CPU seconds, tasks done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

import asyncpg

from bench import baseline
from bench.db import bench_url, dsn
from bench.tasks import registry
from tasklib_sqla import Config, TaskWorker

NAMES = {"async": "bench.noop_async", "sync": "bench.noop_sync", "probe": "bench.probe"}


async def run_lib(args: argparse.Namespace) -> int:
    config = Config(
        database_url=bench_url(), claim_batch_size=args.batch, poll_interval_seconds=1.0
    )
    worker = TaskWorker(
        config,
        concurrency=args.concurrency,
        registry=registry,
        burst=args.kind != "probe",
        handle_signals=True,
    )
    if args.kind == "probe":
        asyncio.get_running_loop().call_later(0.5, lambda: print("ready", flush=True))
    stats = await worker.run()
    return stats.completed


async def run_baseline(args: argparse.Namespace) -> int:
    url = dsn(bench_url())
    if args.kind == "probe":
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        return await baseline.listen_and_drain(
            url, NAMES["probe"], stop, lambda: print("ready", flush=True)
        )
    pool = await asyncpg.create_pool(url, min_size=2, max_size=2)
    try:
        return await baseline.drain(pool, NAMES[args.kind], args.kind, args.concurrency, args.batch)
    finally:
        await pool.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("side", choices=["lib", "baseline"])
    p.add_argument("--kind", choices=sorted(NAMES), default="async")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args()
    start, cpu0 = time.time(), time.process_time()
    done = asyncio.run(run_lib(args) if args.side == "lib" else run_baseline(args))
    out = {"start": start, "end": time.time(), "cpu": time.process_time() - cpu0, "done": done}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
