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

Checkpoints (every `checkpoint_every` optimizer steps and at the end) are directories
`step_XXXXXX/` with the peft adapter (adapter_config.json + adapter_model.safetensors),
`trainer_state.pt` (learner.state_dict()), `loop_state.json` (epoch/position) and one
`rng_rank{r}.pt` per worker. Resume: Ray Train's `get_checkpoint()` (same storage path and
run name), else `TrainLoopConfig.resume_from`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign import storage
from mmalign.config import LearnerConfig, parse_resources
from mmalign.engines.distributed_learner import (
    MEAN_KEYS,
    LoopState,
    SyncedPreferenceLearner,
    epoch_seed,
    latest_checkpoint,
    load_checkpoint_dir,
    local_batch_size,
    mean_metrics,
    micro_batches,
    save_checkpoint_dir,
    window_shuffle,
    worker_seed,
)
from mmalign.engines.learner import PreferenceLearner

__all__ = [
    "TrainLoopConfig",
    "latest_checkpoint",
    "learner_settings",
    "make_trainer",
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


# ------------------------------------------------------------------ the worker loop


def _shard_rows(shard: Any) -> Iterator[dict[str, Any]]:
    for table in shard.iter_batches(batch_size=64, batch_format="pyarrow"):
        yield from table.to_pylist()


def export_merged(learner: PreferenceLearner, uri: str) -> None:
    """Merge LoRA into the base weights in place (training is over) and save model +
    processor in HF format to `uri` (local or s3://) for serving."""
    merged = learner.model.merge_and_unload()
    if not storage.is_s3(uri):
        merged.save_pretrained(uri)
        learner.processor.save_pretrained(uri)
        return
    with tempfile.TemporaryDirectory() as local:
        merged.save_pretrained(local)
        learner.processor.save_pretrained(local)
        storage.upload_dir(local, uri)


def _checkpoint(
    learner: PreferenceLearner, state: LoopState, rank: int, metrics: dict[str, float]
) -> None:
    """Every worker writes its part and reports (a barrier); Ray merges the parts into
    <checkpoints>/step_XXXXXX and keeps rank 0's metrics with it."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint_dir(directory, learner, state, rank)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"step_{state.step:06d}",
        )


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker`; config = {"loop": TrainLoopConfig}."""
    import ray.train
    import ray.train.torch

    from mmalign.models.loading import load_model

    cfg: TrainLoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed = cfg.learner.seed
    torch.manual_seed(worker_seed(seed, rank))
    device = ray.train.torch.get_device()
    model_dir = storage.localize(cfg.model, cfg.cache_dir)
    model, processor = load_model(model_dir, dtype=cfg.dtype, device=str(device))
    learner = SyncedPreferenceLearner(model, processor, learner_settings(cfg))

    state = LoopState(world_size=world)
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and cfg.resume_from:
        ckpt = ray.train.Checkpoint(cfg.resume_from)
    if ckpt is not None:
        with ckpt.as_directory() as directory:
            state = load_checkpoint_dir(directory, learner, rank, seed)
        if state.world_size != world:
            log.warning(
                "resuming with %d workers (saved with %d): data order differs",
                world,
                state.world_size,
            )
            state.world_size = world
    learner.broadcast_trainable()
    start_step = state.step

    target = min(cfg.stop_at_step or cfg.learner.steps, cfg.learner.steps)
    local_bs = local_batch_size(cfg.learner.batch_size, world)
    scalars = None
    if rank == 0 and cfg.output_dir:
        scalars = _Scalars(cfg.output_dir, purge_step=state.step + 1 if state.step else None)
    shard = ray.train.get_dataset_shard("train")
    micro: list[dict[str, float]] = []
    interval: list[dict[str, float]] = []
    t_last, pairs_last = time.perf_counter(), state.pairs_seen
    while state.step < target:
        n = 0
        rows = window_shuffle(
            _shard_rows(shard), cfg.shuffle_window, epoch_seed(seed, state.epoch, rank)
        )
        for batch in micro_batches(rows, local_bs):
            n += 1
            if n <= state.batches_in_epoch:  # trained on before the resume
                continue
            micro.append(learner.step(batch))
            state.batches_in_epoch = n
            state.pairs_seen += local_bs * world
            if not micro[-1]["stepped"]:
                continue
            state.step = learner.global_step
            metrics = mean_metrics(micro)
            micro = []
            interval.append(metrics)
            if scalars is not None:
                scalars.log(metrics, state.step)
            if state.step % cfg.checkpoint_every == 0 or state.step >= target:
                rate = (state.pairs_seen - pairs_last) / max(time.perf_counter() - t_last, 1e-9)
                report = {k: sum(m[k] for m in interval) / len(interval) for k in MEAN_KEYS}
                report.update(
                    step=state.step,
                    start_step=start_step,
                    epoch=state.epoch,
                    pairs_seen=state.pairs_seen,
                    lr=metrics["lr"],
                    grad_norm=metrics["grad_norm"],
                    pairs_per_second=rate,
                )
                if scalars is not None:
                    scalars.sync()
                _checkpoint(learner, state, rank, report)
                interval, t_last, pairs_last = [], time.perf_counter(), state.pairs_seen
            if state.step >= target:
                break
        if n == 0:
            raise RuntimeError(
                f"worker {rank}: its data shard holds fewer than one micro-batch "
                f"({local_bs} rows); use more rows or a smaller learner.batch_size"
            )
        if state.step < target:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    if scalars is not None:
        scalars.sync()
        scalars.writer.close()
    if rank == 0 and cfg.export_dir and target >= cfg.learner.steps:
        export_merged(learner, cfg.export_dir)


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
    max_failures: int = 0,
    num_to_keep: int | None = 3,
) -> Any:
    """A TorchTrainer whose checkpoints land in `checkpoints` (local dir or s3:// prefix) as
    step_XXXXXX/ directories. Running it again with the same `checkpoints` resumes from
    the latest one (Ray Train's run snapshot lives there too)."""
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
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": dataset},
        # preserve_order makes Ray Data's split deterministic (see the module docstring).
        dataset_config=ray.train.DataConfig(
            execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
