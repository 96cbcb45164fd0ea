"""Mode rloo through the online loop on local Ray: the samplers draw k = 4 answers per
prompt, the judge role scores each alone (the object-grounded reward on ShapesWorld
annotations), the learner takes RLOO steps; weight sync, pair logs, checkpoints and resume
are the Online-DPO loop's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmalign import config
from mmalign.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "assets" / "models" / "shapes-llava-small"


def _cfg(out: Path, steps: int, **more: str) -> config.Config:
    return config.load(
        str(ROOT / "pipelines/configs/shapes-cpu.yaml"),
        {
            "name": "rlootest",
            "pipeline.mode": "rloo",
            "sampler.model": str(POLICY),
            "sampler.max_new_tokens": "16",
            "sampler.samples_per_prompt": "4",
            "learner.steps": str(steps),
            "learner.batch_size": "3",
            "learner.lr": "1e-4",
            "storage.output_dir": str(out),
            "storage.checkpoint_every": "1",
            "pipeline.eval_rows": "0",
            **more,
        },
    )


def test_rloo_needs_a_scoring_judge() -> None:
    from pipelines.online_dpo import check_config

    with pytest.raises(ConfigError, match="judge.kind: mode 'rloo' scores each sample alone"):
        check_config(_cfg(Path("/tmp/unused"), 1, **{"judge.kind": "vlm"}))


@pytest.mark.ray
@pytest.mark.slow
def test_rloo_and_ppo_loops_train_log_rewards_and_resume(tmp_path: Path) -> None:
    import ray

    from actors.runtime import init_ray
    from mmalign.judge import object_score
    from mmalign.metrics.vocab import shapes_vocabulary
    from mmalign.shapes.records import shapes_rows
    from pipelines.online_dpo import run

    out = tmp_path / "run"
    init_ray(local_cpus=8)
    try:
        summary = run(_cfg(out, 3))
        assert summary["steps"] == 3 and summary["totals"]["samples"] == 3 * 3 * 4
        # a driver killed after the step-2 checkpoint: the last step's outputs never landed
        shutil.rmtree(out / "checkpoints" / "step_000003")
        (out / "pairs" / "step-000002.jsonl").unlink()
        again = run(_cfg(out, 3, **{"storage.resume": "true"}))
        # mode ppo: the same samples and rewards, a value head in the learner's checkpoints
        ppo_out = tmp_path / "ppo"
        ppo = run(_cfg(ppo_out, 2, **{"pipeline.mode": "ppo", "learner.ppo_epochs": "2"}))
        shutil.rmtree(ppo_out / "checkpoints" / "step_000002")
        ppo_again = run(_cfg(ppo_out, 2, **{"pipeline.mode": "ppo", "learner.ppo_epochs": "2",
                                             "storage.resume": "true"}))  # fmt: skip
    finally:
        ray.shutdown()
    assert ppo["steps"] == 2 and ppo_again["loop"]["steps"] == 1  # resumed after step 1
    state = torch.load(
        ppo_out / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False
    )
    assert any(k.startswith("value_head.") for k in state["trainable"])
    assert again["steps"] == 3 and again["totals"]["samples"] == 3 * 3 * 4
    logs = sorted((out / "pairs").glob("step-*.jsonl"))
    assert [p.name for p in logs] == [f"step-{i:06d}.jsonl" for i in range(3)]
    rows = [json.loads(x) for p in logs for x in p.read_text().splitlines()]
    assert len(rows) == 9 and all(len(r["samples"]) == len(r["rewards"]) == 4 for r in rows)
    # the logged reward is the object score of that sample on the prompt's annotations
    vocab = shapes_vocabulary()
    for r in rows[:3]:
        index = int(r["id"].rsplit("-", 1)[1])  # pref-000688: a pure function of the index
        (rec,) = [x for x in shapes_rows("pref", max_rows=index + 1)[index:] if x["id"] == r["id"]]
        names = [o["name"] for o in rec["objects"]]
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        want = [object_score(s, names, vocab, question) for s in r["samples"]]
        assert r["rewards"] == want, (r["samples"], names)
    # rewards were normalised with the first step's statistics (mean 0 over step 0), kept
    # in the checkpoints' loop state, so the resumed run's step 2 used the same ones
    first = [x for r in rows[:3] for x in r["normalized_rewards"]]
    assert abs(sum(first) / len(first)) < 1e-9
    raw0 = torch.tensor([x for r in rows[:3] for x in r["rewards"]], dtype=torch.float64)
    mean, std = float(raw0.mean()), float(raw0.std()) or 1.0
    for r in rows[6:]:  # step 2, written by the resumed run
        want = [(x - mean) / std for x in r["rewards"]]
        assert all(abs(a - b) < 1e-9 for a, b in zip(r["normalized_rewards"], want))
    loop = json.loads((out / "checkpoints" / "step_000003" / "loop_state.json").read_text())
    assert loop["source"]["reward_stats"] == pytest.approx([mean, std])
    assert (out / "checkpoints" / "step_000003").is_dir()
