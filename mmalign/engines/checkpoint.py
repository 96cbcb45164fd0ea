"""One save / load / export of the preference learner, shared by the online loop
(`actors.online.LearnerActor`, driven by `pipelines/online_dpo.py`) and Ray Train
(`actors.learner_train`). Ray-free; `uri` is a local path or an s3:// prefix.

Layout of one checkpoint, `<checkpoints>/step_XXXXXX/` (XXXXXX: 6 digits, the steps done:
loop steps online, optimizer steps under Ray Train):

    adapter_config.json         the peft adapter (the directory loads with
    adapter_model.safetensors     `PeftModel.from_pretrained(base, <step dir>)`)
    rng_rank{r}.pt              torch CPU/CUDA RNG of worker r (one file per worker)
    loop_state.json             the loop's position, a flat JSON object: `step` always; the
                                online loop adds `version` (weight version) and `totals`,
                                Ray Train adds `epoch`, `batches_in_epoch`, `pairs_seen`,
                                `world_size`. A reader takes the keys it knows and defaults
                                the rest, so either loop resumes the other's checkpoint.
    trainer_state.pt            `PreferenceLearner.state_dict()`: trainable weights, pending
                                gradients, optimizer, schedule, counters, RNG, settings

Commit point: `trainer_state.pt` is written last, atomically (`storage.write_bytes`), by
worker 0, and `latest_checkpoint` only returns a directory that holds it, so a save killed
half-way is never resumed from (the previous complete step is). Under Ray Train the
directory is assembled by Ray from every worker's part; Ray's own run snapshot
(`ray.train.get_checkpoint()`) is the primary resume there and the scan its fallback.

A checkpoint loads into a learner with the same settings only (`load_state_dict` checks
them): the two loops share one when they share the config's `learner` section.
`export_merged` writes the serving model (HF format, LoRA merged) for both loops.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from mmalign import storage
from mmalign.engines.learner import PreferenceLearner

STATE_FILE = "trainer_state.pt"
LOOP_FILE = "loop_state.json"
PREFIX = "step_"


def step_name(step: int) -> str:
    """`step_XXXXXX`, the directory name of loop step `step`'s checkpoint."""
    return f"{PREFIX}{step:06d}"


def step_dir(root: str, step: int) -> str:
    """`<root>/step_XXXXXX`, the checkpoint of loop step `step` under `root`."""
    return storage.join(root, step_name(step))


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(uri: str) -> Any:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def save(uri: str, learner: PreferenceLearner, loop_state: Mapping[str, Any], rank: int = 0) -> str:
    """Write worker `rank`'s part of a checkpoint to `uri`: every worker its RNG; worker 0
    the adapter, `loop_state` (needs `step`) and, last (the commit point), the learner
    state. Returns `uri`."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    rng = {"cpu": torch.get_rng_state(), "cuda": cuda}
    storage.write_bytes(storage.join(uri, f"rng_rank{rank}.pt"), _torch_bytes(rng))
    if rank != 0:
        return uri
    if "step" not in loop_state:
        raise ValueError("loop_state needs the loop's 'step'")
    with tempfile.TemporaryDirectory() as tmp:
        learner.save_adapter(tmp)
        storage.upload_dir(tmp, uri)
    storage.write_bytes(storage.join(uri, LOOP_FILE), json.dumps(dict(loop_state)).encode())
    storage.write_bytes(storage.join(uri, STATE_FILE), _torch_bytes(learner.state_dict()))
    return uri


def load(uri: str, learner: PreferenceLearner, rank: int = 0, seed: int = 0) -> dict[str, Any]:
    """Restore the learner (weights, optimizer, schedule, counters) and worker `rank`'s RNG
    from the checkpoint at `uri`; returns its loop state. A rank with no RNG file (more
    workers than when saved) gets a fresh stream seeded by (seed, rank, step)."""
    from mmalign.engines.distributed_learner import worker_seed

    learner.load_state_dict(_torch_load(storage.join(uri, STATE_FILE)))
    state = read_loop_state(uri)
    rng_uri = storage.join(uri, f"rng_rank{rank}.pt")
    if storage.exists(rng_uri):
        rng = _torch_load(rng_uri)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        torch.manual_seed(worker_seed(seed, rank) + learner.global_step)
    return state


def read_loop_state(uri: str) -> dict[str, Any]:
    """The loop state JSON of the checkpoint at `uri`."""
    return dict(json.loads(storage.read_bytes(storage.join(uri, LOOP_FILE))))


def latest_checkpoint(root: str) -> str:
    """The step_XXXXXX directory under `root` (local or s3://) with the highest step that
    holds a complete checkpoint (trainer_state.pt), or ""."""
    best, best_step = "", -1
    for path in storage.list_files(root):
        parent, _, name = path.rstrip("/").rpartition("/")
        step_name = parent.rpartition("/")[2]
        number = step_name[len(PREFIX) :]
        ok = name == STATE_FILE and step_name.startswith(PREFIX) and number.isdigit()
        if ok and int(number) > best_step:
            best, best_step = parent, int(number)
    return best


def export_merged(learner: PreferenceLearner, uri: str, *, in_place: bool = False) -> str:
    """Save the LoRA-merged model + processor (HF format) to `uri` for serving/evaluation.

    in_place=False merges a copy (one extra model of memory; the learner keeps training
    its unmerged weights: the online loop's periodic evals). in_place=True merges the
    learner's own model, which is then no longer a peft model: only when training is over
    (the end of a Ray Train run), at no extra memory."""
    peft_model: Any = learner.model
    merged: Any = peft_model.merge_and_unload() if in_place else learner.merged_model()
    if not storage.is_s3(uri):
        merged.save_pretrained(os.path.expanduser(uri))
        learner.processor.save_pretrained(os.path.expanduser(uri))
        return uri
    with tempfile.TemporaryDirectory() as local:
        merged.save_pretrained(local)
        learner.processor.save_pretrained(local)
        storage.upload_dir(local, uri)
    return uri
