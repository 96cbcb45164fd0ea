"""Ray Train wrapper of the preference learner: one `PreferenceLearner` per worker.

    trainer = make_trainer(TrainLoopConfig(model=..., learner=cfg.learner, ...), train_ds,
                           checkpoints="s3://bucket/run/checkpoints")
    result = trainer.fit()   # result.checkpoint: the last step_XXXXXX directory

Data: each worker reads its shard of the "train" dataset (`mmalign.preference_rows` rows), shuffles
it in windows with a seed of (seed, epoch, rank) and steps on micro-batches of
`learner.batch_size / world_size` rows; the dataset runs with preserve_order, so Ray Data's
split is deterministic and a resumed run sees the same rows as an uninterrupted one.

Gradient sync: with world size > 1 the trainable (LoRA/projector) gradients are averaged
across workers once per optimizer step, right before the learner's own clipping, AdamW and
schedule. This is what DDP computes, done by hand because the learner calls peft methods on
its model (`disable_adapter` for the reference pass, `save_pretrained`, merging) that a DDP
wrapper would hide; with gradient accumulation it also syncs once per step, like `no_sync`.

Checkpoints (every `checkpoint_every` optimizer steps and at the end) are
`step_XXXXXX/` directories in the one layout of `mmalign.engines.checkpoint` (peft adapter,
trainer_state.pt, loop_state.json with the epoch/position, one rng_rank{r}.pt per worker),
the same the online loop writes: either loop resumes the other's. Resume: Ray Train's
`get_checkpoint()` (same storage path and run name), else `TrainLoopConfig.resume_from`.
A dead worker (killed process, lost node) restarts the worker group from the latest
checkpoint, up to `learner.max_failures` times, within the same `fit()`.

Data report: each worker adds `data_rank{r}.json` to every checkpoint, the rows it trained
on per epoch up to that step (count and an order-free digest of their ids,
`ids_digest`), carried across resumes; `data_report` merges the ranks. A run whose epochs
each saw every row once reports, per epoch, the dataset's count and digest: a row lost or
trained twice across a restart changes both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign import storage
from mmalign.config import LearnerConfig, parse_resources
from mmalign.engines import checkpoint
from mmalign.engines.distributed_learner import (
    MEAN_KEYS,
    LoopState,
    SyncedPreferenceLearner,
    epoch_seed,
    local_batch_size,
    mean_metrics,
    micro_batches,
    window_shuffle,
    worker_seed,
)
from mmalign.engines.learner import PreferenceLearner

__all__ = [
    "TrainLoopConfig",
    "data_report",
    "ids_digest",
    "learner_settings",
    "make_trainer",
    "resume_state",
    "train_loop",
    "worker_resources",
]

log = logging.getLogger("mmalign")


@dataclass(frozen=True)
class TrainLoopConfig:
    """What a worker needs beyond the learner section (run paths, the model, resume and
    stop points); paths are absolute local paths or s3:// URIs (Ray Train runs workers in
    their own working directory)."""

    model: str
    """Base (policy) model: saved HF directory or s3:// prefix."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Loss, LoRA, optimiser, batch size (global, per micro-step), steps, workers, shuffle
    window, response truncation."""
    dtype: str = "float32"
    """Parameter dtype of the base model (LoRA weights stay float32, peft upcasts them)."""
    output_dir: str = ""
    """Rank 0 writes TensorBoard scalars to <output_dir>/tensorboard ("" = none)."""
    export_dir: str = ""
    """Rank 0 saves the merged model + processor here at the end ("" = no export)."""
    checkpoint_every: int = 50
    """Report a checkpoint every k optimizer steps (and always at the last step)."""
    resume_from: str = ""
    """A step_XXXXXX checkpoint used when Ray Train has none for this run ("" = none)."""
    stop_at_step: int = 0
    """End this run after this optimizer step, checkpointing it (preemption drills; 0 = run
    to learner.steps). A later run with the same storage resumes from there."""
    cache_dir: str = "~/.cache/mmalign"
    """Where s3:// models are downloaded."""

    @property
    def shuffle_window(self) -> int:
        """Rows shuffled together per window (config learner.shuffle_window)."""
        return self.learner.shuffle_window


