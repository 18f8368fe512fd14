"""Compatibility runs: every Python on the machine from 3.11 up, and the lowest dependencies.

    python3 scripts/compat.py            # both
    python3 scripts/compat.py pythons    # the test subset on the newest other Python found
    python3 scripts/compat.py pythons --all  # ... on each other Python found
    python3 scripts/compat.py lowest     # the test subset with the declared minimum versions
    python3 scripts/compat.py --serial   # one run after the other (default: at the same time)

The README's test command covers the default Python with the whole suite. This covers the
rest with the part of the suite that exercises the library's own code (the CLI, Alembic,
dashboard and framework-example tests run there only: they test other programs more than ours):

- **pythons**: each CPython 3.11+ this machine has (PATH, pyenv, /usr/bin), one per minor
  version, other than the one uv picks by default; from ``uv.lock``, in ``.tools/py3.N``.
- **lowest**: the runtime dependencies at the lowest versions ``pyproject.toml`` allows
  (uv's ``lowest-direct`` resolution: SQLAlchemy, asyncpg, pydantic, Alembic), with the test
  tools at their current releases, in ``.tools/lowest``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"
MIN_MINOR = 11

SUBSET = [
    "-m",
    "not slow and not faults",
    "-q",
    "-p",
    "no:cacheprovider",
    "--ignore=tests/test_admin.py",
    "--ignore=tests/test_alembic.py",
    "--ignore=tests/test_wheel.py",
    "--ignore=tests/test_example_fastapi.py",
    "--ignore=tests/test_example_flask.py",
    "--ignore=tests/test_example_sqlmodel.py",
    "--ignore=tests/test_dashboard.py",
    # Query plans depend on PostgreSQL, not on Python or the dependencies' versions; the
    # statements themselves run in the other tests.
    "--ignore=tests/test_claim_plans.py",
]
RUNTIME = ["sqlalchemy", "asyncpg", "pydantic", "alembic", "croniter"]
TEST_TOOLS = [
    "pytest",
    "pytest-asyncio",
    "pytest-postgresql",
    "pytest-timeout",
    "psycopg[binary]",
    "opentelemetry-sdk",
]


def uv(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "uv.py"), *args]
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)


def version_of(exe: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [exe, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.fullmatch(r"(\d+) (\d+)\s*", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if out.returncode == 0 and m else None


def pythons() -> dict[tuple[int, int], str]:
    """One interpreter per minor version >= 3.11, PATH first, then pyenv, then /usr/bin."""
    found: dict[tuple[int, int], str] = {}
    candidates: list[str] = []
    for minor in range(MIN_MINOR, 20):
        which = shutil.which(f"python3.{minor}")
        if which:
            candidates.append(which)
        root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
        candidates += sorted(glob.glob(f"{root}/versions/3.{minor}.*/bin/python3"), reverse=True)
        candidates.append(f"/usr/bin/python3.{minor}")
    for exe in candidates:
        version = version_of(exe) if Path(exe).exists() else None
        if version and version >= (3, MIN_MINOR) and version not in found:
            found[version] = exe
    return found


def default_python() -> tuple[int, int] | None:
    """The minor version the README's command runs the suite with (uv's own choice)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "uv.py"), "python", "find"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return version_of(out.stdout.strip()) if out.returncode == 0 else None


def pythons_runs(every: bool = False) -> list[Run]:
    default = default_python()
    others = {v: exe for v, exe in sorted(pythons().items()) if v != default}
    print(f"== Pythons: default {default}, others {[f'{a}.{b}' for a, b in others]}", flush=True)
    if not every and len(others) > 1:
        # The default run covers one end, the newest Python the other: CI's time budget keeps
        # the versions in between for `compat.py pythons --all`.
        newest = max(others)
        others = {newest: others[newest]}
        print("== (the newest only; --all for every one)", flush=True)
    runs = []
    for (major, minor), exe in others.items():
        env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(TOOLS / f"py{major}.{minor}")}
        # The environment is built here, before any run starts: two uv syncs at once would
        # share uv's cache lock and their output would interleave.
        uv("sync", "-q", "--frozen", "--python", exe, "--extra", "test", env=env)
        cmd = [sys.executable, str(ROOT / "scripts" / "uv.py"), "run", "--frozen", "--no-sync"]
        cmd += ["--python", exe, "--extra", "test", "pytest", *SUBSET]
        runs.append(Run(f"tests on Python {major}.{minor} ({exe})", cmd, env))
    return runs


def lowest_run() -> Run:
    venv = TOOLS / "lowest"
    python = venv / "bin" / "python"
    uv("venv", "-q", "--allow-existing", str(venv))
    # The runtime dependencies at their floors first; the test tools, added after, leave them.
    uv("pip", "install", "-q", "--python", str(python), "--resolution", "lowest-direct", "-e", ".")
    uv("pip", "install", "-q", "--python", str(python), *TEST_TOOLS)
    versions = subprocess.run(
        [str(python), "-c", _VERSIONS, *RUNTIME], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Run(
        f"tests with the lowest runtime dependencies: {versions}",
        [str(python), "-m", "pytest", *SUBSET],
        dict(os.environ),
    )


@dataclass
class Run:
    title: str
    cmd: list[str]
    env: dict[str, str]


def run_all(runs: list[Run], serial: bool) -> int:
    """Each run's pytest; at the same time unless ``serial``. The suites mostly wait (on
    PostgreSQL, on timers): two at once on two cores took the CI's compatibility step from
    about four minutes to two. Each run's output is printed whole when it ends, and every test
    database has a name of its own, so the runs share nothing but the server."""
    if serial:
        for run in runs:
            print(f"== {run.title}", flush=True)
            rc = subprocess.run(run.cmd, cwd=ROOT, env=run.env).returncode
            if rc:
                print(f"compat: {run.title}: failed ({rc})", file=sys.stderr)
                return 1
        return 0
    with contextlib.ExitStack() as stack:
        started = []
        for run in runs:
            log = stack.enter_context(tempfile.TemporaryFile("w+"))
            proc = subprocess.Popen(
                run.cmd, cwd=ROOT, env=run.env, stdout=log, stderr=subprocess.STDOUT, text=True
            )
            started.append((run, proc, log, time.monotonic()))
        failed = 0
        for run, proc, log, began in started:
            rc = proc.wait()
            log.seek(0)
            print(f"== {run.title} ({time.monotonic() - began:.0f} s)", flush=True)
            sys.stdout.write(log.read())
            sys.stdout.flush()
            if rc:
                print(f"compat: {run.title}: failed ({rc})", file=sys.stderr)
                failed = 1
        return failed


_VERSIONS = (
    "import sys, importlib.metadata as m; "
    "print(', '.join(f'{n} {m.version(n)}' for n in sys.argv[1:]))"
)


def main(argv: list[str]) -> int:
    flags = {"--all", "--serial"}
    every, serial = "--all" in argv[1:], "--serial" in argv[1:]
    which = [a for a in argv[1:] if a not in flags] or ["pythons", "lowest"]
    unknown = set(which) - {"pythons", "lowest"}
    if unknown:
        print(
            f"usage: {argv[0]} [pythons [--all]] [lowest] [--serial]; unknown: {sorted(unknown)}",
            file=sys.stderr,
        )
        return 2
    try:
        runs = pythons_runs(every) if "pythons" in which else []
        if "lowest" in which:
            runs.append(lowest_run())
    except subprocess.CalledProcessError as exc:
        print(f"compat: {' '.join(map(str, exc.cmd))} failed ({exc.returncode})", file=sys.stderr)
        return 1
    return run_all(runs, serial)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
