"""The bad-input corpus (tests/bad_inputs.py) through the readers and per-row stages, no cluster.

LLaVA prompts: `mmalign.io.read_prompts`, then the BDHS operator (the tiny model, POVID:
one forward, no embedder) on the dict batch Ray Data would hand it, whose output must
convert to Arrow as Ray Data converts it. Preference pairs: offline_dpo's Ray Data stages
(convert_batch with the context check, duplicate_entries, quarantine_entries, keep_good) on
a plain Arrow table. Every good id comes out once, every bad id with its reason.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from mmalign import io as mio
from tests import bad_inputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mmalign.models.tiny_llava import build_tiny_llava

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("bad-input") / "tiny"
    model, processor = build_tiny_llava("small", seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def assert_reasons(entries: list[dict], corpus: bad_inputs.Corpus) -> None:
    """Quarantine entries == the corpus's bad rows, by id (with multiplicity) and reason."""
    assert Counter(e["id"] for e in entries) == Counter(i for i, _ in corpus.bad)
    for rid, fragment in corpus.bad:
        reasons = [e["reason"] for e in entries if e["id"] == rid]
        assert any(fragment in r for r in reasons), (rid, fragment, reasons)


def test_llava_corpus_every_row_accounted_for(tmp_path: Path, model_dir: str) -> None:
    from mmalign.config import BDHSConfig, SamplerConfig
    from operators.bdhs import OUTPUT_COLUMNS, BDHSOperator, as_batch

    corpus = bad_inputs.llava_jsonl(tmp_path)
    records, quarantine = mio.read_prompts(corpus.uri)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) and corpus.good <= set(ids)
    op = BDHSOperator(SamplerConfig(model=model_dir, max_new_tokens=4), BDHSConfig(variant="povid"))
    out = op(as_batch(records))
    pa.Table.from_pydict({c: list(out[c]) for c in OUTPUT_COLUMNS})  # what Ray Data does
    quarantine += [
        {"id": i, "reason": e} for i, e in zip(out["id"], out["error"], strict=True) if e
    ]
    assert {i for i, e in zip(out["id"], out["error"], strict=True) if not e} == corpus.good
    assert_reasons(quarantine, corpus)
    mio.write_jsonl(quarantine, str(tmp_path / "quarantine.jsonl"))  # every id writable


def test_undecodable_json_fails_naming_file_and_offset(tmp_path: Path) -> None:
    from pipelines.bdhs import main

    uri, offset = bad_inputs.latin1_json(tmp_path)
    with pytest.raises(mio.InputError, match=rf"latin1.json: not UTF-8 at byte offset {offset}$"):
        mio.read_prompts(uri)
    argv = ["--data.prompts", uri, "--storage.output_dir", str(tmp_path / "run")]
    with pytest.raises(
        SystemExit, match=rf"^bdhs.py: error: .*latin1.json: not UTF-8 .* {offset}$"
    ):
        main(argv)


def test_mostly_bad_prompts_exit_non_zero_before_ray(tmp_path: Path) -> None:
    """The reader alone quarantines 4 of 5 rows: the CLI exits 1 naming the top reasons,
    without starting Ray or loading a model (no such model exists here)."""
    corpus = bad_inputs.mostly_bad_llava(tmp_path)
    argv = ["--data.prompts", corpus.uri, "--sampler.model", str(tmp_path / "no-model")]
    argv += ["--storage.output_dir", str(tmp_path / "run")]
    run = subprocess.run(
        [sys.executable, str(ROOT / "pipelines/bdhs.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("bdhs.py: error: bdhs (") and "4 of 5 rows (80%) quarantined" in last
    assert "Top reasons: 3 x conversations: expected a list of turns, got str; " in last
    assert "1 x conversations.human.value: expected text, got int" in last
    assert "Traceback" not in run.stderr


def test_preference_corpus_every_row_accounted_for(tmp_path: Path, model_dir: str) -> None:
    from pipelines.offline_dpo import (
        convert_batch,
        duplicate_entries,
        keep_good,
        quarantine_entries,
    )

    corpus = bad_inputs.preference_parquet(tmp_path)
    table = mio.read_parquet(corpus.uri)
    converted = convert_batch(table, image_root=str(tmp_path), ranked=False, model=model_dir)
    assert converted.num_rows == table.num_rows  # one row out per row in
    info = converted.select(["id", "error", "responses"]).to_pylist()
    duplicates = duplicate_entries(info, corpus.uri)
    drop = frozenset(d["id"] for d in duplicates)
    bad, k = quarantine_entries([r for r in info if r["id"] not in drop], corpus.uri, False)
    assert k == 0
    assert_reasons(bad + duplicates, corpus)
    kept = keep_good(converted, 0, drop).column("id").to_pylist()
    assert sorted(kept) == sorted(corpus.good)
    images = {r["id"]: r["image"] for r in keep_good(converted, 0, drop).to_pylist()}
    from PIL import Image

    for name in bad_inputs.GOOD_IMAGES:  # the learner's bytes decode, whatever the mode
        Image.open(io.BytesIO(images[f"good-{name}"])).convert("RGB")


def test_too_long_counts_every_position(model_dir: str) -> None:
    """mark_too_long quarantines a row exactly when its encoded sequence passes the limit."""
    from transformers import AutoProcessor

    from mmalign.logprobs import sequence_length
    from mmalign.preference_rows import CONVERTED_SCHEMA
    from pipelines.offline_dpo import mark_too_long

    processor = AutoProcessor.from_pretrained(model_dir)
    row = {
        "id": "a",
        "image": bad_inputs.png(),
        "prompt": "What colour is it?",
        "chosen": "It is red.",
        "rejected": "It is a long answer that says blue, green and yellow.",
        "rejected_extra": [],
        "responses": [],
        "error": "",
    }
    n = sequence_length(processor, row["image"], row["prompt"], [row["chosen"], row["rejected"]])
    table = pa.Table.from_pylist([row], schema=CONVERTED_SCHEMA)
    assert mark_too_long(table, processor, n).column("error").to_pylist() == [""]
    errors = mark_too_long(table, processor, n - 1).column("error").to_pylist()
    assert errors == [f"prompt: too long ({n} positions > {n - 1})"]
    assert mark_too_long(table, processor, 0).column("error").to_pylist() == [""]  # no limit
