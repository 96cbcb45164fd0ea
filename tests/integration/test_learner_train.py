"""Ray Train preference learner: data-parallel equivalence, exact resume, the offline pipeline.

The Ray tests start one local cluster for the module and compare Ray Train runs of the tiny
random LLaVA against the plain engine (`PreferenceLearner`) fed the same rows in the same
order in this process: the reference for "1 worker" and for "an uninterrupted run".
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from actors.learner_train import Phases, TrainLoopConfig, learner_settings, make_trainer
from mmalign.config import LearnerConfig
from mmalign.engines.checkpoint import latest_checkpoint
from mmalign.engines.distributed_learner import (
    epoch_seed,
    local_batch_size,
    micro_batches,
    window_shuffle,
    worker_seed,
)
from mmalign.engines.learner import PreferenceLearner

# ------------------------------------------------------------------ pure helpers


def test_window_shuffle_is_a_seeded_permutation_per_window_on_cpu() -> None:
    rows = list(range(10))
    out = list(window_shuffle(rows, 4, seed=3))
    assert out == list(window_shuffle(rows, 4, seed=3))  # deterministic
    assert sorted(out[:4]) == [0, 1, 2, 3] and sorted(out[4:8]) == [4, 5, 6, 7]
    assert sorted(out[8:]) == [8, 9] and out != rows
    assert list(window_shuffle(rows, 0, seed=3)) == rows
    assert epoch_seed(0, 1, 0) != epoch_seed(0, 0, 0) != epoch_seed(0, 0, 1)


def test_micro_batches_drop_the_short_tail_on_cpu() -> None:
    assert list(micro_batches(range(7), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert local_batch_size(8, 2) == 4
    with pytest.raises(ValueError, match=r"learner.batch_size \(6\).*num_workers \(4\)"):
        local_batch_size(6, 4)


def test_phases_time_the_first_wait_apart_on_cpu() -> None:
    phases = Phases()
    assert list(phases.timed(iter([1, 2, 3]), "data_wait", "first_batch")) == [1, 2, 3]
    assert set(phases.seconds) == {"first_batch", "data_wait"}
    assert list(phases.timed(iter([]), "data_wait", "first_batch")) == []
    with phases.time("steps"):
        pass
    assert all(v >= 0 for v in phases.seconds.values()) and "steps" in phases.seconds


def test_latest_checkpoint_needs_trainer_state_on_cpu(tmp_path: Path) -> None:
    for name, complete in (("step_000002", True), ("step_000010", True), ("step_000011", False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / ("trainer_state.pt" if complete else "adapter_config.json")).write_text(
            ""
        )
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_000010")
    assert latest_checkpoint(str(tmp_path / "missing")) == ""


def _allreduce_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from mmalign.engines.distributed_learner import allreduce_mean_

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # Buckets of <= 6 elements per dtype: float32 [a] (5) and [b, d] (3 + 1); float64 [c].
    a = torch.arange(5, dtype=torch.float32) * (rank + 1)  # mean: 1.5 * arange
    b = torch.full((3,), float(rank))  # mean: 0.5
    c = torch.full((2, 2), 10.0 * rank, dtype=torch.float64)  # mean: 5
    d = torch.tensor([1.0 + rank])  # mean: 1.5
    allreduce_mean_([a, b, c, d], bucket_numel=6)
    torch.save([a, b, c, d], f"{out}.{rank}")
    dist.destroy_process_group()


def test_allreduce_mean_in_buckets_with_gloo_on_cpu(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "out")
    mp.spawn(_allreduce_worker, args=(str(tmp_path / "init"), out), nprocs=2)
    for rank in (0, 1):
        a, b, c, d = torch.load(f"{out}.{rank}")
        assert torch.equal(a, torch.arange(5, dtype=torch.float32) * 1.5)
        assert torch.equal(b, torch.full((3,), 0.5)) and torch.equal(d, torch.tensor([1.5]))
        assert c.dtype == torch.float64 and torch.equal(
            c, torch.full((2, 2), 5.0, dtype=torch.float64)
        )


def test_quarantine_entries_and_keep_good_on_cpu() -> None:
    from pipelines.offline_dpo import keep_good, quarantine_entries

    info = [
        {"id": "a", "error": "", "responses": ["1", "2", "3"]},
        {"id": "b", "error": "chosen: empty response", "responses": []},
        {"id": "c", "error": "", "responses": ["1", "2"]},
        {"id": "d", "error": "", "responses": ["1", "2", "3"]},
    ]
    bad, k = quarantine_entries(info, "src", ranked=False)
    assert (bad, k) == ([{"id": "b", "reason": "chosen: empty response", "source": "src"}], 0)
    bad, k = quarantine_entries(info, "src", ranked=True)  # K=3 is the most common
    assert k == 3 and [(b["id"], b["reason"]) for b in bad] == [
        ("b", "chosen: empty response"),
        ("c", "responses: K=2 differs from the dataset's K=3"),
    ]
    table = pa.Table.from_pylist(info)
    assert keep_good(table, 0).column("id").to_pylist() == ["a", "c", "d"]
    assert keep_good(table, 3).column("id").to_pylist() == ["a", "d"]
    assert "error" not in keep_good(table, 0).column_names


# ------------------------------------------------------------------ Ray fixtures


def _png(colour: tuple[int, int, int], box: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (32, 32), (255, 255, 255))
    img.paste(colour, (box, box, 32 - box, 32 - box))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0), "yellow": (240, 220, 0)}


def _rows(n: int) -> list[dict]:
    """n distinct learner rows (LEARNER_COLUMNS)."""
    names = list(COLOURS)
    rows = []
    for i in range(n):
        c, other = names[i % 4], names[(i + 1) % 4]
        rows.append(
            {
                "id": f"r{i}",
                "image": _png(COLOURS[c], 4 + i % 6),
                "prompt": f"What colour is shape {i}?",
                "chosen": f"It is {c}.",
                "rejected": f"It is {other}.",
                "rejected_extra": [],
                "responses": [],
            }
        )
    return rows


@pytest.fixture(scope="module")
def ray_cluster(s3_server: dict[str, str]) -> Iterator[None]:
    """One local Ray cluster for the module. Its workers inherit the environment at start,
    so the S3 server's endpoint and credentials are set first (as a node's would be)."""
    import ray

    saved = {k: os.environ.get(k) for k in s3_server}
    os.environ.update(s3_server)
    os.environ.pop("AWS_PROFILE", None)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mmalign.models.tiny_llava import build_tiny_llava

    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = build_tiny_llava("small", seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


# lr 1e-3 moves every LoRA weight by ~1e-3 per step. The Ray runs and their in-process
# references load the model in float64 (LOOP_DTYPE): Adam's first step is ~lr * sign(grad),
# so in float32 a gradient element near zero whose sign flips with summation order (2
# workers of 2 rows vs 1 of 4, other padding, other thread counts) moves by ~2e-3 and a
# 1e-6 comparison fails at random; float64 rounding is ~1e-9 times smaller.
LOOP_DTYPE = "float64"
TINY = LearnerConfig(
    lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-3, schedule="constant", num_cpus=1.0
)


def _reference(
    loop: TrainLoopConfig, rows: list[dict], stop_after: list[int]
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """The plain engine in this process, fed what a single worker sees: adapter states after
    the optimizer steps in `stop_after`, and the step() metrics of every optimizer step."""
    from mmalign.models.loading import load_model

    torch.manual_seed(worker_seed(loop.learner.seed, 0))
    model, processor = load_model(loop.model, dtype=loop.dtype)
    learner = PreferenceLearner(model, processor, learner_settings(loop))
    states, stepped, epoch = [], [], 0
    while learner.global_step < max(stop_after):
        order = window_shuffle(rows, loop.shuffle_window, epoch_seed(loop.learner.seed, epoch, 0))
        for batch in micro_batches(order, loop.learner.batch_size):
            metrics = learner.step(batch)
            if not metrics["stepped"]:
                continue
            stepped.append(metrics)
            if learner.global_step in stop_after:
                states.append(learner.adapter_state())
            if learner.global_step == max(stop_after):
                break
        epoch += 1
    return states, stepped


def _adapter(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(checkpoint_dir, "adapter_model.safetensors"))


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want) and any("lora_B" in k for k in got)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


# ------------------------------------------------------------------ Ray tests


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_match_one_on_the_global_batch_on_cpu(
    ray_cluster: None, model_dir: str, tmp_path: Path
) -> None:
    import ray.data

    rows = _rows(4)  # the whole dataset is one global batch: 2 rows per worker per step
    learner = dataclasses.replace(TINY, batch_size=4, num_workers=2, steps=2, shuffle_window=0)
    loop = TrainLoopConfig(model=model_dir, learner=learner, dtype=LOOP_DTYPE, checkpoint_every=1)
    result = make_trainer(loop, ray.data.from_items(rows), checkpoints=str(tmp_path / "ck")).fit()

    assert os.path.basename(result.checkpoint.path) == "step_000002"
    files = set(os.listdir(result.checkpoint.path))
    assert {"adapter_config.json", "trainer_state.pt", "rng_rank0.pt", "rng_rank1.pt"} <= files
    one = dataclasses.replace(loop, learner=dataclasses.replace(learner, num_workers=1))
    want, stepped = _reference(one, rows, [1, 2])
    for step, state in zip((1, 2), want):
        got = _adapter(str(tmp_path / "ck" / f"step_{step:06d}"))
        _assert_same(got, state)
        assert max(v.abs().max().item() for k, v in got.items() if "lora_B" in k) > 1e-4
    # Adam's update hides the gradient's scale, so compare the pre-clip gradient norm too:
    # a sum instead of a mean, or no sync at all, changes it.
    got = result.metrics
    assert got["grad_norm"] == pytest.approx(stepped[-1]["grad_norm"], rel=1e-5)
    assert got["loss"] == pytest.approx(stepped[-1]["loss"], rel=1e-5)
    assert (got["step"], got["pairs_seen"], got["start_step"], got["epoch"]) == (2, 8, 0, 1)


@pytest.mark.ray
@pytest.mark.slow
def test_stop_and_resume_equals_an_uninterrupted_run_on_cpu(
    ray_cluster: None, model_dir: str, tmp_path: Path
) -> None:
    import ray.data

    rows = _rows(8)
    # Everything that carries state across a resume: accumulation (2 micro-batches per
    # step), warmup + cosine schedule, LoRA dropout (RNG), a window shuffle per epoch, and a
    # stop in the middle of an epoch (4 micro-batches = 2 steps per epoch; stop at step 3).
    learner = dataclasses.replace(
        TINY,
        batch_size=2,
        grad_accum=2,
        steps=6,
        lora_dropout=0.1,
        schedule="cosine",
        warmup_steps=1,
        lr=1e-2,
        shuffle_window=4,
    )
    loop = TrainLoopConfig(
        model=model_dir,
        learner=learner,
        dtype=LOOP_DTYPE,
        checkpoint_every=2,
        output_dir=str(tmp_path / "out"),
    )
    ckpts = str(tmp_path / "ck")
    first = make_trainer(
        dataclasses.replace(loop, stop_at_step=3), ray.data.from_items(rows), checkpoints=ckpts
    ).fit()
    assert sorted(d for d in os.listdir(ckpts) if d.startswith("step_")) == [
        "step_000002",
        "step_000003",
    ]
    assert (first.metrics["step"], first.metrics["epoch"]) == (3, 1)
    second = make_trainer(loop, ray.data.from_items(rows), checkpoints=ckpts).fit()
    assert second.metrics["start_step"] == 3, "the second run did not resume"
    assert (second.metrics["step"], second.metrics["pairs_seen"]) == (6, 24)

    (at3, at6), _ = _reference(loop, rows, [3, 6])
    _assert_same(_adapter(os.path.join(ckpts, "step_000003")), at3)
    _assert_same(_adapter(second.checkpoint.path), at6)
    state = torch.load(os.path.join(second.checkpoint.path, "trainer_state.pt"), weights_only=True)
    assert (state["global_step"], state["micro_step"]) == (6, 12)
    assert any(
        f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "out" / "tensorboard")
    )


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_resumes_a_checkpoint_of_the_online_learner_on_cpu(
    ray_cluster: None, model_dir: str, tmp_path: Path
) -> None:
    """The online loop's learner (built as actors.online.LearnerActor builds it) trains 2
    steps and checkpoints with the loop's state; a Ray Train run given that checkpoint
    starts at step 2 and ends where the online learner's own next step ends."""
    import ray.data

    from mmalign.engines import checkpoint
    from mmalign.models.loading import load_model

    rows = _rows(4)
    learner = dataclasses.replace(TINY, batch_size=2, steps=3, shuffle_window=0)
    model, processor = load_model(model_dir, dtype=LOOP_DTYPE)
    online = PreferenceLearner(model, processor, learner)
    online.step(rows[2:])
    online.step(rows[:2])
    uri = checkpoint.step_dir(str(tmp_path / "online" / "checkpoints"), 2)
    checkpoint.save(uri, online, {"step": 2, "version": 2, "totals": {"pairs": 4}})
    online.step(rows[:2])  # Ray Train restarts the data at epoch 0: its first batch
    loop = TrainLoopConfig(model=model_dir, learner=learner, dtype=LOOP_DTYPE, resume_from=uri)
    result = make_trainer(loop, ray.data.from_items(rows), checkpoints=str(tmp_path / "ck")).fit()

    assert (result.metrics["start_step"], result.metrics["step"]) == (2, 3)
    assert os.path.basename(result.checkpoint.path) == "step_000003"
    _assert_same(_adapter(result.checkpoint.path), online.adapter_state())