def learner_settings(cfg: TrainLoopConfig) -> LearnerConfig:
    """The settings each worker's PreferenceLearner takes: the learner section itself."""
    return cfg.learner


class _Scalars:
    """Rank 0's TensorBoard writer; for s3:// outputs it writes locally and uploads."""

    def __init__(self, output_dir: str, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.join(output_dir, "tensorboard")
        local = tempfile.mkdtemp() if storage.is_s3(output_dir) else self.remote
        self.writer = SummaryWriter(log_dir=local, purge_step=purge_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def sync(self) -> None:
        self.writer.flush()
        if storage.is_s3(self.remote):
            storage.upload_dir(self.writer.log_dir, self.remote)


# ------------------------------------------------------------------ the data report

DATA_FILE = "data_rank{rank}.json"


def ids_digest(ids: Iterable[str]) -> int:
    """Order-free digest of row ids: the sum of their 64-bit BLAKE2b hashes mod 2**64, so
    digests of disjoint parts (micro-batches, ranks) add up, and a lost or repeated id
    changes it."""
    total = 0
    for i in ids:
        total += int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big")
    return total % 2**64


class _Seen:
    """One worker's rows trained on per epoch: {epoch: [rows, digest]}."""

    def __init__(self, epochs: dict[int, list[int]] | None = None) -> None:
        self.epochs = epochs or {}

    def add(self, epoch: int, batch: list[dict[str, Any]]) -> None:
        rows, digest = self.epochs.setdefault(epoch, [0, 0])
        ids = [r["id"] for r in batch]
        self.epochs[epoch] = [rows + len(ids), (digest + ids_digest(ids)) % 2**64]

    def dump(self) -> bytes:
        epochs = {str(e): {"rows": n, "digest": f"{d:016x}"} for e, (n, d) in self.epochs.items()}
        return json.dumps({"epochs": epochs}).encode()

    @classmethod
    def read(cls, directory: str, rank: int) -> _Seen:
        """This rank's record in a checkpoint directory; empty when the checkpoint has none
        (the online loop's, or another world size's extra rank)."""
        path = os.path.join(directory, DATA_FILE.format(rank=rank))
        if not os.path.exists(path):
            return cls()
        with open(path) as f:
            epochs = json.load(f)["epochs"]
        return cls({int(e): [v["rows"], int(v["digest"], 16)] for e, v in epochs.items()})


def data_report(checkpoint_dir: str) -> dict[int, dict[str, Any]]:
    """{epoch: {"rows", "digest"}} of a checkpoint (local or s3://), all ranks together:
    the rows trained on up to its step, per epoch, since the run started from scratch."""
    merged: dict[int, list[int]] = {}
    for uri in storage.list_files(checkpoint_dir):
        name = uri.rpartition("/")[2]
        if not (name.startswith("data_rank") and name.endswith(".json")):
            continue
        for epoch, v in json.loads(storage.read_bytes(uri))["epochs"].items():
            rows, digest = merged.setdefault(int(epoch), [0, 0])
            merged[int(epoch)] = [rows + v["rows"], (digest + int(v["digest"], 16)) % 2**64]
    return {e: {"rows": n, "digest": f"{d:016x}"} for e, (n, d) in sorted(merged.items())}


# ------------------------------------------------------------------ the worker loop


def _shard_rows(shard: Any) -> Iterator[dict[str, Any]]:
    for table in shard.iter_batches(batch_size=64, batch_format="pyarrow"):
        yield from table.to_pylist()


class Phases:
    """Seconds a worker spends per phase (build, data_wait, first_batch, steps, checkpoint,
    merge), logged once at the end as `learner phases: {json}` (bench_trl_overhead.py)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, phase: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def timed(self, items: Iterator[Any], phase: str, first: str) -> Iterator[Any]:
        """`items`, the wait for each counted in `phase` (the first one's in `first`)."""
        name = first
        while True:
            t = time.perf_counter()
            item = next(items, _END)
            self.add(name, time.perf_counter() - t)
            if item is _END:
                return
            name = phase
            yield item


_END = object()


def _checkpoint(
    learner: PreferenceLearner,
    state: LoopState,
    seen: _Seen,
    rank: int,
    metrics: dict[str, float],
) -> None:
    """Every worker writes its part (with its data record) and reports (a barrier); Ray
    merges the parts into <checkpoints>/step_XXXXXX and keeps rank 0's metrics with it."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint.save(directory, learner, dataclasses.asdict(state), rank)
        with open(os.path.join(directory, DATA_FILE.format(rank=rank)), "wb") as f:
            f.write(seen.dump())
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=checkpoint.step_name(state.step),
        )


def _build(cfg: TrainLoopConfig, rank: int) -> SyncedPreferenceLearner:
    """This worker's learner on its device; LoRA dropout draws from a per-rank seed."""
    import ray.train.torch

    from mmalign.models.loading import load_model

    torch.manual_seed(worker_seed(cfg.learner.seed, rank))
    device = ray.train.torch.get_device()
    model_dir = storage.localize(cfg.model, cfg.cache_dir)
    model, processor = load_model(model_dir, dtype=cfg.dtype, device=str(device))
    return SyncedPreferenceLearner(model, processor, learner_settings(cfg))


def resume_state(
    directory: str, learner: PreferenceLearner, rank: int, world: int, seed: int
) -> LoopState:
    """Load a checkpoint (ours or the online loop's) into `learner`; its data position.
    The step is the learner's optimizer step (an online checkpoint counts loop steps)."""
    state = LoopState.from_saved(checkpoint.load(directory, learner, rank, seed))
    state.step = learner.global_step
    if state.world_size != world:
        log.warning(
            "resuming with %d workers (saved with %d): data order differs", world, state.world_size
        )
        state.world_size = world
    return state


def _restore(
    cfg: TrainLoopConfig, learner: PreferenceLearner, rank: int, world: int
) -> tuple[LoopState, _Seen]:
    """Resume from Ray Train's checkpoint of this run (the latest one, also after a worker
    died), else `cfg.resume_from`, else start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and cfg.resume_from:
        ckpt = ray.train.Checkpoint(cfg.resume_from)
    if ckpt is None:
        return LoopState(world_size=world), _Seen()
    with ckpt.as_directory() as directory:
        state = resume_state(directory, learner, rank, world, cfg.learner.seed)
        return state, _Seen.read(directory, rank)


class _Worker:
    """One worker's loop: micro-steps until `target` optimizer steps, metrics to rank 0's
    TensorBoard, a checkpoint report every `checkpoint_every` steps and at the target."""

    def __init__(
        self,
        cfg: TrainLoopConfig,
        learner: SyncedPreferenceLearner,
        state: LoopState,
        seen: _Seen,
        rank: int,
    ) -> None:
        self.cfg, self.learner, self.state, self.seen, self.rank = cfg, learner, state, seen, rank
        self.target = min(cfg.stop_at_step or cfg.learner.steps, cfg.learner.steps)
        self.local_bs = local_batch_size(cfg.learner.batch_size, state.world_size)
        self.start_step = state.step
        self.scalars = None
        if rank == 0 and cfg.output_dir:
            self.scalars = _Scalars(
                cfg.output_dir, purge_step=state.step + 1 if state.step else None
            )
        self.micro: list[dict[str, float]] = []  # micro-steps of the pending optimizer step
        self.interval: list[dict[str, float]] = []  # optimizer steps since the last report
        self.t_last, self.pairs_last = time.perf_counter(), state.pairs_seen
        self.phases = Phases()

    def train_epoch(self, shard: Any) -> None:
        """One pass over the shard, skipping the micro-batches trained on before a resume."""
        s, n = self.state, 0
        seed = epoch_seed(self.cfg.learner.seed, s.epoch, self.rank)
        rows = window_shuffle(_shard_rows(shard), self.cfg.shuffle_window, seed)
        first = "data_wait" if self.phases.seconds.get("first_batch") else "first_batch"
        batches = self.phases.timed(micro_batches(rows, self.local_bs), "data_wait", first)
        for n, batch in enumerate(batches, 1):
            if n > s.batches_in_epoch:
                self._micro_step(batch, n)
            if s.step >= self.target:
                break
        if n == 0:
            raise RuntimeError(
                f"worker {self.rank}: its data shard holds fewer than one micro-batch "
                f"({self.local_bs} rows); use more rows or a smaller learner.batch_size"
            )
        if s.step < self.target:
            s.epoch, s.batches_in_epoch = s.epoch + 1, 0

    def _micro_step(self, batch: list[dict[str, Any]], n: int) -> None:
        s = self.state
        with self.phases.time("steps"):
            self.micro.append(self.learner.step(batch))
        self.seen.add(s.epoch, batch)
        s.batches_in_epoch = n
        s.pairs_seen += self.local_bs * s.world_size
        if not self.micro[-1]["stepped"]:
            return
        s.step = self.learner.global_step
        metrics = mean_metrics(self.micro)
        self.micro = []
        self.interval.append(metrics)
        if self.scalars is not None:
            self.scalars.log(metrics, s.step)
        if s.step % self.cfg.checkpoint_every == 0 or s.step >= self.target:
            self._report(metrics)

    def _report(self, last: dict[str, float]) -> None:
        """Checkpoint with the interval's mean metrics and its pair rate (all workers)."""
        s = self.state
        rate = (s.pairs_seen - self.pairs_last) / max(time.perf_counter() - self.t_last, 1e-9)
        report = {k: sum(m[k] for m in self.interval) / len(self.interval) for k in MEAN_KEYS}
        report.update(
            step=s.step,
            start_step=self.start_step,
            epoch=s.epoch,
            pairs_seen=s.pairs_seen,
            lr=last["lr"],
            grad_norm=last["grad_norm"],
            pairs_per_second=rate,
        )
        if self.scalars is not None:
            self.scalars.sync()
        with self.phases.time("checkpoint"):
            _checkpoint(self.learner, s, self.seen, self.rank, report)
        self.interval, self.t_last, self.pairs_last = [], time.perf_counter(), s.pairs_seen

    def close(self) -> None:
        if self.scalars is not None:
            self.scalars.sync()
            self.scalars.writer.close()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker`; config = {"loop": TrainLoopConfig}."""
    import ray.train

    cfg: TrainLoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = time.perf_counter()
    learner = _build(cfg, rank)
    state, seen = _restore(cfg, learner, rank, world)
    learner.broadcast_trainable()
    worker = _Worker(cfg, learner, state, seen, rank)
    worker.phases.add("build", time.perf_counter() - t)
    shard = ray.train.get_dataset_shard("train")
    while state.step < worker.target:
        worker.train_epoch(shard)
    worker.close()
    if rank == 0 and cfg.export_dir and worker.target >= cfg.learner.steps:
        with worker.phases.time("merge"):
            checkpoint.export_merged(learner, cfg.export_dir, in_place=True)  # training is over
    print(f"learner phases: {json.dumps(worker.phases.seconds)}", flush=True)


# ------------------------------------------------------------------ driver side


def worker_resources(lc: LearnerConfig) -> dict[str, float]:
    """Ray Train `resources_per_worker` of each of the `learner.num_workers` workers: CPUs,
    one GPU with `use_gpu`, and the node-type label of `learner.resources`."""
    resources: dict[str, float] = {"CPU": lc.num_cpus}
    if lc.use_gpu:
        resources["GPU"] = 1
    resources.update(parse_resources(lc.resources, "learner.resources"))
    return resources


def make_trainer(
    loop: TrainLoopConfig,
    dataset: Any,
    *,
    checkpoints: str,
    num_to_keep: int | None = 3,
) -> Any:
    """A TorchTrainer whose checkpoints land in `checkpoints` (local dir or s3:// prefix) as
    step_XXXXXX/ directories. Running it again with the same `checkpoints` resumes from
    the latest one (Ray Train's run snapshot lives there too); within one run a dead worker
    restarts the group from there, up to `learner.max_failures` times."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    lc = loop.learner
    local_batch_size(lc.batch_size, lc.num_workers)  # fail on the driver, not in workers
    fs, path = storage.filesystem(checkpoints)
    parent, _, name = path.rstrip("/").rpartition("/")
    if not parent or not name:
        raise ValueError(f"{checkpoints}: checkpoints need a directory below a parent")
    return TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(
            num_workers=lc.num_workers,
            use_gpu=lc.use_gpu,
            resources_per_worker=worker_resources(lc),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=fs if storage.is_s3(checkpoints) else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=lc.max_failures),
        ),
        datasets={"train": dataset},
        # preserve_order makes Ray Data's split deterministic (see the module docstring).
        dataset_config=ray.train.DataConfig(
            execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
