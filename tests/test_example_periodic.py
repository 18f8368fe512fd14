"""examples/periodic.py runs its one-second schedule with an in-process worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_ticks(db_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "examples.periodic", "4"],
        cwd=ROOT,
        env={**os.environ, "TASKLIB_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    ticks = [line for line in out.stdout.splitlines() if line.startswith("tick ")]
    assert 2 <= len(ticks) <= 5, out.stdout
    assert len(set(ticks)) == len(ticks)