def _pairs_parquet(directory: Path) -> tuple[str, set[str]]:
    """Our preference Parquet: 6 good rows (one with an image path next to the file, one
    with an extra rejected answer) and 3 bad ones; returns (uri, ids of the bad rows)."""
    from mmalign.io import write_preferences
    from mmalign.schema import preference_row

    rows = []
    for i, row in enumerate(_rows(6)):
        extra = ["It is purple."] if i == 1 else []
        image: bytes | str = row["image"]
        if i == 2:
            (directory / "img2.png").write_bytes(row["image"])
            image = "img2.png"  # relative: resolved against the Parquet's directory
        rows.append(
            preference_row(
                id=row["id"],
                prompt=row["prompt"],
                chosen=row["chosen"],
                rejected=row["rejected"],
                images=[image],
                source="test",
                method="bdhs",
                rejected_extra=extra,
            )
        )
    empty = dict(rows[0], id="bad-chosen", chosen=[])
    garbage = dict(rows[0], id="bad-bytes", images=[{"bytes": b"not an image", "path": None}])
    missing = dict(rows[0], id="bad-path", images=[{"bytes": None, "path": "nope.png"}])
    uri = str(directory / "pairs.parquet")
    write_preferences([*rows[:3], empty, garbage, *rows[3:], missing], uri)
    return uri, {"bad-chosen", "bad-bytes", "bad-path"}


