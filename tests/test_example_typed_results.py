"""examples/typed_results.py runs end to end, and mypy infers its result types (see CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_runs(db_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "examples.typed_results"],
        cwd=ROOT,
        env={**os.environ, "TASKLIB_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused: ValueError: no such customer")
    # The two invoices are booked concurrently: which gets number 1 is up to the scheduler.
    assert sorted(line.split(" ", 2)[2] for line in lines[1:3]) == [
        "for ada: 1250 cents",
        "for bob: 1250 cents",
    ]
    assert sorted(line.split()[1] for line in lines[1:3]) == ["1", "2"]
    assert lines[3:] == ["total: 2500"]
