"""BDHSOperator on plain dict batches, and pipelines/bdhs.py end to end on a local Ray cluster.

The policy is the trained shapes-llava-small when present (then the hallucination check
runs too), else a random tiny LLaVA saved to a temp dir.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from mmalign import io as mio
from mmalign.config import BDHSConfig, SamplerConfig, load
from mmalign.schema import PREFERENCE_SCHEMA
from operators.bdhs import (
    OUTPUT_COLUMNS,
    BDHSOperator,
    as_batch,
    row_seed,
    to_preference_row,
)

TRAINED = Path(__file__).resolve().parents[2] / "assets/models/shapes-llava-small"
SMALL = {"max_new_tokens": 8, "n_bdhs": 2, "splitter": "regex"}


def _op(model: str, max_new_tokens: int = 64, batched: bool = True, **bdhs: Any) -> BDHSOperator:
    """The operator over the config sections: sampler.max_new_tokens, bdhs.* fields."""
    sampler = SamplerConfig(model=model, max_new_tokens=max_new_tokens)
    return BDHSOperator(sampler, BDHSConfig(**bdhs), batched=batched)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    if (TRAINED / "config.json").exists():
        return str(TRAINED)
    from mmalign.models.tiny_llava import build_tiny_llava

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("bdhs") / "tiny"
    model, processor = build_tiny_llava("small", seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def bad_records(good: dict[str, Any]) -> list[dict[str, Any]]:
    """Three unusable rows: no reference, an undecodable image, a prompt too long."""
    return [
        {**good, "id": "bad-noref", "reference": ""},
        {**good, "id": "bad-image", "images": [{"bytes": b"not a png", "path": None}]},
        {**good, "id": "bad-long", "prompt": "describe " * 2000},
    ]


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    good, quarantine = mio.read_prompts("shapesworld:pref", max_rows=4)
    assert not quarantine
    return good


def test_operator_bdhs_on_dict_batch_on_cpu(model_dir: str, records: list[dict]) -> None:
    op = _op(model_dir, variant="bdhs", **SMALL)
    rows = records + bad_records(records[0])
    out = op(as_batch(rows))
    assert tuple(out) == OUTPUT_COLUMNS
    assert all(len(out[c]) == len(rows) for c in OUTPUT_COLUMNS)
    assert list(out["id"]) == [r["id"] for r in rows]  # one row out per row in, in order
    errors = dict(zip(out["id"], out["error"]))
    assert errors["bad-noref"].startswith("reference:")
    assert errors["bad-image"].startswith("images: unreadable")
    assert errors["bad-long"].startswith("prompt: too long")
    for i, rec in enumerate(records):
        assert out["error"][i] == "", out["error"][i]
        assert out["chosen"][i] == rec["reference"] and out["rejected"][i]
        meta = json.loads(out["meta"][i])
        assert meta["model_id"] == model_dir and meta["variant"] == "bdhs"
        assert meta["seed"] == 0 and meta["row_seed"] == row_seed(0, rec["id"])
        assert 1 <= meta["iterations"] <= 2 and len(meta["similarities"]) == meta["iterations"]
        assert meta["similarity"] == pytest.approx(meta["similarities"][-1])
        assert meta["final_unguided"] == (meta["iterations"] == 2)
        assert 0.0 <= meta["mask_density"] <= 1.0 and isinstance(meta["cut_points"], list)
        row = to_preference_row({c: out[c][i] for c in OUTPUT_COLUMNS}, rec)
        assert row["meta"]["iterations"] == meta["iterations"] and row["method"] == "bdhs"
        assert row["meta"]["seed"] == 0 and json.loads(row["meta"]["params"])["row_seed"]
    # a row's output depends on (seed, id) only, not on its batch
    # (similarities only up to float noise: the embedder pads texts per batch)
    alone = op(as_batch(records[1:2]))
    assert alone["rejected"][0] == out["rejected"][1]
    assert_same_meta(alone["meta"][0], out["meta"][1])


def assert_same_meta(a: str, b: str) -> None:
    ma, mb = json.loads(a), json.loads(b)
    assert ma.pop("similarity") == pytest.approx(mb.pop("similarity"), abs=1e-5)
    assert ma.pop("similarities") == pytest.approx(mb.pop("similarities"), abs=1e-5)
    assert ma == mb


def test_operator_povid_on_dict_batch_on_cpu(model_dir: str, records: list[dict]) -> None:
    op = _op(model_dir, variant="povid", max_new_tokens=8)
    rows = [
        {**records[0], "rejected": "There is a red star."},
        records[1],
        *bad_records(records[0])[:2],
    ]
    out = op(as_batch(rows))
    assert list(out["error"][:2]) == ["", ""]
    assert json.loads(out["rejected_extra"][0]) == ["There is a red star."]
    assert json.loads(out["rejected_extra"][1]) == []
    assert json.loads(out["meta"][0])["noise_steps"] == 500  # POVID's default step
    assert out["error"][2] and out["error"][3]


def test_operator_bdhs_noise_on_dict_batch_on_cpu(model_dir: str, records: list[dict]) -> None:
    op = _op(model_dir, variant="bdhs-noise", **SMALL)
    out = op(as_batch(records[:2]))
    assert list(out["error"]) == ["", ""] and all(out["rejected"])
    meta = json.loads(out["meta"][0])
    assert meta["variant"] == "bdhs-noise" and meta["noise_steps"] == 500
    assert list(out["method"]) == ["bdhs-noise", "bdhs-noise"]


def write_json_input(tmp: Path, n: int) -> tuple[str, set[str]]:
    """LLaVA JSON of n shapesworld:pref rows plus two bad ones; returns (uri, good ids)."""
    from mmalign.shapes.records import shapes_rows

    raw = shapes_rows("pref", seed=0, max_rows=n)
    raw.append({**raw[0], "id": "bad-missing-image"})
    raw.append({**raw[1], "id": "bad-empty-answer"})
    raw[-1]["conversations"] = [raw[1]["conversations"][0], {"from": "gpt", "value": ""}]
    uri = mio.write_llava_json(raw, str(tmp / "input"))
    os.remove(tmp / "input" / "images" / "bad-missing-image.png")
    return uri, {r["id"] for r in raw[:n]}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def read_ids(out_dir: Path) -> list[str]:
    return [
        i
        for shard in sorted(out_dir.glob("part-*.parquet"))
        for i in pq.read_table(shard).column("id").to_pylist()
    ]


@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_quarantine_and_resume(ray_cluster: None, model_dir: str, tmp_path: Path) -> None:
    from pipelines.bdhs import run_bdhs

    uri, good_ids = write_json_input(tmp_path, 14)
    cfg = load(
        None,
        {
            "data.prompts": uri,
            "sampler.model": model_dir,
            "sampler.max_new_tokens": 6,
            "sampler.batch_size": 4,
            "bdhs.n_bdhs": 2,
            "bdhs.splitter": "regex",
            "storage.output_dir": str(tmp_path / "run"),
            "storage.shard_rows": 4,
            "bdhs.identical": "flag",  # keep every good row: this test counts them
        },
    )
    out_dir = tmp_path / "run" / "bdhs"
    summary = run_bdhs(cfg)
    assert summary["rows"] == 14 and summary["quarantined"] == 2, summary
    # the similarity gate ran in the separate embedder pool, not in the sampler actors:
    # one call for the references plus >= 1 per try of every batch of 4 rows
    (pool,) = summary["embedder_actors"]
    assert pool["calls"] >= 2 * 4 and pool["texts"] >= 2 * 14
    assert pool["pid"] != os.getpid()
    shards = sorted(out_dir.glob("part-*.parquet"))
    assert [s.name for s in shards] == [f"part-{i:05d}.parquet" for i in range(4)]
    table = mio.read_parquet(str(out_dir))
    assert table.schema.remove_metadata().equals(PREFERENCE_SCHEMA)
    assert sorted(table.column("id").to_pylist()) == sorted(good_ids)
    # the shard directory is pure Parquet: a TRL user's load_dataset reads it as is
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=str(out_dir), split="train")
    assert sorted(loaded["id"]) == sorted(good_ids)
    flagged = [bool(json.loads(m["params"] or "{}").get("identical")) for m in loaded["meta"]]
    assert sum(flagged) == summary["identical"]
    assert [p.name for p in out_dir.iterdir() if not p.name.endswith(".parquet")] == []
    quarantine = tmp_path / "run" / "bdhs_quarantine.jsonl"
    bad = [json.loads(line) for line in quarantine.read_text().splitlines()]
    reasons = {q["id"]: q["reason"] for q in bad}
    assert set(reasons) == {"bad-missing-image", "bad-empty-answer"}
    assert "images" in reasons["bad-missing-image"] and "reference" in reasons["bad-empty-answer"]

    # a kill loses only the shard in flight: drop the last one and rerun
    lost = set(pq.read_table(shards[-1]).column("id").to_pylist())
    shards[-1].unlink()
    again = run_bdhs(cfg)
    assert again["rows"] == len(lost) and again["total_rows"] == 14
    ids = read_ids(out_dir)
    assert sorted(ids) == sorted(good_ids) and len(ids) == len(set(ids))


def test_operator_batched_equals_per_row_on_cpu(model_dir: str, records: list[dict]) -> None:
    """Rows stepping together (one generate + one embed call per try) give the per-row
    reference loop's output for a fixed seed under greedy decoding."""
    kw = {**SMALL, "n_bdhs": 3, "rho_th": 0.5, "seed": 3}
    batched = _op(model_dir, variant="bdhs", batched=True, **kw)(as_batch(records))
    per_row = _op(model_dir, variant="bdhs", batched=False, **kw)(as_batch(records))
    assert list(batched["rejected"]) == list(per_row["rejected"])
    assert list(batched["error"]) == list(per_row["error"])
    for a, b in zip(batched["meta"], per_row["meta"], strict=True):
        assert_same_meta(a, b)