@pytest.mark.ray
@pytest.mark.slow
def test_offline_dpo_pipeline_to_s3_on_cpu(
    ray_cluster: None, model_dir: str, s3_bucket: str, tmp_path: Path
) -> None:
    """Local Parquet in; checkpoints, TensorBoard, merged model, metrics and quarantine out
    to a real S3 server (moto on loopback, signed requests)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign import storage
    from mmalign.config import parse_args
    from pipelines.offline_dpo import run

    pairs, bad_ids = _pairs_parquet(tmp_path)
    out = f"{s3_bucket}/runs/dpo"
    argv = [
        *("--data.offline_pairs", pairs, "--sampler.model", model_dir),
        *("--storage.output_dir", out, "--storage.checkpoint_every", "1"),
        *("--learner.lora_r", "4", "--learner.lora_alpha", "8", "--learner.lr", "1e-3"),
        *("--learner.batch_size", "2", "--learner.steps", "2"),
    ]
    metrics = run(parse_args(argv), evaluate=False)

    lines = storage.read_bytes(f"{out}/quarantine.jsonl").decode().splitlines()
    reasons = {q["id"]: q["reason"] for q in map(json.loads, lines)}
    assert set(reasons) == bad_ids
    assert reasons["bad-chosen"].startswith("chosen:")
    assert reasons["bad-bytes"].startswith("images: unreadable image")
    assert reasons["bad-path"].startswith("images: cannot read")
    assert metrics["rows"] == {"trained_on": 6, "quarantined": 3}
    assert set(metrics["seconds"]) == {"startup", "ray_start", "data_check", "train"}
    assert metrics["final"]["step"] == 2
    assert metrics["checkpoint"] == f"{out}/checkpoints/step_000002"
    assert json.loads(storage.read_bytes(f"{out}/metrics.json"))["final"] == metrics["final"]
    ckpt = set(storage.list_files(metrics["checkpoint"]))
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.pt"):
        assert f"{metrics['checkpoint']}/{name}" in ckpt

    local = storage.download_dir(f"{out}/merged", str(tmp_path / "merged"))
    merged = AutoModelForImageTextToText.from_pretrained(local)
    AutoProcessor.from_pretrained(local)
    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    delta = merged.state_dict()[name] - base.state_dict()[name]
    assert delta.abs().max() > 1e-7, "the LoRA update was not merged"
    vision = "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged.state_dict()[vision], base.state_dict()[vision])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(storage.download_dir(f"{out}/tensorboard", str(tmp_path / "tb")))
    events.Reload()
    for tag in ("loss", "reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps"):
        assert [e.step for e in events.Scalars(f"train/{tag}")] == [1, 2]

    with pytest.raises(SystemExit, match="already holds checkpoints"):
        run(parse_args([*argv, "--storage.resume", "false"]), evaluate=False)


@pytest.mark.ray
@pytest.mark.slow
def test_offline_dpo_runs_as_a_script(model_dir: str, tmp_path: Path) -> None:
    """`python pipelines/offline_dpo.py ...` as a user types it (its own local Ray): once
    failed in a Ray Data stage that could not unpickle a function of __main__."""
    import os
    import subprocess
    import sys

    pairs, _ = _pairs_parquet(tmp_path)
    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    cmd = [
        sys.executable, "pipelines/offline_dpo.py", "--data.offline_pairs", pairs,
        "--sampler.model", model_dir, "--storage.output_dir", str(out),
        "--learner.lora_r", "4", "--learner.lora_alpha", "8", "--learner.batch_size", "2",
        "--learner.steps", "2", "--pipeline.eval_rows", "0",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": ""}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["step"] == 2 and metrics["evaluation"] is None
