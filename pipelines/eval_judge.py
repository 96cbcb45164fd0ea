"""Measure a pairwise judge on held-out pairs with known answers (issue 6, [ALIGN] Table 10).

    python -m pipelines.eval_judge --model assets/models/shapes-llava-judge --n-pairs 200 \\
        --out assets/models/shapes-llava-judge/judge_eval.json
    python -m pipelines.eval_judge --pairs s3://bucket/heldout/pairs.parquet --n-pairs 0 \\
        --model llava-hf/llava-v1.6-34b-hf --prompt-style full --max-new-tokens 256
    python -m pipelines.eval_judge --coco-annotations coco/annotations/instances_val2014.json \\
        --coco-synonyms chair/synonyms.txt --image-root coco/val2014 --model <judge checkpoint>

Pairs: by default `mmalign.shapes.judging` examples on the unbiased `eval` split (images
the judge never trained on; record indices offset..offset+n-1), each with a known better
answer; with `--coco-annotations`, pairs built from a COCO caption set
(`mmalign.eval_sets.coco_judge_pairs`: the better answer names the image's categories, the
worse one swaps one for an absent class or omits one); with `--pairs`, a held-out
preference Parquet (ours, `mmalign.schema`, or TRL-format; local or s3://), where the
better answer is the row's `chosen`. Either way the better answer sits in slot A
(response_a) on even pairs and in slot B on odd ones. The VLM judge runs the real protocol
through `JudgeEngine` (both orders, parse, keep only agreeing pairs); the object judge
(exact, from the annotations) judges the pairs that have annotations as a reference:
ShapesWorld's, COCO's, and Parquet rows whose image file name is in `--coco-annotations`.
Its vocabulary comes from the data: the COCO categories with `--coco-synonyms` (else
`--vocabulary` when that is a synonyms file), or `--vocabulary` (judge.vocabulary's
format; default ShapesWorld's classes) for the other pairs. The report: accuracy
over kept pairs, keep rate, order agreement, order-A-alone accuracy next to the
position-only baseline, ties / disagreements / parse failures, per-kind (ShapesWorld) or
per-source (Parquet) accuracy, rows skipped as malformed, latency and throughput.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmalign import storage
from mmalign.config import JudgeConfig
from mmalign.engines.judge_engine import JudgeEngine
from mmalign.eval_sets import CocoSet, coco_judge_pairs, coco_vocabulary, read_coco_instances
from mmalign.io import load_image_bytes, read_parquet
from mmalign.judge import JudgeStats, judge_accuracy
from mmalign.metrics.vocab import SHAPESWORLD, ObjectVocabulary, load_vocabulary
from mmalign.preference_rows import to_learner_row
from mmalign.schema import RowError
from mmalign.shapes.judging import judge_row, judging_examples
from mmalign.shapes.world import WorldConfig


def held_out_rows(n: int, offset: int = 0, world_seed: int = 0) -> list[dict[str, Any]]:
    """n judge rows (with `label`, `kind`) from the `eval` split. The better answer is
    response_a on even pairs and response_b on odd ones, whatever slot the example drew,
    so the slots are balanced and a position-only guesser scores 0.5 (not the 0.63 that
    flipping the drawn slot on odd pairs gave on pairs 0..59)."""
    examples = judging_examples(WorldConfig(seed=world_seed), "eval", range(offset, offset + n))
    return [
        judge_row(ex, flip=(ex["better"] == "1") == (i % 2 == 1)) for i, ex in enumerate(examples)
    ]


def parquet_rows(
    uri: str, n: int = 0, offset: int = 0, objects: Mapping[str, Sequence[str]] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """(judge rows with `label` and `kind`, skip messages) from a preference Parquet.

    Rows offset..offset+n-1 (n=0: all the rest). Each row's `chosen` is the better answer
    and goes to slot A on even pairs, slot B on odd ones (so a position-biased judge scores
    0.5); `kind` is the row's `source` (or `method`), so the report splits accuracy by
    dataset as Table 10 does. A row the learner could not train on either (no image, empty
    answer: `mmalign.preference_rows.to_learner_row`) is skipped, its message returned.
    `objects` (image file name -> annotated classes, e.g. a COCO set's) adds `objects` to
    the rows whose first image's path ends in one of those names.
    """
    raw = read_parquet(uri).to_pylist()[offset:]
    if n:
        raw = raw[:n]
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for item in raw:
        try:
            pair = to_learner_row(item, load_image=load_image_bytes)
        except RowError as err:
            skipped.append(f"{item.get('id')}: {err}")
            continue
        flip = len(rows) % 2 == 1
        a, b = (pair["rejected"], pair["chosen"]) if flip else (pair["chosen"], pair["rejected"])
        row = {
            "image": {"bytes": pair["image"], "path": None},
            "question": pair["prompt"],
            "response_a": a,
            "response_b": b,
            "label": "b" if flip else "a",
            "kind": item.get("source") or item.get("method") or "parquet",
        }
        images = item.get("images") or [{}]
        name = str((images[0] or {}).get("path") or "").rsplit("/", 1)[-1]
        if objects is not None and objects.get(name):
            row["objects"] = list(objects[name])
        rows.append(row)
    return rows, skipped


def read_text(uri: str) -> str:
    return storage.read_bytes(uri).decode("utf-8")


def coco_set(args: argparse.Namespace) -> CocoSet | None:
    return (
        read_coco_instances(read_text(args.coco_annotations), args.coco_annotations)
        if args.coco_annotations
        else None
    )


def object_vocabulary(args: argparse.Namespace, coco: CocoSet | None) -> ObjectVocabulary:
    """The object judge's vocabulary: from the COCO set when there is one (its categories,
    with --coco-synonyms or else a --vocabulary synonyms file), else --vocabulary."""
    if coco is None:
        return load_vocabulary(args.vocabulary)
    synonyms = args.coco_synonyms or ("" if args.vocabulary == SHAPESWORLD else args.vocabulary)
    return coco_vocabulary(coco.classes, read_text(synonyms) if synonyms else "", synonyms)


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
    p.add_argument(
        "--pairs",
        default="",
        help="held-out preference Parquet (ours or TRL; local or s3://); the judge should\n"
        "pick each row's chosen. Default: ShapesWorld eval-split pairs",
    )
    p.add_argument(
        "--coco-annotations",
        default="",
        help="COCO instances JSON (local or s3://): pairs from its images and categories\n"
        "(with --pairs: annotations for the Parquet rows whose image file it names)",
    )
    p.add_argument("--coco-synonyms", default="", help="CHAIR synonyms file of its categories")
    p.add_argument(
        "--image-root",
        default="",
        help="where the COCO file_names are (default: the annotations' directory)",
    )
    p.add_argument(
        "--vocabulary",
        default=SHAPESWORLD,
        help="object judge vocabulary without a COCO set, as judge.vocabulary: 'shapesworld'\n"
        "or a synonyms file",
    )
    p.add_argument("--n-pairs", type=int, default=200, help="pairs to judge (0: all, with a file)")
    p.add_argument("--offset", type=int, default=0, help="first record / Parquet row index")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per judge call")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--reward-model",
        default="",
        help="also score the pairs with this reward model (saved by "
        "mmalign.engines.reward_model; judge kind reward-model), reported beside the judges",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON report path")
    args = p.parse_args(argv)
    if args.n_pairs < 0 or (args.n_pairs == 0 and not (args.pairs or args.coco_annotations)):
        p.error("--n-pairs must be >= 1 (0 = all rows, with --pairs / --coco-annotations only)")
    torch.set_num_threads(args.threads)
    coco = coco_set(args)
    skipped = [q["reason"] for q in coco.quarantined] if coco else []
    if args.pairs:
        names = (
            {img.file_name.rsplit("/", 1)[-1]: sorted(img.objects) for img in coco.images}
            if coco
            else None
        )
        rows, bad = parquet_rows(args.pairs, args.n_pairs, args.offset, names)
        skipped += bad
    elif coco:
        ann = args.coco_annotations
        root = args.image_root or (ann.rsplit("/", 1)[0] if "/" in ann else ".")
        rows = coco_judge_pairs(coco, root, args.n_pairs, args.offset)
    else:
        rows = held_out_rows(args.n_pairs, args.offset, args.world_seed)
    if not rows:
        raise SystemExit(f"no pairs to judge ({len(skipped)} rows skipped: {skipped[:3]})")
    cfg = JudgeConfig(
        kind="vlm",
        model=args.model,
        prompt_style=args.prompt_style,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    vlm, verdicts = evaluate_judge(JudgeEngine.from_config(cfg), rows, args.batch_size)
    # The object judge needs annotations: ShapesWorld and COCO pairs have them, a Parquet's
    # rows only where --coco-annotations names their image.
    annotated = [r for r in rows if r.get("objects")]
    objects = None
    if annotated:
        engine = JudgeEngine("objects", vocab=object_vocabulary(args, coco))
        objects = evaluate_judge(engine, annotated, args.batch_size)[0]
    reward = None
    if args.reward_model:
        scorer = JudgeConfig(
            kind="reward-model", model=args.reward_model, batch_size=args.batch_size
        )
        reward = evaluate_judge(JudgeEngine.from_config(scorer), rows, args.batch_size)[0]
    report = {
        "model": args.model,
        "prompt_style": args.prompt_style,
        "data": args.pairs or args.coco_annotations or "shapesworld:eval",
        "split": "" if args.pairs or args.coco_annotations else "eval",
        "offset": args.offset,
        "world_seed": args.world_seed,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "skipped_rows": len(skipped),
        "skipped_examples": skipped[:5],
        "vlm": vlm,
        "objects": objects,
        "reward_model": reward,
        "examples": [
            {"kind": r["kind"], "label": r["label"], "raw_a": v["raw_a"], "raw_b": v["raw_b"]}
            for r, v in list(zip(rows, verdicts, strict=True))[:10]
        ],
    }
    summary = {k: v for k, v in vlm.items() if k != "by_kind"}
    print(
        json.dumps(
            {
                "vlm": summary,
                "objects_accuracy_kept": objects["accuracy_kept"] if objects else None,
                "reward_model_accuracy_kept": reward["accuracy_kept"] if reward else None,
                "skipped_rows": len(skipped),
            },
            indent=1,
        )
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
