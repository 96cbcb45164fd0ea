"""Measure a pairwise judge on held-out ShapesWorld pairs with known answers (issue 6).

    python -m pipelines.eval_judge --model assets/models/shapes-llava-judge --n-pairs 200 \
        --out assets/models/shapes-llava-judge/judge_eval.json

Pairs: `mmalign.shapes.judging` examples on the unbiased `eval` split (images the judge
never trained on; record indices offset..offset+n-1), each with a known better answer.
The VLM judge runs the real protocol through `JudgeEngine` (both orders, parse, keep only
agreeing pairs); the object judge (exact, from the annotations) judges the same pairs as
a reference. The report: accuracy over kept pairs, keep rate, order agreement, ties /
disagreements / parse failures, per-kind accuracy, latency and throughput.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from mmalign.config import JudgeConfig
from mmalign.engines.judge_engine import JudgeEngine
from mmalign.judge import JudgeStats, judge_accuracy
from mmalign.shapes.judging import judge_row, judging_examples
from mmalign.shapes.world import WorldConfig


def held_out_rows(n: int, offset: int = 0, world_seed: int = 0) -> list[dict[str, Any]]:
    """n judge rows (with `label`, `kind`) from the `eval` split; response_a alternates
    between the better and the worse answer's presentation slot (flip on odd indices)."""
    examples = judging_examples(WorldConfig(seed=world_seed), "eval", range(offset, offset + n))
    return [judge_row(ex, flip=i % 2 == 1) for i, ex in enumerate(examples)]


def score(verdicts: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """judge_accuracy + reason counts + per-kind accuracy over kept pairs."""
    labels = [r["label"] for r in rows]
    out: dict[str, Any] = judge_accuracy(verdicts, labels)
    out.update(JudgeStats().update(verdicts).as_dict())
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # pairs, kept, correct
    for v, r in zip(verdicts, rows, strict=True):
        k = by_kind[r["kind"]]
        k[0] += 1
        k[1] += bool(v["kept"])
        k[2] += bool(v["kept"]) and v["winner"] == r["label"]
    out["by_kind"] = {
        kind: {"pairs": p, "keep_rate": kept / p, "accuracy_kept": c / kept if kept else 0.0}
        for kind, (p, kept, c) in sorted(by_kind.items())
    }
    return out


def evaluate_judge(
    engine: JudgeEngine, rows: list[dict[str, Any]], batch_size: int = 16
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(report, verdicts) of `engine` on `rows`, with wall-clock latency per batch."""
    verdicts: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        verdicts += engine.judge(rows[i : i + batch_size])
    wall = time.perf_counter() - start
    report = score(verdicts, rows)
    orders = 2 if engine.both_orders else 1
    report.update(
        wall_s=wall,
        pairs_per_s=len(rows) / wall if wall else 0.0,
        judge_calls_per_s=orders * len(rows) / wall if wall else 0.0,
        latency_per_batch_s=wall / max(1, -(-len(rows) // batch_size)),
        batch_size=batch_size,
    )
    return report, verdicts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="assets/models/shapes-llava-judge")
    p.add_argument("--prompt-style", choices=("full", "compact"), default="compact")
    p.add_argument("--n-pairs", type=int, default=200)
    p.add_argument("--offset", type=int, default=0, help="first eval-split record index")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per judge call")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON report path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = held_out_rows(args.n_pairs, args.offset, args.world_seed)
    cfg = JudgeConfig(
        kind="vlm",
        model=args.model,
        prompt_style=args.prompt_style,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    vlm, verdicts = evaluate_judge(JudgeEngine.from_config(cfg), rows, args.batch_size)
    objects, _ = evaluate_judge(JudgeEngine("objects"), rows, args.batch_size)
    report = {
        "model": args.model,
        "prompt_style": args.prompt_style,
        "split": "eval",
        "offset": args.offset,
        "world_seed": args.world_seed,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "vlm": vlm,
        "objects": objects,
        "examples": [
            {"kind": r["kind"], "label": r["label"], "raw_a": v["raw_a"], "raw_b": v["raw_b"]}
            for r, v in list(zip(rows, verdicts, strict=True))[:10]
        ],
    }
    summary = {k: v for k, v in vlm.items() if k != "by_kind"}
    print(json.dumps({"vlm": summary, "objects_accuracy_kept": objects["accuracy_kept"]}, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
