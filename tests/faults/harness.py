"""The fault-injection harness: a throwaway PostgreSQL cluster, a TCP proxy, CLI workers.

- :class:`Cluster` runs a PostgreSQL of its own (initdb in a temporary folder, its own port), so
  restarts and outages never touch the shared server the other tests use.
- :class:`Proxy` sits between workers and that server, in a thread of the test process, and
  cuts, stalls, half-opens or slows the connections on command.
- :class:`Workers` starts ``tasklib-sqla worker`` processes and SIGKILLs them on command.
- :class:`Submitter` submits tasks from a thread while the faults happen, and remembers which
  submits were acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[2]


def _runuser() -> str:
    # /usr/sbin is not on every root PATH (env -i, cron, some containers).
    for candidate in (shutil.which("runuser"), "/usr/sbin/runuser", "/sbin/runuser"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("running the fault suite as root needs runuser (util-linux)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path | None:
    """The newest PostgreSQL server binaries on this machine (Debian's layout), if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version_key)
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def _version_key(path: str) -> tuple[int, ...]:
    part = path.split("/")[4]
    return tuple(int(x) for x in part.split(".") if x.isdigit())


class Cluster:
    """A PostgreSQL cluster of the test's own: trust auth, user postgres, 127.0.0.1:port."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="tasklib-faults-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self._as_root = os.geteuid() == 0
        if self._as_root:  # PostgreSQL refuses to run as root: run it as postgres
            shutil.chown(self.base, "postgres", "postgres")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            cmd = [_runuser(), "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.base}'\nmax_connections = 300\n"
                "fsync = off\nfull_page_writes = off\n"
                "shared_buffers = 64MB\n"
            )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w", "restart")

    def url(self, dbname: str, port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{dbname}"

    def sql(self, statement: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            cur = conn.execute(statement.encode())
            return cur.fetchall() if cur.description else []

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


# -- the proxy ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    #: Frozen for good: the connection stays open and carries nothing (half-open).
    frozen: bool = False


class Proxy:
    """A TCP proxy on its own event loop thread: pass, cut, stall, half-open or slow."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._links: set[_Link] = set()
        self._open = asyncio.Event()  # cleared while stalled
        self._latency = 0.0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            c_writer.transport.abort()
            return
        self.connections += 1
        link = _Link(c_writer, s_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(link, c_reader, s_writer, slow=False),
                self._pump(link, s_reader, c_writer, slow=True),
            )
        finally:
            self._links.discard(link)
            for w in (c_writer, s_writer):
                w.transport.abort()

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await self._open.wait()
                while link.frozen:
                    await asyncio.sleep(3600)
                if slow and self._latency:
                    await asyncio.sleep(self._latency)
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.transport.abort()

    def cut(self) -> int:
        """Close every connection at once, as a network failure would (RST, no goodbye)."""

        async def cut() -> int:
            links = list(self._links)
            for link in links:
                link.client.transport.abort()
                link.server.transport.abort()
            return len(links)

        return int(self._call(cut()))

    def stall(self, seconds: float) -> None:
        """Carry nothing, on any connection, for ``seconds``; then carry on."""

        async def stall() -> None:
            self._open.clear()
            self._loop.call_later(seconds, self._open.set)

        self._call(stall())

    def half_open(self) -> int:
        """Freeze the current connections for good: open, silent; new ones work normally."""

        async def freeze() -> int:
            for link in self._links:
                link.frozen = True
            return len(self._links)

        return int(self._call(freeze()))

    def slow(self, seconds: float) -> None:
        """Delay every answer of the server by ``seconds`` (0 to stop)."""
        self._latency = seconds

    def close(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                link.client.transport.abort()
                link.server.transport.abort()

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()


# -- worker processes ---------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    killed_at: float | None = None


@dataclass
class Workers:
    """CLI workers of the fault tasks; every one is ended when the scenario ends."""

    url: str
    logs: Path
    env: dict[str, str]
    concurrency: int = 10
    procs: list[WorkerProcess] = field(default_factory=list)

    def start(self) -> WorkerProcess:
        log = self.logs / f"worker-{len(self.procs)}.log"
        environ = {
            **os.environ,
            **self.env,
            "TASKLIB_DATABASE_URL": self.url,
            "PYTHONPATH": str(ROOT),
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tasklib_sqla",
                    "worker",
                    "tests.faults.fault_tasks:registry",
                    "--concurrency",
                    str(self.concurrency),
                ],
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        wp = WorkerProcess(proc, log)
        self.procs.append(wp)
        return wp

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.procs if w.killed_at is None and w.proc.poll() is None]

    def kill(self, wp: WorkerProcess) -> None:
        wp.killed_at = time.time()
        wp.proc.send_signal(signal.SIGKILL)
        wp.proc.wait(10)

    def stop(self, timeout: float = 30) -> dict[int, int | None]:
        """SIGTERM the live ones; their exit codes by pid (None: had to be killed)."""
        live = self.alive()
        for w in live:
            w.proc.send_signal(signal.SIGTERM)
        codes: dict[int, int | None] = {}
        for w in live:
            try:
                codes[w.proc.pid] = w.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(10)
                codes[w.proc.pid] = None
        return codes

    def kill_all(self) -> None:
        for w in self.procs:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(10)

    def crash_lines(self) -> list[str]:
        """Lines of worker logs that tell of an unhandled exception."""
        bad = ("Traceback", "exception was never retrieved", "Unhandled", "Fatal Python error")
        out = []
        for w in self.procs:
            text = w.log.read_text(errors="replace") if w.log.exists() else ""
            out += [f"{w.log.name}: {line}" for line in text.splitlines() if line.startswith(bad)]
        return out


# -- the submitter ------------------------------------------------------------------------------


class Submitter:
    """Submits ``faults.effect`` tasks in small batches from a thread, numbering them.

    ``acked`` holds the numbers of the tasks whose submit returned; ``refused`` those whose
    submit raised (the database was away): neither may be lost or invented.
    """

    def __init__(self, url: str, batch: int = 20, every: float = 0.05) -> None:
        self.url = url
        self.batch = batch
        self.every = every
        self.acked: set[int] = set()
        self.refused: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._next = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _run(self) -> None:
        from tasklib_sqla import Config, TaskClient
        from tests.faults.fault_tasks import effect

        client: TaskClient[Any] = TaskClient(Config(database_url=self.url))
        try:
            while not self._stop.is_set():
                numbers = list(range(self._next, self._next + self.batch))
                self._next += self.batch
                calls = [{"n": n, "seconds": (n % 7) * 0.01} for n in numbers]
                try:
                    await asyncio.wait_for(client.submit_many(effect, calls), 10)
                    self.acked.update(numbers)
                except Exception:
                    self.refused.update(numbers)
                    await asyncio.sleep(0.2)
                await asyncio.sleep(self.every)
        finally:
            await client.dispose()


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    """Stop (or close) whatever was started, in reverse order, however the block ends."""
    try:
        yield
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                (getattr(thing, "kill_all", None) or getattr(thing, "close", None) or thing.stop)()
