"""Hallucination evaluation (POPE random/popular/adversarial, CHAIR_i/CHAIR_s/Recall) on Ray Data.

    python pipelines/evaluate.py                                   # shipped tiny policy
    python pipelines/evaluate.py --sampler.model runs/x/merged     # any checkpoint (or s3://)
    # POPE (three split files) + CHAIR on a COCO caption set; README "Evaluating on POPE / COCO"
    python pipelines/evaluate.py --data.eval pope-coco --sampler.model <llava checkpoint> \\
        --data.pope_files pope/coco_pope_adversarial.json,pope/coco_pope_popular.json,... \\
        --data.coco_annotations coco/annotations/instances_val2014.json \\
        --data.coco_synonyms chair/synonyms.txt --data.eval_image_root coco/val2014
    ray job submit --working-dir . -- python pipelines/evaluate.py --config <preset>

The eval set (`data.eval`) is `shapesworld:eval`, any prompt input whose rows carry object
annotations (`objects`, classes of `judge.vocabulary`), or `pope-coco`: the official POPE
question files (each asked as written, scored against its yes/no labels) and a COCO
instances file whose images are described and scored by CHAIR over its categories (plus
`data.coco_synonyms`). The model is `sampler.model`. Questions are answered by a pool of
`sampler.concurrency` generation actors (greedy decoding; pope-coco images are read by the
Ray Data workers, never the driver); the report is printed and written to
<output_dir>/eval/report.json, every scored answer to responses.jsonl and the rows that could
not be used (with their reasons) to quarantine.jsonl beside it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # `python pipelines/x.py` from anywhere

from mmalign import (
    eval_sets,  # noqa: E402
    storage,  # noqa: E402
)
from mmalign import io as mio  # noqa: E402
from mmalign import quarantine as qcheck  # noqa: E402
from mmalign.config import Config, parse_args  # noqa: E402
from mmalign.evaluation import (  # noqa: E402
    DEFAULT_DESCRIBE_PROMPT,
    EvalRequest,
    build_requests,
    format_report,
    ground_truths,
    score_responses,
)
from mmalign.metrics.vocab import SHAPESWORLD, ObjectVocabulary, load_vocabulary  # noqa: E402


@dataclass
class EvalSet:
    """What one evaluation asks: requests, ground truths, vocabulary, and the images.

    `images` maps a request's image_id to encoded bytes (ShapesWorld / prompt inputs,
    already in memory) or to a URI the Ray Data workers read (pope-coco)."""

    requests: list[EvalRequest]
    truths: dict[str, frozenset[str]]
    vocab: ObjectVocabulary
    images: dict[str, bytes | str]
    quarantined: list[dict[str, Any]] = field(default_factory=list)


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


def parent(uri: str) -> str:
    """The directory (or s3:// prefix) holding a file."""
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def read_text(uri: str) -> str:
    try:
        return storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{uri}: not UTF-8 text ({err.reason})") from None


def pope_coco_set(cfg: Config, max_rows: int = 0) -> EvalSet:
    """The `pope-coco` eval set: POPE files + COCO instances (first `max_rows` images of
    each file, 0 = all). The vocabulary is the COCO categories with `data.coco_synonyms`
    (else `judge.vocabulary` when that is a synonyms file). Fails (QuarantineError) when the
    files' bad rows are more than `data.max_quarantined` of them."""
    d = cfg.data
    pope, bad, total = [], [], 0
    for uri in d.pope_files:
        items, quarantined = eval_sets.read_pope(read_text(uri), uri)
        total += len(items) + len(quarantined)
        bad += quarantined
        pope.append((eval_sets.first_images(items, max_rows), d.eval_image_root or parent(uri)))
    coco = eval_sets.read_coco_instances(read_text(d.coco_annotations), d.coco_annotations)
    total += len(coco.images) + len(coco.quarantined)
    bad += coco.quarantined
    qcheck.check("evaluate (POPE / COCO files)", total, bad, d.max_quarantined)
    if max_rows:
        coco = eval_sets.CocoSet(coco.classes, coco.images[:max_rows], coco.quarantined)
    synonyms = d.coco_synonyms or (
        "" if cfg.judge.vocabulary == SHAPESWORLD else cfg.judge.vocabulary
    )
    vocab = eval_sets.coco_vocabulary(
        coco.classes, read_text(synonyms) if synonyms else "", synonyms
    )
    coco_root = d.eval_image_root or parent(d.coco_annotations)
    requests, truths = eval_sets.pope_coco_requests(pope, coco, coco_root, DEFAULT_DESCRIBE_PROMPT)
    images: dict[str, bytes | str] = {r.image_id: r.image_id for r in requests}
    return EvalSet(requests, truths, vocab, images, bad)


def eval_set(cfg: Config, max_rows: int = 0) -> EvalSet:
    """The requests of `data.eval` (ShapesWorld / prompt input: POPE questions drawn from the
    annotations over `judge.vocabulary`; pope-coco: the files' own questions)."""
    if cfg.data.eval == "pope-coco":
        return pope_coco_set(cfg, max_rows)
    records = eval_records(cfg, max_rows)
    # the world's own classes for ShapesWorld; a prompt input's `objects` are classes of
    # judge.vocabulary (e.g. COCO's synonyms.txt), as for the object judge
    shapes = cfg.data.eval.startswith("shapesworld:")
    vocab = load_vocabulary(SHAPESWORLD if shapes else cfg.judge.vocabulary)
    truths = ground_truths(records)
    requests = build_requests(truths, vocab, seed=cfg.sampler.seed)
    return EvalSet(requests, truths, vocab, {r["id"]: r["image"] for r in records})


class ReadImage:
    """Ray Data row function: `image` from the row's `uri` (local or s3://), read in the
    worker; a read failure leaves empty bytes and the reason in `read_error`."""

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            row["image"], row["read_error"] = storage.read_bytes(row["uri"]), ""
        except Exception as err:  # noqa: BLE001 - any unreadable image is a row error
            row["image"], row["read_error"] = b"", f"{type(err).__name__}: {err}"
        return row


def pool_kwargs(cfg: Config) -> dict[str, Any]:
    """map_batches options of the generation pool: `sampler.concurrency` actors with the
    sampler's CPUs/GPUs, placed by `sampler.resources` (a node-type label)."""
    from actors.runtime import sampler_pool_kwargs

    s = cfg.sampler
    return sampler_pool_kwargs(s, s.batch_size * 4, s.resources, "sampler.resources")


def generate_all(cfg: Config, model: str, es: EvalSet) -> dict[tuple[str, str], tuple[str, str]]:
    """(image_id, prompt) -> (response, error) for every distinct pair of `es.requests`
    (greedy decoding is deterministic, so a pair shared by several splits is asked once)."""
    import ray

    from operators.generate import GenerateOperator

    unique = list(dict.fromkeys((r.image_id, r.prompt) for r in es.requests))
    items = []
    for i, (image_id, prompt) in enumerate(unique):
        image = es.images[image_id]
        uri, data = (image, b"") if isinstance(image, str) else ("", image)
        items.append({"idx": i, "uri": uri, "image": data, "prompt": prompt})
    ds = ray.data.from_items(items, override_num_blocks=max(1, cfg.sampler.concurrency * 2))
    read = any(item["uri"] for item in items)
    if read:
        ds = ds.map(ReadImage)
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
    cols = ["idx", "response", "error"] + (["read_error"] if read else [])
    out = {}
    for row in ds.select_columns(cols).iter_rows():
        error = row.get("read_error") or row["error"]
        out[unique[row["idx"]]] = (row["response"], error)
    return out


def run_evaluation(
    cfg: Config, model: str | None = None, max_rows: int = 0, out_dir: str = ""
) -> dict[str, Any]:
    """Evaluate `model` (default: cfg.sampler.model) on Ray Data; returns the report dict
    (and, with `out_dir`, writes responses.jsonl and quarantine.jsonl there).

    A request whose image could not be read or decoded is left out of the scores and
    quarantined (`report["n_quarantined"]`); past `data.max_quarantined` the run fails."""
    from actors.runtime import init_ray

    init_ray(cfg.pipeline.ray_address)
    model = model or cfg.sampler.model
    es = eval_set(cfg, max_rows or cfg.data.max_rows)
    t0 = time.time()
    answers = generate_all(cfg, model, es)
    failed = {k: err for k, (_, err) in answers.items() if err}
    quarantined = es.quarantined + [
        {"id": image_id, "prompt": prompt, "reason": f"image {image_id}: {err}"}
        for (image_id, prompt), err in failed.items()
    ]
    kept = [r for r in es.requests if (r.image_id, r.prompt) not in failed]
    dropped = [
        {"reason": failed[k]} for r in es.requests if (k := (r.image_id, r.prompt)) in failed
    ]
    qcheck.check("evaluate (images)", len(es.requests), dropped, cfg.data.max_quarantined)
    described = {r.image_id for r in kept if r.kind == "describe"}
    truths = {k: v for k, v in es.truths.items() if k in described}
    responses = [answers[(r.image_id, r.prompt)][0] for r in kept]
    report = score_responses(kept, responses, truths, es.vocab)
    report.update(
        model=model,
        eval=cfg.data.eval,
        n_classes=len(es.vocab),
        n_quarantined=len(quarantined),
        quarantine_examples=[q["reason"] for q in quarantined[:5]],
        seconds=round(time.time() - t0, 1),
    )
    if not out_dir:
        return report
    if quarantined:
        mio.write_jsonl(quarantined, storage.join(out_dir, "quarantine.jsonl"))
    # every scored answer, so a figure can be traced to the captions behind it
    mio.write_jsonl(
        (
            {"image": r.image_id, "kind": r.kind, "split": r.split, "label": r.label,
             "prompt": r.prompt, "response": a}
            for r, a in zip(kept, responses, strict=True)
        ),
        storage.join(out_dir, "responses.jsonl"),
    )  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv, description=__doc__)
    eval_dir = storage.join(cfg.storage.output_dir, "eval")
    report = run_evaluation(cfg, out_dir=eval_dir)
    out = storage.join(eval_dir, "report.json")
    storage.write_bytes(out, json.dumps(report, indent=2).encode())
    print(format_report(report))
    print(f"report written to {out}")
    return report


if __name__ == "__main__":
    main()
