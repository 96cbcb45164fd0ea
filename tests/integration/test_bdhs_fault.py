"""Fault tolerance of pipelines/bdhs.py: the embedder actor is killed mid-run.

The similarity gate's embedder pool is stateless, so Ray restarts a dead embedder and
re-sends the calls in flight; the BDHS job must complete with every good row written once.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmalign import io as mio
from mmalign.config import load
from tests.faults import kill_when_exists

POLICY = Path(__file__).resolve().parents[2] / "assets/models/shapes-llava-small"


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
            "bdhs.identical": "flag",  # keep every row: this test counts them by id
        },
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
    assert sorted(ids) == sorted(r["id"] for r in records) and len(ids) == len(set(ids))
    # the restarted embedder served the rest of the run from a new process
    assert all(a["pid"] != killed[0] for a in summary["embedder_actors"])
