"""Render the fault suite's figures (``TASKLIB_FAULTS_REPORT`` JSON lines) as a Markdown table.

uv run --extra test python -m tests.faults.report faults.jsonl
"""

from __future__ import annotations

import json
import sys
from typing import Any

COLUMNS = [
    ("scenario", "scenario"),
    ("tasks", "tasks"),
    ("lost", "lost"),
    ("double", "double outcomes"),
    ("leases", "leases lost (live workers)"),
    ("repeats", "repeats: killed / own error / other"),
    ("orphans", "orphan effects"),
    ("crashes", "worker crashes"),
    ("back", "first completion after restart"),
    ("kills", "kill -9"),
    ("seconds", "s"),
]


def row(f: dict[str, Any]) -> dict[str, str]:
    other = f["repeats"] - f["repeats_of_killed"] - f["repeats_after_task_error"]
    back = f.get("first_completion_after_back")
    return {
        "scenario": f["scenario"],
        "tasks": f"{f['completed'] + f['failed']:,}",
        "lost": str(f["missing"] + f["unfinished"]),
        "double": str(f["outcome_mismatches"]),
        "leases": str(f["lease_losses"]),
        "repeats": f"{f['repeats_of_killed']} / {f['repeats_after_task_error']} / {other}",
        "orphans": str(f["orphan_effects"]),
        "crashes": str(len(f["crashes"]) + f["bad_exits"]),
        "back": "" if back is None else f"{back:.2f} s",
        "kills": str(f["kills"]) if f["kills"] else "",
        "seconds": f"{f['seconds']:.0f}",
    }


def render(lines: list[dict[str, Any]]) -> str:
    out = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" if key == "scenario" else "---:" for key, _ in COLUMNS) + "|",
    ]
    for f in lines:
        r = row(f)
        out.append("| " + " | ".join(r[key] for key, _ in COLUMNS) + " |")
    repeats = [(f["scenario"], rep) for f in lines for rep in f.get("repeat_list", [])]
    if repeats:
        out.append("")
        out.append("Repeats (task number, runs, the errors in its history):")
        out.append("")
        out += [
            f"- {scenario}: n={r['n']}, {r['runs']} runs, {', '.join(r['errors']) or '-'}"
            for scenario, r in repeats
        ]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m tests.faults.report FIGURES.jsonl\n")
        return 2
    with open(argv[0]) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    print(render(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
