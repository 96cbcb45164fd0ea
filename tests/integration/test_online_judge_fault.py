"""Fault tolerance of the online loop: the judge actor's process is killed mid-run.

The judge is stateless, so Ray restarts it and re-sends the verdict calls in flight; the
run must complete with every trained pair logged once.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mmalign import config
from tests.faults import kill_when_exists, pair_logs_once

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "assets" / "models" / "shapes-llava-small"


@pytest.mark.ray
@pytest.mark.slow
def test_judge_killed_mid_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    import ray

    from actors.runtime import init_ray
    from pipelines.online_dpo import run

    out = tmp_path / "run"
    cfg = config.load(
        str(ROOT / "pipelines/configs/shapes-cpu.yaml"),
        {
            "name": "judgefault",
            "sampler.model": str(POLICY),
            "sampler.max_new_tokens": "24",
            "learner.steps": "4",
            "learner.batch_size": "6",
            "storage.output_dir": str(out),
            "storage.checkpoint_every": "4",
            "pipeline.eval_rows": "0",
        },
    )
    init_ray(local_cpus=8)
    killed: list[int] = []
    marker = out / "pairs" / "step-000001.jsonl"
    thread = threading.Thread(target=kill_when_exists, args=(marker, "JudgeActor", killed))
    thread.start()
    try:
        summary = run(cfg)
    finally:
        thread.join(timeout=5)
        ray.shutdown()
    assert len(killed) == 1, "the judge was never killed: the test proved nothing"
    assert summary["steps"] == 4
    rows = pair_logs_once(out, 4, summary["totals"]["pairs"])
    assert rows
