"""The bad-input corpus (tests/bad_inputs.py) through pipelines/bdhs.py and
pipelines/offline_dpo.py on one local Ray cluster with a random tiny LLaVA.

Rows by id: every good id written exactly once (BDHS shards / trained on), every bad id in
the quarantine file with its reason; the CLI returns (exit 0). A mostly-bad corpus makes
each CLI exit non-zero (SystemExit with a message = status 1) naming the top reasons.
Kept small: POVID (one forward per row, no embedder pool), 4 new tokens, one DPO step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests import bad_inputs
from tests.unit.test_bad_input_corpus import assert_reasons


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mmalign.models.tiny_llava import build_tiny_llava

    path = tmp_path_factory.mktemp("bad-input-cli") / "tiny"
    model, processor = build_tiny_llava("small", seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _bdhs_argv(prompts: str, model: str, out: Path) -> list[str]:
    return [
        *("--data.prompts", prompts, "--sampler.model", model),
        *("--bdhs.variant", "povid", "--sampler.max_new_tokens", "4"),
        *("--sampler.batch_size", "8", "--storage.output_dir", str(out)),
    ]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.ray
def test_bdhs_cli_on_bad_input_corpus(ray_cluster: None, model_dir: str, tmp_path: Path) -> None:
    from pipelines.bdhs import main

    corpus = bad_inputs.llava_jsonl(tmp_path / "in")
    assert len(corpus.bad) > len(corpus.good)  # a bad-input corpus: lift the share guard
    argv = _bdhs_argv(corpus.uri, model_dir, tmp_path / "run")
    summary = main([*argv, "--data.max_quarantined", "0.9", "--bdhs.identical", "flag"])
    ids = [
        i
        for shard in sorted((tmp_path / "run" / "bdhs").glob("part-*.parquet"))
        for i in pq.read_table(shard).column("id").to_pylist()
    ]
    assert sorted(ids) == sorted(corpus.good)  # each good id exactly once
    assert summary["rows"] == len(corpus.good) and summary["quarantined"] == len(corpus.bad)
    assert_reasons(_jsonl(tmp_path / "run" / "bdhs_quarantine.jsonl"), corpus)

    # mostly bad, found by the operator (after generation): exit non-zero, reasons counted
    mostly = bad_inputs.mostly_bad_images(tmp_path / "mostly")
    with pytest.raises(SystemExit) as err:
        main(_bdhs_argv(mostly.uri, model_dir, tmp_path / "mostly-run"))
    msg = str(err.value.code)
    assert msg.startswith("bdhs.py: error: bdhs (") and "4 of 5 rows (80%) quarantined" in msg
    assert "Top reasons: 3 x images: unreadable (UnidentifiedImageError" in msg
    assert "1 x reference: empty" in msg
    assert_reasons(_jsonl(tmp_path / "mostly-run" / "bdhs_quarantine.jsonl"), mostly)


def _dpo_argv(pairs: str, model: str, out: Path) -> list[str]:
    return [
        *("--data.offline_pairs", pairs, "--sampler.model", model),
        *("--storage.output_dir", str(out), "--pipeline.eval_rows", "0"),
        *("--learner.lora_r", "4", "--learner.lora_alpha", "8", "--learner.lr", "1e-3"),
        *("--learner.batch_size", "2", "--learner.steps", "1"),
    ]


@pytest.mark.slow
@pytest.mark.ray
def test_offline_dpo_cli_on_bad_input_corpus(
    ray_cluster: None, model_dir: str, tmp_path: Path
) -> None:
    from pipelines.offline_dpo import main

    # mostly bad first: it fails after the quarantine pass, before any training
    mostly = bad_inputs.mostly_bad_parquet(tmp_path / "mostly")
    with pytest.raises(SystemExit) as err:
        main(_dpo_argv(mostly.uri, model_dir, tmp_path / "mostly-run"))
    msg = str(err.value.code)
    assert msg.startswith("offline_dpo.py: error: offline_dpo (")
    assert "5 of 7 rows (71%) quarantined, above the allowed 50%" in msg
    assert "Top reasons: 3 x chosen: empty response; 2 x images: unreadable image" in msg
    assert_reasons(_jsonl(tmp_path / "mostly-run" / "quarantine.jsonl"), mostly)
    assert not (tmp_path / "mostly-run" / "checkpoints").exists()

    corpus = bad_inputs.preference_parquet(tmp_path / "in")
    out = tmp_path / "run"
    metrics = main([*_dpo_argv(corpus.uri, model_dir, out), "--data.max_quarantined", "0.9"])
    assert metrics["rows"] == {"trained_on": len(corpus.good), "quarantined": len(corpus.bad)}
    assert metrics["final"]["step"] == 1
    assert_reasons(_jsonl(out / "quarantine.jsonl"), corpus)
    written = json.loads((out / "metrics.json").read_text())
    assert written["evaluation"] is None  # pipeline.eval_rows 0 = skip it
    assert written["rows"] == metrics["rows"]


def test_context_check_reads_no_weights_from_s3(model_dir: str, s3_bucket: str) -> None:
    """An s3:// policy: the quarantine pass copies its config and processor, not weights."""
    from mmalign import storage
    from pipelines.offline_dpo import _text_context, _without_weights

    uri = f"{s3_bucket}/models/tiny"
    storage.upload_dir(model_dir, uri)
    local = Path(_without_weights(uri))
    names = {p.name for p in local.rglob("*") if p.is_file()}
    assert "config.json" in names and not any(n.endswith(".safetensors") for n in names)
    processor, limit = _text_context(uri)
    assert limit == 1024 and processor.tokenizer("a red square")["input_ids"]
