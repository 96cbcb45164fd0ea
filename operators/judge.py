"""Ray Data callable class that judges pair rows offline (a thin JudgeEngine wrapper).

    ds.map_batches(JudgePool, fn_constructor_kwargs={"judge": to_dict(cfg.judge)},
                   batch_size=cfg.judge.batch_size, concurrency=cfg.judge.concurrency,
                   num_cpus=cfg.judge.num_cpus, num_gpus=cfg.judge.num_gpus,
                   resources=parse_resources(cfg.judge.resources))  # node-type labels

Needs the columns of mmalign.engines.judge_engine.JUDGE_COLUMNS (`image` or `images`,
`question`, `response_a`, `response_b`, and `objects` for kind="objects"). One output row
per input row: the input columns plus `mmalign.judge.VERDICT_KEYS` prefixed with
"judge_" (judge_winner, judge_kept, judge_reason, ...). Malformed rows are not dropped:
they come out with judge_reason "invalid" and a message in judge_error; filter on
judge_kept downstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmalign.config import JudgeConfig, from_dict
from mmalign.engines.judge_engine import JudgeEngine
from mmalign.judge import VERDICT_KEYS

PREFIX = "judge_"


def _plain(value: Any) -> Any:
    """numpy containers (Ray Data's numpy batch format) -> Python lists, recursively."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def batch_to_rows(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Column batch {name: array/list} -> list of row dicts."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: _plain(v[i]) for k, v in batch.items()} for i in range(n)]


class JudgePool:
    """Constructed once per Ray Data actor; `judge` is a JudgeConfig dict (to_dict)."""

    def __init__(self, judge: dict[str, Any]) -> None:
        cfg: JudgeConfig = from_dict(JudgeConfig, judge, "judge")
        cfg.validate("judge")
        self.engine = JudgeEngine.from_config(cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        verdicts = self.engine.judge(batch_to_rows(batch))
        if len(verdicts) != len(next(iter(batch.values()), [])):
            raise RuntimeError("judge returned a different number of rows than it was given")
        out = dict(batch)
        for key in VERDICT_KEYS:
            out[PREFIX + key] = [v[key] for v in verdicts]
        return out
