"""Fault tolerance of pipelines/offline_dpo.py: a Ray Train learner worker is killed mid-run.

Ray Train restarts the worker group from the latest checkpoint (`learner.max_failures`)
within the same run; the run must end at the configured step having trained on every row
exactly once per epoch: the workers' data report (`actors.learner_train.data_report`,
rows and an id digest per epoch, carried in each checkpoint) must equal the dataset's.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from tests.faults import kill_when_exists

ROWS, WORKERS, STEPS = 8, 2, 8  # 1 row per worker per step: 4 steps an epoch, 2 epochs


def _pairs(path: Path) -> list[str]:
    """ROWS distinct preference pairs (a coloured square each) as our Parquet; their ids."""
    from PIL import Image

    from mmalign.io import write_preferences
    from mmalign.schema import preference_row

    colours = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0)}
    names, rows = list(colours), []
    for i in range(ROWS):
        c, other = names[i % 3], names[(i + 1) % 3]
        img = Image.new("RGB", (32, 32), (255, 255, 255))
        img.paste(colours[c], (4 + i % 5, 4 + i % 5, 28, 28))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append(
            preference_row(
                id=f"pair-{i}",
                prompt=f"What colour is shape {i}?",
                chosen=f"It is {c}.",
                rejected=f"It is {other}.",
                images=[buf.getvalue()],
                source="test",
                method="bdhs",
            )
        )
    write_preferences(rows, str(path))
    return [r["id"] for r in rows]


@pytest.mark.ray
@pytest.mark.slow
def test_learner_worker_killed_mid_offline_dpo_resumes_and_sees_each_row_once(
    tmp_path: Path,
) -> None:
    import ray

    from actors.learner_train import data_report, ids_digest
    from mmalign.config import parse_args
    from mmalign.models.tiny_llava import build_tiny_llava
    from pipelines.offline_dpo import run

    model_dir = tmp_path / "tiny"
    model, processor = build_tiny_llava("small", seed=0)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    ids = _pairs(tmp_path / "pairs.parquet")
    ckpts = tmp_path / "run" / "checkpoints"
    argv = [
        *("--data.offline_pairs", str(tmp_path / "pairs.parquet")),
        *("--sampler.model", str(model_dir), "--storage.output_dir", str(tmp_path / "run")),
        *("--storage.checkpoint_every", "2", "--pipeline.eval_rows", "0"),
        *("--learner.lora_r", "4", "--learner.lora_alpha", "8", "--learner.lr", "1e-3"),
        *("--learner.batch_size", str(WORKERS), "--learner.num_workers", str(WORKERS)),
        *("--learner.steps", str(STEPS), "--learner.shuffle_window", "4"),
        *("--learner.max_failures", "2"),
    ]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        killed: list[int] = []
        # Ray Train writes its snapshot once it has registered a checkpoint (step 2): a
        # kill before that would restart from scratch, not from a checkpoint
        marker = ckpts / "checkpoint_manager_snapshot.json"
        killer = threading.Thread(
            target=kill_when_exists, args=(marker, "RayTrainWorker", killed), kwargs={"count": 1}
        )
        killer.start()
        metrics = run(parse_args(argv))
        killer.join()
    finally:
        ray.shutdown()

    assert len(killed) == 1, "no learner worker was killed: the test proved nothing"
    final = metrics["final"]
    assert final["step"] == STEPS and final["epoch"] == 1
    # the last report came from a worker group that resumed from a checkpoint, not step 0
    assert final["start_step"] in (2, 4, 6), "the run did not restart from a checkpoint"
    assert final["pairs_seen"] == STEPS * WORKERS
    assert metrics["checkpoint"] == str(ckpts / f"step_{STEPS:06d}")
    # every row trained on exactly once in each of the 2 epochs, across the restart
    want = {"rows": ROWS, "digest": f"{ids_digest(ids):016x}"}
    assert data_report(metrics["checkpoint"]) == {0: want, 1: want}
    # the report is per checkpoint: at step 6, half of the second epoch
    at6 = data_report(str(ckpts / "step_000006"))
    assert at6[0] == want and at6[1]["rows"] == ROWS // 2 and at6[1] != want
    assert (tmp_path / "run" / "merged" / "config.json").exists()
