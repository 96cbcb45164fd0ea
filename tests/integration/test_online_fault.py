"""Fault tolerance of the online loop: a sampler actor is killed mid-run.

The run must complete, and every pair it trained on must appear exactly once (by id and by
(id, weight version)) in the pair logs, with the totals matching.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from mmalign import config
from tests.faults import pair_logs_once

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "assets" / "models" / "shapes-llava-small"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["online", "online-bdhs"])
def test_sampler_killed_mid_run_loses_and_duplicates_nothing_on_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    import ray

    from actors.runtime import init_ray
    from pipelines.online_dpo import run

    assert (POLICY / "config.json").exists(), "the shipped tiny policy is missing"
    out = tmp_path / "run"
    extra = {}
    if mode == "online-bdhs":
        from tests.integration.test_online_bdhs import _offline_parquet

        _offline_parquet(tmp_path / "offline.parquet", 12)
        extra = {
            "pipeline.mode": mode,
            "data.offline_pairs": str(tmp_path / "offline.parquet"),
            "bdhs.n_bdhs": "2",
            "bdhs.splitter": "regex",
        }
    cfg = config.load(
        str(ROOT / "pipelines/configs/shapes-cpu.yaml"),
        {
            **extra,
            "name": "faulttest",
            "sampler.model": str(POLICY),
            "sampler.concurrency": "2",
            "sampler.max_new_tokens": "24",
            "learner.steps": "5",
            "learner.batch_size": "6",
            "storage.output_dir": str(out),
            "storage.checkpoint_every": "5",
            "pipeline.eval_rows": "0",
        },
    )
    init_ray(local_cpus=8)
    killed: list[str] = []

    def killer() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "pairs" / "step-000001.jsonl").exists():
            time.sleep(0.2)
        ray.kill(ray.get_actor("faulttest-sampler-0"), no_restart=True)
        killed.append("sampler-0")

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = run(cfg)
    finally:
        thread.join(timeout=5)
        ray.shutdown()
    assert killed == ["sampler-0"]
    assert "sampler 0 died; replacing it" in capsys.readouterr().out
    assert summary["steps"] == 5
    rows = pair_logs_once(out, 5, summary["totals"]["pairs"])
    assert all(r["lag"] in (0, 1) for r in rows)  # max_staleness 1


@pytest.mark.ray
@pytest.mark.slow
def test_mixed_mode_draws_offline_pairs_with_probability_p_on_cpu(tmp_path: Path) -> None:
    import ray

    from actors.runtime import init_ray
    from mmalign import online
    from pipelines.online_dpo import run
    from tests.integration.test_online_bdhs import _offline_parquet

    _offline_parquet(tmp_path / "offline.parquet", 12)
    out = tmp_path / "run"
    cfg = config.load(
        str(ROOT / "pipelines/configs/shapes-cpu.yaml"),
        {
            "name": "mixedtest",
            "sampler.model": str(POLICY),
            "sampler.max_new_tokens": "24",
            "pipeline.mode": "mixed",
            "pipeline.p_offline": "0.5",
            "data.offline_pairs": str(tmp_path / "offline.parquet"),
            "learner.steps": "3",
            "learner.batch_size": "8",
            "storage.output_dir": str(out),
            "pipeline.eval_rows": "0",
        },
    )
    init_ray(local_cpus=8)
    try:
        run(cfg)
    finally:
        ray.shutdown()
    for step in range(3):
        logged = [
            json.loads(x)
            for x in (out / "pairs" / f"step-{step:06d}.jsonl").read_text().splitlines()
        ]
        n_offline = sum(online.mixed_choices(8, 0.5, cfg.sampler.seed, step))
        assert sum(r["source"] == "offline" for r in logged) == n_offline
        assert all(r["id"].startswith("off") for r in logged if r["source"] == "offline")
        assert sum(r["source"] == "online" for r in logged) <= 8 - n_offline
