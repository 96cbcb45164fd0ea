"""Fault tolerance of pipelines/bdhs.py: the embedder actor is killed mid-run.

The similarity gate's embedder pool is stateless, so Ray restarts a dead embedder and
re-sends the calls in flight; the BDHS job must complete with every good row written once.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.faults import POLICY, kill_when_exists, small_bdhs_config


@pytest.mark.ray
@pytest.mark.slow
def test_embedder_killed_mid_bdhs_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    import ray

    from pipelines.bdhs import run_bdhs

    assert (POLICY / "config.json").exists(), "the shipped tiny policy is missing"
    cfg, prompt_ids = small_bdhs_config(
        tmp_path, 24, **{"bdhs.n_bdhs": 3, "storage.output_dir": str(tmp_path / "run")}
    )
    out_dir = tmp_path / "run" / "bdhs"
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        killed: list[int] = []
        first = out_dir / "part-00000.parquet"
        killer = threading.Thread(target=kill_when_exists, args=(first, "EmbedderActor", killed))
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
    assert sorted(ids) == sorted(prompt_ids) and len(ids) == len(set(ids))
    # the restarted embedder served the rest of the run from a new process
    assert all(a["pid"] != killed[0] for a in summary["embedder_actors"])
