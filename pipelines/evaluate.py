"""Hallucination evaluation (POPE random/popular/adversarial, CHAIR_i/CHAIR_s/Recall) on Ray Data.

    python pipelines/evaluate.py                                   # shipped tiny policy
    python pipelines/evaluate.py --sampler.model runs/x/merged     # any checkpoint (or s3://)
    ray job submit --working-dir . -- python pipelines/evaluate.py --config <preset>

The eval set (`data.eval`) is `shapesworld:eval` or any prompt input whose rows carry
object annotations (`objects`); the model is `sampler.model`. Questions are answered by a
pool of `sampler.concurrency` generation actors (greedy decoding); the report is printed
and written to <output_dir>/eval/report.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # `python pipelines/x.py` from anywhere

from mmalign import io as mio  # noqa: E402
from mmalign import storage  # noqa: E402
from mmalign.config import Config, parse_args  # noqa: E402
from mmalign.evaluation import (  # noqa: E402
    build_requests,
    format_report,
    ground_truths,
    score_responses,
)
from mmalign.metrics.vocab import shapes_vocabulary  # noqa: E402


def eval_records(cfg: Config, max_rows: int = 0) -> list[dict[str, Any]]:
    """Eval records {id, image: bytes, objects: [{name}]} from `data.eval`."""
    uri = cfg.data.eval
    if uri.startswith("shapesworld:"):
        from mmalign.shapes.records import shapes_rows

        rows = shapes_rows(uri.split(":", 1)[1] or "eval", cfg.data.world_seed, max_rows)
        return [{"id": r["id"], "image": r["image"], "objects": r["objects"]} for r in rows]
    good, bad = mio.read_prompts(uri, cfg.data.image_root, max_rows)
    if bad:
        print(f"evaluate: skipped {len(bad)} unusable eval rows (first: {bad[0]})")
    return [
        {
            "id": r["id"],
            "image": mio.load_image_bytes(r["images"][0]),
            "objects": [{"name": o} for o in r["objects"]],
        }
        for r in good
    ]


def pool_kwargs(cfg: Config) -> dict[str, Any]:
    """map_batches options of the generation pool: `sampler.concurrency` actors with the
    sampler's CPUs/GPUs, placed by `sampler.resources` (a node-type label)."""
    from actors.runtime import sampler_pool_kwargs

    s = cfg.sampler
    return sampler_pool_kwargs(s, s.batch_size * 4, s.resources, "sampler.resources")


def run_evaluation(cfg: Config, model: str | None = None, max_rows: int = 0) -> dict[str, Any]:
    """Evaluate `model` (default: cfg.sampler.model) on Ray Data; returns the report dict."""
    import ray

    from actors.runtime import init_ray
    from operators.generate import GenerateOperator

    init_ray(cfg.pipeline.ray_address)
    model = model or cfg.sampler.model
    records = eval_records(cfg, max_rows or cfg.data.max_rows)
    vocab = shapes_vocabulary()
    truths = ground_truths(records)
    requests = build_requests(truths, vocab, seed=cfg.sampler.seed)
    images = {r["id"]: r["image"] for r in records}
    # identical (image, prompt) pairs are generated once (greedy decoding is deterministic)
    unique = list(dict.fromkeys((r.image_id, r.prompt) for r in requests))
    items = [{"idx": i, "image": images[k[0]], "prompt": k[1]} for i, k in enumerate(unique)]
    t0 = time.time()
    ds = ray.data.from_items(items, override_num_blocks=max(1, cfg.sampler.concurrency * 2))
    ds = ds.map_batches(
        GenerateOperator,
        fn_constructor_kwargs={
            "model": model,
            "dtype": cfg.sampler.dtype,
            "max_new_tokens": cfg.sampler.max_new_tokens,
            "temperature": 0.0,
            "engine": cfg.sampler.engine,
            "vllm_gpu_memory": cfg.sampler.vllm_gpu_memory,
        },
        **pool_kwargs(cfg),  # sizes + sampler.resources, the node-type label
    )
    answers = {
        row["idx"]: row["response"] for row in ds.select_columns(["idx", "response"]).iter_rows()
    }
    by_key = {k: answers[i] for i, k in enumerate(unique)}
    responses = [by_key[(r.image_id, r.prompt)] for r in requests]
    report = score_responses(requests, responses, truths, vocab)
    report.update(model=model, eval=cfg.data.eval, seconds=round(time.time() - t0, 1))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv, description=__doc__)
    report = run_evaluation(cfg)
    out = storage.join(cfg.storage.output_dir, "eval", "report.json")
    storage.write_bytes(out, json.dumps(report, indent=2).encode())
    print(format_report(report))
    print(f"report written to {out}")
    return report


if __name__ == "__main__":
    main()
