"""One learner persistence API (mmalign.engines.checkpoint) for the online loop and Ray Train.

Each learner is built the way its host builds it (actors.online.LearnerActor: a plain
PreferenceLearner from the `learner` section; actors.learner_train: a
SyncedPreferenceLearner from TrainLoopConfig), and each side saves / loads with the calls
its host makes, so a checkpoint of one loop is shown to resume in the other, both ways,
and both export paths to write the same merged HF directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from actors.learner_train import TrainLoopConfig, learner_settings, resume_state
from mmalign import storage
from mmalign.config import LearnerConfig
from mmalign.engines import checkpoint
from mmalign.engines.distributed_learner import LoopState, SyncedPreferenceLearner
from mmalign.engines.learner import PreferenceLearner

CFG = LearnerConfig(
    lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-2, schedule="constant", batch_size=2
)


def _image(colour: tuple[int, int, int]):
    from PIL import Image

    img = Image.new("RGB", (32, 32), (255, 255, 255))
    img.paste(colour, (8, 8, 24, 24))
    return img


ROWS = [
    {
        "image": _image((255, 0, 0)),
        "prompt": "Is there a red square?",
        "chosen": "Yes.",
        "rejected": "No.",
    },
    {
        "image": _image((0, 0, 255)),
        "prompt": "Describe the image.",
        "chosen": "There is a blue square.",
        "rejected": "There is a red circle.",
    },
]


def _base():
    from mmalign.models.tiny_llava import build_tiny_llava

    return build_tiny_llava("small", seed=0)


def _online_learner() -> PreferenceLearner:
    """As actors.online.LearnerActor builds it."""
    model, processor = _base()
    return PreferenceLearner(model, processor, CFG)


def _train_learner() -> SyncedPreferenceLearner:
    """As actors.learner_train builds it on each worker."""
    model, processor = _base()
    return SyncedPreferenceLearner(
        model, processor, learner_settings(TrainLoopConfig(model="unused", learner=CFG))
    )


def _assert_same_learner(a: PreferenceLearner, b: PreferenceLearner) -> None:
    ta, tb = dict(a._trainable()), dict(b._trainable())
    assert set(ta) == set(tb) and any("lora_B" in n for n in ta)
    for name, p in ta.items():
        assert torch.equal(p, tb[name]), name
    assert (a.global_step, a.micro_step) == (b.global_step, b.micro_step)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for key, state in oa["state"].items():
        for field, value in state.items():
            assert torch.equal(value, ob["state"][key][field]), (key, field)
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


def test_online_checkpoint_resumes_in_the_ray_train_learner_on_cpu(tmp_path: Path) -> None:
    from pipelines.online_dpo import resume_point

    online, train = _online_learner(), _train_learner()
    for _ in range(2):
        online.step(ROWS)
    root = str(tmp_path / "ck")
    uri = checkpoint.step_dir(root, 2)
    # LearnerActor.save_checkpoint, with the loop state online_dpo.after_step passes
    checkpoint.save(uri, online, {"step": 2, "version": 2, "totals": {"pairs": 4}})
    assert checkpoint.latest_checkpoint(root) == uri == os.path.join(root, "step_000002")
    names = set(os.listdir(uri))
    assert {"adapter_config.json", "adapter_model.safetensors", "rng_rank0.pt"} <= names
    assert {checkpoint.LOOP_FILE, checkpoint.STATE_FILE} <= names

    state = resume_state(uri, train, rank=0, world=1, seed=CFG.seed)  # Ray Train's _restore
    assert dataclasses.asdict(state) == dataclasses.asdict(LoopState(step=2))
    _assert_same_learner(online, train)
    assert online.global_step == 2
    # and the two go on identically (LoRA dropout 0: no RNG in a step)
    assert online.step(ROWS) == train.step(ROWS)
    _assert_same_learner(online, train)
    # the online loop itself reads its own loop state back
    assert resume_point(checkpoint.read_loop_state(uri))[:2] == (2, 2)


def test_ray_train_checkpoint_resumes_in_the_online_learner_on_cpu(tmp_path: Path) -> None:
    from pipelines.online_dpo import resume_point

    train, online = _train_learner(), _online_learner()
    for _ in range(3):
        train.step(ROWS)
    uri = checkpoint.step_dir(str(tmp_path / "ck"), 3)
    # what actors.learner_train._checkpoint writes into the directory it reports
    loop = LoopState(step=3, epoch=1, batches_in_epoch=1, pairs_seen=6, world_size=1)
    checkpoint.save(uri, train, dataclasses.asdict(loop), rank=0)

    saved = checkpoint.load(uri, online)  # LearnerActor.load_checkpoint
    _assert_same_learner(train, online)
    step, version, totals = resume_point(saved)  # online_dpo.resume
    assert (step, version) == (3, 1) and set(totals.values()) == {0}
    assert online.step(ROWS) == train.step(ROWS)
    # Ray Train's own resume keeps the data position it saved
    again = _train_learner()
    assert resume_state(uri, again, rank=0, world=1, seed=CFG.seed) == loop


def test_both_exports_write_the_same_merged_directory_on_cpu(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    online, train = _online_learner(), _train_learner()
    online.step(ROWS)
    uri = checkpoint.save(checkpoint.step_dir(str(tmp_path / "ck"), 1), online, {"step": 1})
    checkpoint.load(uri, train)
    a, b = tmp_path / "online-merged", tmp_path / "train-merged"
    checkpoint.export_merged(online, str(a))  # LearnerActor.export_merged: merges a copy
    checkpoint.export_merged(train, str(b), in_place=True)  # end of a Ray Train run

    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert "config.json" in files and not any("adapter" in f for f in files)
    tensors = [f for f in files if f.endswith(".safetensors")]
    assert tensors
    for name in tensors:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and not any("lora" in k for k in ta)
        for key in ta:
            assert torch.equal(ta[key], tb[key]), key
    for name in set(files) - set(tensors):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # the online learner keeps training its LoRA; the Ray Train one was merged for good
    assert any("lora_B" in n for n, _ in online.model.named_parameters())
    assert not any("lora_B" in n for n, _ in train.model.named_parameters())


def test_a_save_killed_before_its_commit_is_never_resumed_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    learner = _online_learner()
    root = str(tmp_path / "ck")
    checkpoint.save(checkpoint.step_dir(root, 2), learner, {"step": 2})
    write = storage.write_bytes

    def killed(uri: str, data: bytes) -> None:
        if uri.endswith(checkpoint.STATE_FILE):
            raise KeyboardInterrupt  # the driver dies here
        write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(checkpoint.step_dir(root, 3), learner, {"step": 3})
    half = set(os.listdir(checkpoint.step_dir(root, 3)))
    assert {"adapter_config.json", checkpoint.LOOP_FILE} <= half
    assert checkpoint.STATE_FILE not in half
    assert checkpoint.latest_checkpoint(root) == checkpoint.step_dir(root, 2)


def test_checkpoint_round_trip_through_s3_on_cpu(s3_bucket: str) -> None:
    online, again = _online_learner(), _online_learner()
    online.step(ROWS)
    uri = checkpoint.step_dir(f"{s3_bucket}/run/checkpoints", 1)
    checkpoint.save(uri, online, {"step": 1, "version": 1, "totals": {}})
    assert checkpoint.latest_checkpoint(f"{s3_bucket}/run/checkpoints") == uri
    assert json.loads(storage.read_bytes(storage.join(uri, checkpoint.LOOP_FILE)))["step"] == 1
    assert checkpoint.load(uri, again)["version"] == 1
    _assert_same_learner(online, again)
