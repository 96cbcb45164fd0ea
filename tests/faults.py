"""Fault injection for the Ray fault tests: kill a role's actor process for real."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def actor_pids(class_name: str) -> list[int]:
    """Processes of this test's own Ray cluster (children of this process) hosting an actor
    of `class_name`: Ray titles an actor's worker process 'ray::<Class>...'. Scoped to our
    children so another Ray cluster on the machine is never touched."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(f"ray::{class_name}"):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def kill_when_exists(
    marker: Path, class_name: str, killed: list[int], wait_s: float = 300, count: int = 0
) -> None:
    """Once `marker` exists (or after wait_s), SIGKILL every `class_name` actor process (the
    first `count` of them when count > 0) and record the pids in `killed` (run it in a
    thread beside the pipeline)."""
    deadline = time.time() + wait_s
    while time.time() < deadline and not marker.exists():
        time.sleep(0.2)
    pids = actor_pids(class_name)
    for pid in pids[:count] if count else pids:
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


def pair_logs_once(out: Path, steps: int, total_pairs: int) -> list[dict]:
    """The online run's pair logs, checked: one file per step, every pair trained on once
    (by id and by (id, weight version)), as many as the summary counted (> 0)."""
    import json

    paths = sorted((out / "pairs").glob("step-*.jsonl"))
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines()]
    assert len(paths) == steps
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "a pair was trained on twice"
    assert len({(r["id"], r["version"]) for r in rows}) == len(rows)
    assert len(rows) == total_pairs > 0
    return rows
