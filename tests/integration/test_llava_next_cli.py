"""LLaVA-1.6 (AnyRes) through the pipelines' CLIs on local Ray: a tiny random LlavaNext
checkpoint as policy and VLM judge, LLaVA-instruct JSON with non-square JPEGs (a
different tile grid per aspect ratio). bdhs.py writes a pair per row with each row's own
image-token count, offline_dpo.py trains and merges on them, online_dpo.py runs mode mixed
with the VLM judge, and the merged policy loads and evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.llava_next import llava_json, save_tiny_llava_next

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_llava_next_through_bdhs_offline_and_online_clis(tmp_path: Path) -> None:
    import ray

    from actors.runtime import init_ray
    from mmalign.engines.mm_inputs import count_image_tokens
    from mmalign.logprobs import default_prompt_text
    from mmalign.models.loading import load_model
    from pipelines import bdhs, offline_dpo, online_dpo

    model = save_tiny_llava_next(tmp_path / "tiny-next")
    data = llava_json(tmp_path / "data", 8)
    fast = ["--sampler.model", model, "--sampler.max_new_tokens", "8"]
    init_ray(local_cpus=8)
    try:
        summary = bdhs.main(
            ["--data.prompts", data, "--storage.output_dir", str(tmp_path / "b"), *fast]
        )
        rows = pq.read_table(tmp_path / "b" / "bdhs").to_pylist()
        assert summary["rows"] == len(rows) == 8, summary
        # each row's mask was drawn over the processor's image tokens for that image
        _, processor = load_model(model)
        items = {i["id"]: i for i in json.loads(Path(data).read_text())}
        counts = set()
        for row in rows:
            params = json.loads(row["meta"]["params"])
            image = (tmp_path / "data" / items[row["id"]]["image"]).read_bytes()
            prompt = default_prompt_text(processor, row["prompt"][0]["content"][-1]["text"])
            assert params["image_tokens"] == count_image_tokens(processor, prompt, image)
            # the density is a count of that row's positions: visible / image_tokens
            visible = params["mask_density"] * params["image_tokens"]
            assert abs(visible - round(visible)) < 1e-6 and 0 <= visible <= params["image_tokens"]
            counts.add(params["image_tokens"])
        assert len(counts) >= 3, counts  # aspect ratios gave different grids

        metrics = offline_dpo.run(
            offline_dpo.parse_args(
                [
                    "--data.offline_pairs", str(tmp_path / "b" / "bdhs"),
                    "--storage.output_dir", str(tmp_path / "o"),
                    "--learner.steps", "2", "--learner.batch_size", "4",
                    *fast,
                ]
            ),
            evaluate=False,
        )  # fmt: skip
        assert metrics["final"]["step"] == 2 and metrics["rows"]["trained_on"] == 8
        merged, _ = load_model(metrics["merged_model"])
        assert type(merged).__name__ == "LlavaNextForConditionalGeneration"

        summary = online_dpo.main(
            [
                "--pipeline.mode", "mixed", "--data.prompts", data,
                "--data.offline_pairs", str(tmp_path / "b" / "bdhs"),
                "--judge.kind", "vlm", "--judge.model", model, "--judge.max_new_tokens", "8",
                "--learner.steps", "2", "--learner.batch_size", "4",
                "--storage.output_dir", str(tmp_path / "m"), "--pipeline.eval_rows", "2",
                *fast,
            ]
        )  # fmt: skip
        assert summary["steps"] == 2 and summary["totals"]["samples"] > 0
        assert summary["totals"]["judged"] > 0  # the VLM judge ran on AnyRes rows
        assert set(summary["eval"]) == set(summary["base_eval"])
        assert len(list((tmp_path / "m" / "pairs").glob("step-*.jsonl"))) == 2
    finally:
        ray.shutdown()
