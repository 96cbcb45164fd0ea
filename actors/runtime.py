"""Connecting to (or starting) Ray, the same way from every pipeline.

- Under `ray job submit`, RAY_ADDRESS is set and we join that cluster.
- With `--pipeline.ray_address`, we join that address.
- Otherwise a local cluster starts with more logical CPUs than cores: Ray Data's read and
  map stages need CPU slots of their own, and on a 2-core box an actor pool that takes
  every logical CPU starves the reader forever.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("mmalign")


def init_ray(address: str = "", local_cpus: int | None = None) -> None:
    """Idempotent ray.init; a local head listens on 127.0.0.1 only."""
    import ray

    if ray.is_initialized():
        return
    # Must be set before Ray starts: keeps every local listener on loopback.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    target = address or os.environ.get("RAY_ADDRESS", "")
    if target:
        ray.init(address=target, log_to_driver=True)
        log.info("joined Ray cluster at %s", target)
        return
    cpus = local_cpus or max(8, 4 * (os.cpu_count() or 1))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    log.info("started a local Ray cluster with %d logical CPUs", cpus)


def quiet_data_context() -> None:
    """Ray Data settings shared by our pipelines (progress bars on, verbose stats off)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.verbose_stats_logs = False


def sampler_pool_kwargs(
    sampler: Any, batch_size: int, resources: str, field: str
) -> dict[str, Any]:
    """`map_batches` options of a pool of `sampler.concurrency` actors with the sampler's
    CPUs/GPUs, placed by the node-type label `resources` (config field `field`, named in
    errors). Shared by the BDHS and the evaluation pools."""
    import ray.data

    from mmalign.config import parse_resources

    return {
        "batch_size": batch_size,
        "compute": ray.data.ActorPoolStrategy(size=sampler.concurrency),
        "num_cpus": sampler.num_cpus,
        "num_gpus": sampler.num_gpus,
        "resources": parse_resources(resources, field),
    }
