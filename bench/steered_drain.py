"""The drain with the plain claim against the steered claim (a queue paused, a name limited).

    python -m bench.steered_drain [--tasks 20000] [--repeats 2]

Drains ``tasks`` no-ops with one worker process at concurrency 10 and 100, batch 100, first with
nothing paused or limited (the plain claim), then with a queue ``elsewhere`` paused and a name
``bench.limited`` limited, neither of which the drained tasks use: the worker claims with the
steered claim, and the difference is that statement's cost. Best of ``repeats`` each; the table
is vacuumed between runs (``drain_once``).
"""

from __future__ import annotations

import argparse
import asyncio

from bench import db
from bench.__main__ import best_drain, connect

STEERING = (
    "INSERT INTO tasks_queues (queue, paused) VALUES ('elsewhere', true)",
    "INSERT INTO tasks_limits (kind, key, concurrency) VALUES ('name', 'bench.limited', 5)",
)


async def main(tasks: int, repeats: int) -> None:
    await db.create_database()
    conn = await connect()
    try:
        for claim, steered in (("plain", False), ("steered", True)):
            await conn.execute("TRUNCATE tasks_queues, tasks_limits")
            if steered:
                for statement in STEERING:
                    await conn.execute(statement)
            for concurrency in (10, 100):
                rate, _ = await best_drain("lib", "async", concurrency, 100, tasks, repeats)
                print(
                    f"{claim:8} claim, concurrency {concurrency:3}: {rate:,.0f} tasks/s", flush=True
                )
    finally:
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.steered_drain")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.tasks, args.repeats))