@pytest.mark.slow
@pytest.mark.skipif(not (TRAINED / "config.json").exists(), reason="needs the trained model")
def test_rejected_hallucinate_more_than_chosen(model_dir: str) -> None:
    from mmalign.metrics.vocab import shapes_vocabulary

    good, _ = mio.read_prompts("shapesworld:pref", max_rows=60)
    describe = [r for r in good if len(r["objects"]) and r["reference"].count(".") > 1][:12]
    assert len(describe) >= 6
    out = _op(model_dir, variant="bdhs", max_new_tokens=16, n_bdhs=3)(as_batch(describe))
    vocab = shapes_vocabulary()

    def hallucinates(text: str, objects: list[str]) -> bool:
        return any(m not in set(objects) for m in vocab.find_mentions(text))

    rejected = sum(hallucinates(t, r["objects"]) for t, r in zip(out["rejected"], describe))
    chosen = sum(hallucinates(r["reference"], r["objects"]) for r in describe)
    assert rejected > chosen, (rejected, chosen)


def test_summary_rates_on_cpu() -> None:
    from pipelines.bdhs import summarize

    metas = [
        {"iterations": 1, "similarity": 0.5, "final_unguided": False},
        {"iterations": 3, "similarity": 0.9, "final_unguided": True},
        {"iterations": 2, "similarity": 0.1, "final_unguided": False},
        {"iterations": 1},  # POVID rows carry no similarity
    ]
    s = summarize(metas, written=4, quarantined=1)
    assert s["rows"] == 4 and s["quarantined"] == 1
    assert s["resample_rate"] == 0.5 and s["final_unguided_rate"] == 0.25
    assert s["mean_similarity"] == pytest.approx(0.5)


