"""The online loop's sampler actors as one object: submit a step's shards, collect the
results, replace a dead sampler, sync weights.

Fault handling: a sampler that dies (`RayActorError`) is replaced by a fresh, unnamed one
holding the current weight version, and its shard is asked again with the same call
arguments (at most 3 attempts per shard). The pool keeps no rows: a step's shards (the
rows or row refs the caller gave it) travel in the `Pending` list it hands back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from actors.online import SamplerActor
from mmalign.config import BDHSConfig, LearnerConfig, SamplerConfig

ATTEMPTS = 3  # tries per shard: the first call and two replacements


@dataclass
class Pending:
    """One shard in flight: its sampler slot, rows, call arguments (fixed, so a retry
    repeats the same call) and the result ref."""

    slot: int
    rows: list[dict[str, Any]]
    args: tuple
    ref: Any


def busy_seconds(actors: Sequence[Any]) -> list[float]:
    """Busy seconds of each actor (its `busy()` stats); 0 for one that died since."""
    refs = [a.busy.remote() for a in actors]
    out = []
    for ref in refs:
        try:
            out.append(float(ray.get(ref)["busy_s"]))
        except ray.exceptions.RayActorError:  # a sampler that died after its last call
            out.append(0.0)
    return out


class SamplerPool:
    """`sampler.concurrency` SamplerActors (named `<run>-sampler-<j>`) that call `method`
    (`sample_refs` or `bdhs`); replacements get their LoRA from `learner.adapter_state`."""

    def __init__(
        self,
        sampler: SamplerConfig,
        learner_cfg: LearnerConfig,
        bdhs: BDHSConfig | None,
        run_name: str,
        options: dict[str, Any],
        learner: Any,
        method: str,
    ) -> None:
        self._args = (sampler, learner_cfg, bdhs, run_name)
        self._options, self._learner, self.method = options, learner, method
        self.version = 0  # weight version every live sampler holds
        self.actors = [
            SamplerActor.options(name=f"{run_name}-sampler-{j}", **options).remote(*self._args)
            for j in range(sampler.concurrency)
        ]

    def submit(
        self, rows: Sequence[dict[str, Any]], args_of: Callable[[list[dict[str, Any]]], tuple]
    ) -> list[Pending]:
        """Shard `rows` round-robin over the samplers and start each non-empty shard's call
        with arguments `args_of(shard)`."""
        n = len(self.actors)
        shards = [list(rows[j::n]) for j in range(n)]
        todo = [(j, shard, args_of(shard)) for j, shard in enumerate(shards) if shard]
        return [Pending(j, shard, args, self._call(j, args)) for j, shard, args in todo]

    def collect(self, pending: Sequence[Pending]) -> list[tuple[list[dict[str, Any]], int, list]]:
        """(rows, weight version, outputs) per shard; a sampler that died is replaced and the
        shard asked again. The replacement holds the current weights, so its outputs carry
        the current version; a shard's pairs come only from the one answer that arrives."""
        results = []
        for p in pending:
            ref = p.ref
            for attempt in range(ATTEMPTS):
                try:
                    version, outputs = ray.get(ref)
                    break
                except ray.exceptions.RayActorError:
                    if attempt == ATTEMPTS - 1:
                        raise
                    self.replace(p.slot)
                    ref = self._call(p.slot, p.args)
            results.append((p.rows, version, outputs))
        return results

    def replace(self, j: int) -> None:
        """A fresh sampler in slot j holding the current weight version."""
        print(f"sampler {j} died; replacing it (weights v{self.version})", flush=True)
        self.actors[j] = SamplerActor.options(**self._options).remote(*self._args)  # unnamed
        if self.version > 0:
            state = self._learner.adapter_state.remote()
            ray.get(self.actors[j].load_adapter.remote(state, self.version))

    def sync(self, state: Any, version: int) -> dict[str, float]:
        """Send the adapter (a ref) to every sampler as `version`; a dead sampler is replaced
        (with that version). Returns sync_bytes (of one copy) and sync_seconds (slowest)."""
        self.version = version
        stats = []
        for j in range(len(self.actors)):
            try:
                stats.append(ray.get(self.actors[j].load_adapter.remote(state, version)))
            except ray.exceptions.RayActorError:
                self.replace(j)
        stats = stats or [{"bytes": 0.0, "seconds": 0.0}]
        return {"sync_bytes": stats[0]["bytes"], "sync_seconds": max(x["seconds"] for x in stats)}

    def busy(self) -> list[float]:
        """Busy seconds of each sampler slot (0 for one that died since its last call)."""
        return busy_seconds(self.actors)

    def _call(self, j: int, args: tuple) -> Any:
        return getattr(self.actors[j], self.method).remote(*args)
