"""One sink for loop metrics: Ray custom metrics (dashboard / Prometheus), TensorBoard and
the console. The driver calls `log(step, values)`; nothing else needs to know where they go.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

# Gauges exported through Ray's metrics agent (prefix "mmalign_" keeps them findable next to
# Ray's own series on the dashboard's Prometheus endpoint).
GAUGES: dict[str, str] = {
    "samples_per_s": "Policy samples generated per second (last step).",
    "pairs_per_s": "Preference pairs produced per second (last step).",
    "judge_agreement": "Fraction of judged pairs whose two presentation orders agreed.",
    "judge_tie_rate": "Fraction of judged pairs the judge called a tie.",
    "loss": "Learner loss (last step).",
    "reward_margin": "Mean implicit reward margin chosen - rejected (last step).",
    "version_lag": "Max weight-version lag of the samples used (last step).",
    "queue_depth": "Sampling requests in flight when the learner step started.",
    "weight_version": "Policy weight version held by the samplers.",
    "sampler_busy_fraction": "Sampler pool: seconds in work calls / (wall seconds * actors).",
    "judge_busy_fraction": "Judge: seconds in work calls / wall seconds of the loop.",
    "learner_busy_fraction": "Learner: seconds in work calls / wall seconds of the loop.",
}


class MetricsSink:
    def __init__(self, run_name: str, tb_dir: str | None) -> None:
        from ray.util.metrics import Counter, Gauge

        tags = ("run",)
        self._tags = {"run": run_name}
        self.gauges = {
            k: Gauge(f"mmalign_{k}", description=d, tag_keys=tags) for k, d in GAUGES.items()
        }
        self.pairs = Counter("mmalign_pairs_total", "Pairs trained on.", tag_keys=tags)
        self.samples = Counter("mmalign_samples_total", "Policy samples.", tag_keys=tags)
        self.tb: Any = None
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tb_dir, exist_ok=True)
            self.tb = SummaryWriter(tb_dir)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            if key in self.gauges:
                self.gauges[key].set(float(value), tags=self._tags)
            if self.tb is not None:
                self.tb.add_scalar(key, float(value), step)
        if values.get("pairs"):
            self.pairs.inc(float(values["pairs"]), tags=self._tags)
        if values.get("samples"):
            self.samples.inc(float(values["samples"]), tags=self._tags)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class BusyTimer:
    """Seconds an actor spends inside its work calls; busy fraction = busy_s / wall time.

    Lightweight (two perf_counter reads per call). Each call also feeds Ray metrics, so the
    dashboard shows it live: `mmalign_busy_seconds` (counter; its rate is the busy fraction)
    and `mmalign_busy_fraction` (gauge, busy / alive seconds), tagged run, role and actor.
    """

    def __init__(self, role: str, run_name: str, actor: str = "") -> None:
        from ray.util.metrics import Counter, Gauge

        keys = ("run", "role", "actor")
        self._tags = {"run": run_name or "mmalign", "role": role, "actor": actor or role}
        self.role = role
        self.busy_s = 0.0
        self.calls = 0
        self.born = time.perf_counter()
        self._seconds = Counter(
            "mmalign_busy_seconds", "Seconds spent in work calls, by role.", tag_keys=keys
        )
        self._fraction = Gauge(
            "mmalign_busy_fraction", "Seconds in work calls / seconds alive.", tag_keys=keys
        )

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.busy_s += dt
            self.calls += 1
            self._seconds.inc(dt, tags=self._tags)
            alive = time.perf_counter() - self.born
            self._fraction.set(self.busy_s / alive if alive > 0 else 0.0, tags=self._tags)

    def stats(self) -> dict[str, Any]:
        """{"role", "busy_s", "calls", "alive_s"} so far."""
        alive = time.perf_counter() - self.born
        return {"role": self.role, "busy_s": self.busy_s, "calls": self.calls, "alive_s": alive}


def busy_fractions(
    before: Mapping[str, list[float]], after: Mapping[str, list[float]], wall_s: float
) -> dict[str, float]:
    """Per role: busy seconds gained between two snapshots / (wall_s * actors of the role).

    `before`/`after` map role -> busy_s of each live actor (same order); an actor replaced
    mid-run starts at 0: its own work counts, its predecessor's after `before` does not
    (a lower bound).
    """
    out = {}
    for role, now in after.items():
        then = list(before.get(role, []))
        then = then if len(then) == len(now) else [0.0] * len(now)
        # busy_s only grows; a drop means a replacement actor, whose own total counts
        gained = sum(a - b if a >= b else a for a, b in zip(now, then, strict=True))
        out[role] = gained / (wall_s * len(now)) if wall_s > 0 and now else 0.0
    return out