def test_existing_shards_and_no_silent_overwrite_on_cpu(tmp_path: Path) -> None:
    from pipelines.bdhs import ShardWriter, existing_shards, run_bdhs

    out = tmp_path / "bdhs"
    writer = ShardWriter(str(out), shard_rows=2, first_index=3)
    for i in range(5):
        writer.add(
            to_preference_row(
                {
                    "id": f"r{i}",
                    "prompt": "q",
                    "chosen": "a.",
                    "rejected": "b.",
                    "rejected_extra": "[]",
                    "source": "s",
                    "method": "bdhs",
                    "meta": '{"iterations": 1}',
                },
                {"images": [{"bytes": b"png", "path": None}]},
            )
        )
    writer.flush()
    assert sorted(p.name for p in out.glob("part-*")) == [
        "part-00003.parquet",
        "part-00004.parquet",
        "part-00005.parquet",
    ]
    assert existing_shards(str(out)) == ({f"r{i}" for i in range(5)}, 6)
    cfg = load(
        None,
        {"storage.output_dir": str(tmp_path), "storage.resume": False, "data.max_rows": 2},
    )
    with pytest.raises(SystemExit, match="already holds 5 rows"):
        run_bdhs(cfg)


@pytest.mark.ray
def test_run_that_quarantines_everything_exits_non_zero(ray_cluster: None, tmp_path: Path) -> None:
    """A wrong image root quarantines every row: a systematic error, so the CLI fails with
    the reasons counted instead of exiting 0 with nothing written."""
    from pipelines.bdhs import main

    uri, _ = write_json_input(tmp_path, 6)
    argv = [
        "--data.prompts",
        uri,
        "--data.image_root",
        str(tmp_path / "nowhere"),
        "--storage.output_dir",
        str(tmp_path / "run"),
    ]
    with pytest.raises(SystemExit) as err:
        main(argv)
    msg = str(err.value)
    assert msg.startswith("bdhs.py: error: bdhs (") and "every row quarantined" in msg
    assert "Top reasons: 7 x images: unreadable (StorageError: <path> No such file" in msg
    assert "1 x reference: empty" in msg
    assert len((tmp_path / "run" / "bdhs_quarantine.jsonl").read_text().splitlines()) == 8


