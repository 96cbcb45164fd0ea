"""The online loop's Ray Data prompt source: rows in the object store, refs on the driver.

The operator is tested on a plain batch (no cluster); the source on a real local Ray:
bad rows are quarantined with their reason, the driver-side view holds no image bytes,
and actors resolve the same rows the single-process reader produces. The last test runs
the pipeline on a prompt set with bad rows: they are reported and the run goes on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from mmalign import config
from mmalign.rows import resolve_rows
from operators import prompt_source as ps

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "assets" / "models" / "shapes-llava-small"


def _llava_json(tmp: Path, n: int) -> str:
    """LLaVA JSON of n ShapesWorld rows; row 2 has no image, row 4 a corrupt PNG file."""
    from mmalign import io as mio
    from mmalign.shapes.records import shapes_rows

    uri = mio.write_llava_json(shapes_rows("pref", max_rows=n), str(tmp / "data"))
    items = json.loads(Path(uri).read_text())
    del items[2]["image"]
    (tmp / "data" / items[4]["image"]).write_bytes(b"\x89PNG not really")
    Path(uri).write_text(json.dumps(items))
    return uri


def _no_bytes(value: Any, path: str = "source") -> None:
    """Fail if `value` (driver-side state) holds bytes anywhere."""
    assert not isinstance(value, (bytes, bytearray, memoryview)), f"{path} holds bytes"
    if isinstance(value, dict):
        for k, v in value.items():
            _no_bytes(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _no_bytes(v, f"{path}[{i}]")


def test_load_prompt_rows_keeps_one_row_per_locator_and_quarantines_per_row(
    tmp_path: Path,
) -> None:
    uri = _llava_json(tmp_path, 6)
    locs = ps.plan_locators(uri)[:5] + ps.plan_locators("shapesworld:pref", max_rows=1)
    batch = pa.Table.from_pylist(locs)
    out = ps.load_prompt_rows(batch).to_pylist()
    assert [r["idx"] for r in out] == [0, 1, 2, 3, 4, 0]
    errors = [r["error"] for r in out]
    assert errors[2] == "image: missing" and errors[4].startswith("images: unreadable image")
    assert [e for i, e in enumerate(errors) if i not in (2, 4)] == ["", "", "", ""]
    good = out[0]
    assert good["images"][0]["bytes"].startswith(b"\x89PNG") and good["prompt"]
    assert out[5]["id"] == "pref-000000" and out[5]["source"] == "shapesworld"
    with pytest.raises(ValueError, match="missing input columns"):
        ps.load_prompt_rows(pa.Table.from_pylist([{"idx": 0}]))


@pytest.mark.ray
def test_prompt_source_driver_holds_refs_only_and_actors_resolve_rows_on_cpu(
    tmp_path: Path,
) -> None:
    import ray

    from actors.runtime import init_ray
    from mmalign import io as mio

    uri = _llava_json(tmp_path, 10)
    init_ray(local_cpus=8)
    try:
        source = ps.read_prompt_source(uri, rows_per_block=4)
        assert len(source) == 8 and len(source.blocks) >= 2
        assert [(q["idx"], q["reason"].split(":")[0]) for q in source.quarantine] == [
            (2, "image"),
            (4, "images"),
        ]
        # the driver's view: block refs, ints and ids, no image bytes anywhere
        assert all(isinstance(b, ray.ObjectRef) for b in source.blocks)
        _no_bytes({k: v for k, v in vars(source).items() if k != "blocks"})
        assert all(isinstance(x, int) for row in source.table for x in row)
        # an actor-side resolve gives the rows the single-process reader gives, in order
        rows = ray.get(ray.remote(resolve_rows).remote(source.refs(range(len(source)))))
        records, bad = mio.read_prompts(uri)
        assert [r["id"] for r in bad] == [q["id"] for q in source.quarantine][:1]
        good = [r for r in records if r["id"] != source.quarantine[1]["id"]]
        for got, want in zip(rows, good, strict=True):
            assert got["id"] == want["id"] and got["prompt"] == want["prompt"]
            assert got["objects"] == want["objects"]
            assert got["images"][0]["bytes"] == Path(want["images"][0]["path"]).read_bytes()
    finally:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_online_run_reports_quarantined_prompts_and_goes_on_on_cpu(tmp_path: Path) -> None:
    import ray

    from actors.runtime import init_ray
    from pipelines.online_dpo import run

    uri = _llava_json(tmp_path, 10)
    out = tmp_path / "run"
    cfg = config.load(
        str(ROOT / "pipelines/configs/shapes-cpu.yaml"),
        {
            "name": "sourcetest",
            "data.prompts": uri,
            "sampler.model": str(POLICY),
            "sampler.max_new_tokens": "16",
            "learner.steps": "2",
            "learner.batch_size": "4",
            "storage.output_dir": str(out),
            "storage.checkpoint_every": "2",
            "pipeline.eval_rows": "0",
            "sampler.samples_per_prompt": "4",  # also: k > 2 through the real loop
        },
    )
    init_ray(local_cpus=8)
    try:
        summary = run(cfg)
    finally:
        ray.shutdown()
    # 2 steps x 4 prompts x 4 samples; the judge compares (1, 2) and (3, 4) of each prompt
    assert summary["steps"] == 2 and summary["totals"]["samples"] == 32
    assert summary["totals"]["judged"] == 16
    quarantined = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["idx"], q["reason"]) for q in quarantined][0] == (2, "image: missing")
    assert quarantined[1]["reason"].startswith("images: unreadable image")
    bad_ids = {q["id"] for q in quarantined}
    logged = [
        json.loads(x)
        for p in sorted((out / "pairs").glob("*.jsonl"))
        for x in p.read_text().splitlines()
    ]
    assert not {r["id"].split("@")[0] for r in logged} & bad_ids
    assert len({r["id"] for r in logged}) == len(logged)  # at most one pair per prompt and step


@pytest.mark.ray
def test_online_run_stops_when_most_prompts_are_quarantined(tmp_path: Path) -> None:
    """8 of 10 prompt rows without an image: a systematic error, not bad data. The job
    stops before any role starts, naming the share and the top reason."""
    import ray

    from pipelines.online_dpo import main

    uri = _llava_json(tmp_path, 10)
    items = json.loads(Path(uri).read_text())
    for item in items[:8]:
        item.pop("image", None)
    Path(uri).write_text(json.dumps(items))
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "pipelines/configs/shapes-cpu.yaml"), "--data.prompts", uri]
    args += ["--sampler.model", str(POLICY), "--storage.output_dir", str(out)]
    from actors.runtime import init_ray

    init_ray(local_cpus=8)
    try:
        with pytest.raises(SystemExit) as err:
            main(args)
    finally:
        ray.shutdown()
    msg = str(err.value)
    assert msg.startswith("online_dpo.py: error: data.prompts"), msg
    assert "8 of 10 rows (80%) quarantined" in msg and "8 x image: missing" in msg, msg
    assert len((out / "quarantine.jsonl").read_text().splitlines()) == 8
    assert not (out / "checkpoints").exists()
