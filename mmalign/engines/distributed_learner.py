"""Ray-free pieces of data-parallel preference training, used by `actors.learner_train`.

- `SyncedPreferenceLearner`: the learner whose optimizer step first averages the trainable
  gradients over the torch.distributed group (gloo on CPU, NCCL on GPU).
- Data order: `window_shuffle` + `micro_batches` with seeds from `epoch_seed`, so a run
  and its resumption see the same rows in the same order.
- Checkpoint directories: `save_checkpoint_dir` / `load_checkpoint_dir` (peft adapter,
  trainer_state.pt, loop_state.json, one rng_rank{r}.pt per worker), `latest_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from mmalign import seeds, storage
from mmalign.engines.learner import PreferenceLearner

T = TypeVar("T")

STATE_FILE = "trainer_state.pt"
LOOP_FILE = "loop_state.json"
# Batch means of these are averaged over micro-steps and workers, then logged/reported.
MEAN_KEYS = (
    "loss",
    "reward_margin",
    "reward_accuracy",
    "chosen_rewards",
    "rejected_rewards",
    "chosen_logps",
    "rejected_logps",
)


@dataclass
class LoopState:
    """Data position, saved with every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # passes over the shard started
    batches_in_epoch: int = 0  # micro-batches of this epoch already trained on (per worker)
    pairs_seen: int = 0  # rows trained on, all workers together
    world_size: int = 1


# ------------------------------------------------------------------ pure helpers


def window_shuffle(rows: Iterable[T], window: int, seed: int) -> Iterator[T]:
    """Yield `rows` shuffled within consecutive windows of `window` rows (the last may be
    shorter). Deterministic for a given seed; window <= 1 keeps the order."""
    if window <= 1:
        yield from rows
        return
    rng = random.Random(seed)  # stdlib: the same permutation on every platform/version
    buf: list[T] = []
    for row in rows:
        buf.append(row)
        if len(buf) == window:
            rng.shuffle(buf)
            yield from buf
            buf = []
    rng.shuffle(buf)
    yield from buf


def micro_batches(rows: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of exactly `size` rows; a short tail is dropped so every worker
    runs the same number of steps (collectives must match)."""
    batch: list[T] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Shuffle seed of one worker's epoch."""
    return seeds.epoch_seed(seed, epoch, rank)


def worker_seed(seed: int, rank: int) -> int:
    """Seed of a worker's torch RNG (LoRA dropout); LoRA init uses `seed` on every rank."""
    return seed * 7919 + rank + 1


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Rows per worker per micro-step; the global batch must split evenly."""
    if global_batch % world_size:
        raise ValueError(
            f"learner.batch_size ({global_batch}) must be a multiple of "
            f"learner.num_workers ({world_size})"
        )
    return global_batch // world_size


# ------------------------------------------------------------------ collectives


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def allreduce_mean_(tensors: Sequence[torch.Tensor], bucket_numel: int = 1 << 26) -> None:
    """Average tensors in place across the process group, in flat buckets of at most
    `bucket_numel` elements per dtype/device (one collective per bucket, not per tensor).
    SUM then divide: ReduceOp.AVG is NCCL-only and this must work with gloo on CPU."""
    import torch.distributed as dist

    world = dist.get_world_size()
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        start = 0
        while start < len(group):
            bucket: list[torch.Tensor] = []
            numel = 0
            while start < len(group) and (
                not bucket or numel + group[start].numel() <= bucket_numel
            ):
                bucket.append(group[start])
                numel += group[start].numel()
                start += 1
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


class SyncedPreferenceLearner(PreferenceLearner):
    """PreferenceLearner whose optimizer step first averages the trainable gradients over
    all workers; a no-op with one worker. Each worker's loss is the mean over its equal
    share of the global batch, so the average is the global-batch gradient."""

    def _optimizer_step(self) -> float:
        if _distributed():
            params = [p for _, p in self._trainable()]
            for p in params:
                if p.grad is None:  # every rank must join every bucket
                    p.grad = torch.zeros_like(p)
            allreduce_mean_([p.grad for p in params if p.grad is not None])
        return super()._optimizer_step()

    def broadcast_trainable(self) -> None:
        """Make every worker start from rank 0's trainable weights."""
        if _distributed():
            import torch.distributed as dist

            with torch.no_grad():
                for _, p in self._trainable():
                    dist.broadcast(p.data, src=0)


def mean_metrics(micro: Sequence[dict[str, float]]) -> dict[str, float]:
    """MEAN_KEYS averaged over micro-steps, then over workers; plus lr/grad_norm of the
    optimizer step (identical on all workers after the gradient sync)."""
    values = torch.tensor([[m[k] for k in MEAN_KEYS] for m in micro], dtype=torch.float64)
    means = values.mean(0)
    if _distributed():
        import torch.distributed as dist

        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            means = means.to(torch.device("cuda", torch.cuda.current_device()))
        allreduce_mean_([means])
    out = dict(zip(MEAN_KEYS, means.tolist()))
    out["lr"] = micro[-1]["lr"]
    out["grad_norm"] = micro[-1].get("grad_norm", float("nan"))
    return out


# ------------------------------------------------------------------ checkpoints


def _rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def save_checkpoint_dir(
    directory: str, learner: PreferenceLearner, state: LoopState, rank: int
) -> None:
    """Write this worker's part of a checkpoint (Ray Train merges the workers' dirs)."""
    if rank == 0:
        learner.save_adapter(directory)
        torch.save(learner.state_dict(), os.path.join(directory, STATE_FILE))
        with open(os.path.join(directory, LOOP_FILE), "w") as f:
            json.dump(dataclasses.asdict(state), f)
    torch.save(_rng_state(), os.path.join(directory, f"rng_rank{rank}.pt"))


def load_checkpoint_dir(
    directory: str, learner: PreferenceLearner, rank: int, seed: int
) -> LoopState:
    """Restore learner weights/optimizer/schedule, the data position and this rank's RNG."""
    path = os.path.join(directory, STATE_FILE)
    learner.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    with open(os.path.join(directory, LOOP_FILE)) as f:
        state = LoopState(**json.load(f))
    rng_path = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:  # more workers than when saved: a fresh, still deterministic stream
        torch.manual_seed(worker_seed(seed, rank) + state.step)
    return state


def latest_checkpoint(root: str) -> str:
    """The step_XXXXXX directory under `root` (local or s3://) with the highest step that
    holds a complete checkpoint (trainer_state.pt), or ""."""
    best, best_step = "", -1
    for path in storage.list_files(root):
        parent, _, name = path.rstrip("/").rpartition("/")
        step_dir = parent.rpartition("/")[2]
        ok = name == STATE_FILE and step_dir.startswith("step_") and step_dir[5:].isdigit()
        if ok and int(step_dir[5:]) > best_step:
            best, best_step = parent, int(step_dir[5:])
    return best