def test_identical_pairs_are_dropped_or_flagged_and_counted(tmp_path: Path, records) -> None:
    """The stream after the operator: a y- equal to y+ (up to whitespace) is dropped by
    default, kept with meta.identical under bdhs.identical 'flag'; both count it."""
    from pipelines.bdhs import ShardWriter, _Stream

    rec = records[0]
    meta = json.dumps({"similarity": 1.0, "iterations": 5, "final_unguided": True})
    out = {
        "id": rec["id"],
        "prompt": rec["prompt"],
        "chosen": rec["reference"],
        "rejected": "  " + rec["reference"].replace(" ", "  ") + " ",
        "rejected_extra": "[]",
        "source": rec["source"],
        "method": "bdhs",
        "meta": meta,
        "error": "",
    }
    other = {**out, "id": records[1]["id"], "rejected": "There is a blue star."}
    for mode, written in (("drop", 1), ("flag", 2)):
        writer = ShardWriter(str(tmp_path / mode), 10, 0)
        stream = _Stream(writer, [], str(tmp_path / f"{mode}.jsonl"), mode)
        stream.add(out, rec)
        stream.add(other, records[1])
        writer.flush()
        assert (stream.identical, writer.written) == (1, written)
        rows = mio.read_parquet(str(tmp_path / mode)).to_pylist()
        flags = {r["id"]: json.loads(r["meta"]["params"]).get("identical") for r in rows}
        assert flags == (
            {records[1]["id"]: None}
            if mode == "drop"
            else {rec["id"]: True, records[1]["id"]: None}
        )


@pytest.mark.ray
def test_engine_error_on_most_of_a_batch_stops_the_job(
    ray_cluster: None, model_dir: str, tmp_path: Path
) -> None:
    """A checkpoint that fails on every row (vision_feature_layer out of range: IndexError
    in the vision tower) is a systematic failure: the CLI stops with that error from the
    first batch (sampler.max_batch_errors) instead of quarantining every row; at 1.0 the
    old behaviour (quarantine, then the run-level guard) is kept."""
    import shutil

    from pipelines.bdhs import main

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["vision_feature_layer"] = -99
    (broken / "config.json").write_text(json.dumps(config))
    uri, _ = write_json_input(tmp_path, 6)
    argv = [
        "--data.prompts", uri,
        "--sampler.model", str(broken),
        "--sampler.max_new_tokens", "4",
        "--sampler.batch_size", "4",
        "--bdhs.splitter", "regex",
        "--storage.output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as err:
        main(argv)
    msg = str(err.value)
    assert msg.startswith("bdhs.py: error: BDHS (bdhs): ") and "systematic failure" in msg
    assert "rows of one batch failed with the same error" in msg and "IndexError" in msg
    assert not list((tmp_path / "run" / "bdhs").glob("part-*.parquet"))

    with pytest.raises(SystemExit) as err:  # never stop early: the run-level guard fails
        main(
            [
                *argv,
                "--sampler.max_batch_errors",
                "1.0",
                "--storage.output_dir",
                str(tmp_path / "r2"),
            ]
        )
    # (a yes/no answer swapped without generating is the one row that gets through)
    assert "quarantined" in str(err.value) and "x generation: IndexError" in str(err.value)


@pytest.mark.ray
def test_llava_json_on_s3_with_relative_image_paths(
    model_dir: str, tmp_path: Path, s3_bucket: str
) -> None:
    """LLaVA JSON on S3 whose image paths are relative to it: the images are read from the
    bucket through the storage layer (they were once opened as local files, quarantining
    every row), and the output lands in the bucket."""
    import ray

    from mmalign import storage
    from pipelines.bdhs import run_bdhs

    # a cluster started after s3_env: its workers see the endpoint and keys, as a real one
    ray.shutdown()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)

    uri, good_ids = write_json_input(tmp_path, 4)
    storage.upload_dir(str(tmp_path / "input"), f"{s3_bucket}/input")
    cfg = load(
        None,
        {
            "data.prompts": f"{s3_bucket}/input/{Path(uri).name}",
            "sampler.model": model_dir,
            "sampler.max_new_tokens": 6,
            "bdhs.n_bdhs": 2,
            "bdhs.splitter": "regex",
            "bdhs.identical": "flag",
            "storage.output_dir": f"{s3_bucket}/run",
        },
    )
    summary = run_bdhs(cfg)
    assert summary["rows"] == 4 and summary["quarantined"] == 2, summary
    shards = [u for u in storage.list_files(f"{s3_bucket}/run/bdhs") if u.endswith(".parquet")]
    ids = [i for u in shards for i in mio.read_parquet(u).column("id").to_pylist()]
    assert sorted(ids) == sorted(good_ids)
    lines = storage.read_bytes(f"{s3_bucket}/run/bdhs_quarantine.jsonl").decode().splitlines()
    reasons = {json.loads(x)["id"]: json.loads(x)["reason"] for x in lines}
    assert set(reasons) == {"bad-missing-image", "bad-empty-answer"}
    assert f"{s3_bucket}/input/images/bad-missing-image.png" in reasons["bad-missing-image"]
    ray.shutdown()
