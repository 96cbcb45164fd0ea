"""Fault tolerance of pipelines/bdhs.py: the embedder actor is killed mid-run.

The similarity gate's embedder pool is stateless, so Ray restarts a dead embedder and
re-sends the calls in flight; the BDHS job must complete with every good row written once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmalign import io as mio
from mmalign.config import load

POLICY = Path(__file__).resolve().parents[1] / "assets/models/shapes-llava-small"


def _embedder_pids() -> list[int]:
    """Processes of this test's own Ray cluster (children of this process) hosting an
    EmbedderActor: Ray titles an actor's worker process 'ray::<Class>...'."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::EmbedderActor"):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def _kill_embedder_after_first_shard(out_dir: Path, killed: list[int]) -> None:
    """Wait for the first shard, then SIGKILL the embedder actor's process (once)."""
    deadline = time.time() + 240
    while time.time() < deadline and not list(out_dir.glob("part-*.parquet")):
        time.sleep(0.2)
    for pid in _embedder_pids():
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


@pytest.mark.ray
@pytest.mark.slow
def test_embedder_killed_mid_bdhs_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    import ray

    from pipelines.bdhs import run_bdhs

    assert (POLICY / "config.json").exists(), "the shipped tiny policy is missing"
    records, quarantine = mio.read_prompts("shapesworld:pref", max_rows=24)
    assert not quarantine
    mio.write_prompts(records, str(tmp_path / "prompts.parquet"))
    cfg = load(
        None,
        {
            "data.prompts": str(tmp_path / "prompts.parquet"),
            "sampler.model": str(POLICY),
            "sampler.max_new_tokens": 8,
            "sampler.batch_size": 4,
            "bdhs.n_bdhs": 3,
            "bdhs.splitter": "regex",
            "storage.output_dir": str(tmp_path / "run"),
            "storage.shard_rows": 4,
        },
    )
    out_dir = tmp_path / "run" / "bdhs"
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        killed: list[int] = []
        killer = threading.Thread(target=_kill_embedder_after_first_shard, args=(out_dir, killed))
        killer.start()
        summary = run_bdhs(cfg)
        killer.join()
    finally:
        ray.shutdown()
    assert len(killed) == 1, "the embedder was never killed: the test proved nothing"
    ids = [
        i
        for shard in sorted(out_dir.glob("part-*.parquet"))
        for i in pq.read_table(shard).column("id").to_pylist()
    ]
    assert summary["total_rows"] == 24
    assert sorted(ids) == sorted(r["id"] for r in records) and len(ids) == len(set(ids))
    # the restarted embedder served the rest of the run from a new process
    assert all(a["pid"] != killed[0] for a in summary["embedder_actors"])
