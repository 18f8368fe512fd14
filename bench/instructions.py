"""CPU per task counted in instructions, not seconds: repeatable on a busy machine.

    python -m bench.instructions [--tasks 3000] [--concurrency 100] [--kind async|sync] [--lib-only]

Runs one worker process (ours, then the asyncpg baseline) under ``valgrind --tool=callgrind``
twice: on an empty table and on ``--tasks`` pre-submitted no-ops. The difference, divided by
the tasks, is the worker's instructions per task, start-up and imports excluded. Timings on a
shared 2-core machine move by 15% from run to run; these counts move by about 2%, which is
what deciding whether a change to the hot path helped needs. About a minute per side; needs
valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys

import asyncpg

from bench import db


async def _prepare(n: int, name: str) -> None:
    await db.create_database()
    conn = await asyncpg.connect(db.dsn(db.bench_url()))
    try:
        await conn.execute("DELETE FROM tasks")
        await conn.execute("VACUUM tasks")
        if n:
            await db.submit_noops(conn, n, name)
    finally:
        await conn.close()


def _instructions(side: str, kind: str, concurrency: int, batch: int) -> int:
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    cmd += [sys.executable, "-m", "bench.workerproc", side, "--kind", kind]
    cmd += ["--concurrency", str(concurrency), "--batch", str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def per_task(side: str, args: argparse.Namespace) -> float:
    name = f"bench.noop_{args.kind}"
    asyncio.run(_prepare(0, name))
    idle = _instructions(side, args.kind, args.concurrency, args.batch)
    asyncio.run(_prepare(args.tasks, name))
    busy = _instructions(side, args.kind, args.concurrency, args.batch)
    tasks: int = args.tasks
    return (busy - idle) / tasks


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.instructions")
    p.add_argument("--tasks", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--kind", choices=["async", "sync"], default="async")
    p.add_argument(
        "--lib-only", action="store_true", help="count ours only (to compare two commits)"
    )
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    lib = per_task("lib", args)
    if args.lib_only:
        print(
            f"{args.kind} no-ops, concurrency {args.concurrency}, batch {args.batch}, "
            f"{args.tasks} tasks: tasklib-sqla {lib:,.0f} instructions per task"
        )
        return
    base = per_task("baseline", args)
    print(
        f"{args.kind} no-ops, concurrency {args.concurrency}, batch {args.batch}, "
        f"{args.tasks} tasks: tasklib-sqla {lib:,.0f} instructions per task, "
        f"baseline {base:,.0f}, ratio {lib / base:.2f}"
    )


if __name__ == "__main__":
    main()
