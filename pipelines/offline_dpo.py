"""Offline preference optimisation (DPO / IPO / SLiC / two-rejected / MDPO) with LoRA on Ray Train.

    .venv/bin/python pipelines/offline_dpo.py --config pipelines/configs/shapes-cpu.yaml \
        --data.offline_pairs runs/shapes-cpu/bdhs --storage.output_dir runs/offline-dpo

On a cluster (checkpoints, metrics and the merged model go to S3):

    ray job submit --working-dir . -- python pipelines/offline_dpo.py \
        --config pipelines/configs/llava-1.6-7b.yaml --data.offline_pairs s3://bucket/pairs \
        --storage.output_dir s3://bucket/runs/dpo --learner.num_workers 8 --learner.use_gpu true

Flow: Ray Data reads `data.offline_pairs` (our preference Parquet or TRL's; local or s3://)
-> every row becomes a learner row (`mmalign.preference_rows`); bad rows (unreadable, too
long for the model's context, a duplicated id) go to <output_dir>/quarantine.jsonl with their
reason, and a run quarantining more than `data.max_quarantined` of its rows, or left with none,
exits non-zero with the top reasons counted -> `learner.num_workers` Ray Train workers
train LoRA (`actors.learner_train`), checkpointing to `storage.checkpoints`/step_XXXXXX and
resuming from there -> rank 0 writes the merged model to <output_dir>/merged -> metrics.json
-> the ShapesWorld evaluation of the merged model (`pipelines/evaluate.py`).
The policy is `sampler.model`, loaded in `sampler.dtype`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

_STARTED = time.perf_counter()  # metrics.json "seconds": startup = imports and parsing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` anywhere

from mmalign import io, storage  # noqa: E402
from mmalign import quarantine as guard  # noqa: E402
from mmalign.config import Config, parse_args, to_dict  # noqa: E402
from mmalign.preference_rows import ERROR_COLUMN, convert_table  # noqa: E402


def _absolute(path: str, must_exist: bool = False) -> str:
    """Ray Train workers run in their own directory, so local paths become absolute. With
    `must_exist`, a path that does not exist locally is left alone (a hub id)."""
    local = os.path.expanduser(path)
    if not path or storage.is_s3(path) or (must_exist and not os.path.exists(local)):
        return path
    return os.path.abspath(local)


def convert_batch(
    table: pa.Table, image_root: str, ranked: bool, model: str = "", max_response_tokens: int = 0
) -> pa.Table:
    """Ray Data stage, one row out per row in: learner columns + `error` ("" = good). With
    `model`, rows longer than its context are errors too (mark_too_long)."""

    def load(struct: dict[str, Any]) -> bytes:
        path = struct["path"]
        if image_root and not storage.is_s3(path) and not os.path.isabs(path):
            path = storage.join(image_root, path)
        return io.load_image_bytes({"bytes": None, "path": path})

    converted = convert_table(table, load_image=load, ranked=ranked)
    if not model:
        return converted
    processor, max_positions = _text_context(model)
    return mark_too_long(converted, processor, max_positions, max_response_tokens)


@functools.lru_cache(maxsize=2)
def _text_context(model: str) -> tuple[Any, int]:
    """(processor, max positions; 0 = unknown) of the policy, loaded once per worker."""
    from transformers import AutoConfig, AutoProcessor

    from mmalign.models.loading import resolve_model_dir

    source = _without_weights(model) if storage.is_s3(model) else resolve_model_dir(model)
    config = AutoConfig.from_pretrained(source)
    text = getattr(config, "text_config", None) or config
    limit = int(getattr(text, "max_position_embeddings", 0) or 0)
    return AutoProcessor.from_pretrained(source), limit


def _without_weights(uri: str) -> str:
    """A local copy of an s3:// model's config and processor files, weights left out: a
    Ray Data worker on any node needs the tokenizer and the context length, not 14 GB."""
    import tempfile

    prefix = uri.rstrip("/") + "/"
    target = tempfile.mkdtemp(prefix="mmalign-processor-")
    for file in storage.list_files(uri):
        rel = file[len(prefix) :]
        if rel.endswith((".safetensors", ".bin", ".pt", ".pth")):
            continue
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        with open(os.path.join(target, rel), "wb") as f:
            f.write(storage.read_bytes(file))
    return target


def mark_too_long(
    table: pa.Table, processor: Any, max_positions: int, max_response_tokens: int = 0
) -> pa.Table:
    """Converted rows (CONVERTED_SCHEMA) with `error` set on good rows whose longest
    sequence (prompt + image tokens + response, as the learner encodes it) exceeds
    `max_positions`: quarantined here rather than crashing (or exhausting) a train step."""
    from mmalign.logprobs import sequence_length

    if not max_positions:
        return table
    rows = table.to_pylist()
    for r in rows:
        if r[ERROR_COLUMN]:
            continue
        # the prompt's own tokens first: one tokenizer call, where encoding a 50k-word
        # prompt with its image and each response takes seconds
        n = len(processor.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        if n <= max_positions:
            responses = r["responses"] or [r["chosen"], r["rejected"], *r["rejected_extra"]]
            cap = max_response_tokens or None
            n = sequence_length(processor, r["image"], r["prompt"], responses, cap)
        if n > max_positions:
            r.update(image=b"", prompt="", chosen="", rejected="", rejected_extra=[], responses=[])
            r[ERROR_COLUMN] = f"prompt: too long ({n} positions > {max_positions})"
    return pa.Table.from_pylist(rows, schema=table.schema)


def keep_good(table: pa.Table, k: int, drop_ids: frozenset[str] = frozenset()) -> pa.Table:
    """Ray Data stage that *filters*: rows without error (and with K responses if k > 0),
    but none whose id is in `drop_ids` (duplicate_entries)."""
    mask = pc.equal(table[ERROR_COLUMN], "")
    if k:
        mask = pc.and_(mask, pc.equal(pc.list_value_length(table["responses"]), k))
    if drop_ids:
        mask = pc.and_(mask, pc.invert(pc.is_in(table["id"], pa.array(sorted(drop_ids)))))
    return table.filter(mask).drop_columns([ERROR_COLUMN])


def duplicate_entries(info: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """{id, reason, source} for every good row whose id another good row has. All of them
    go: the training pass filters the rows batch by batch, so it cannot tell the first."""
    counts = Counter(r["id"] for r in info if not r[ERROR_COLUMN])
    return [
        {
            "id": r["id"],
            "reason": f"id: duplicate ({counts[r['id']]} rows share it; ids must be unique, "
            "none of them is trained on)",
            "source": source,
        }
        for r in info
        if not r[ERROR_COLUMN] and counts[r["id"]] > 1
    ]


def quarantine_entries(
    info: list[dict[str, Any]], source: str, ranked: bool
) -> tuple[list[dict[str, Any]], int]:
    """({id, reason, source} per bad row, K) from converted rows' id/error/responses. MDPO
    batches need one K: the most common K among good rows wins, the others are quarantined
    (K = 0 when not ranked)."""
    bad = [
        {"id": r["id"], "reason": r[ERROR_COLUMN], "source": source}
        for r in info
        if r[ERROR_COLUMN]
    ]
    if not ranked:
        return bad, 0
    sizes = [len(r["responses"]) for r in info if not r[ERROR_COLUMN]]
    k = max(set(sizes), key=lambda n: (sizes.count(n), n)) if sizes else 0
    for r in info:
        if not r[ERROR_COLUMN] and len(r["responses"]) != k:
            reason = f"responses: K={len(r['responses'])} differs from the dataset's K={k}"
            bad.append({"id": r["id"], "reason": reason, "source": source})
    return bad, k


def prepare_data(cfg: Config) -> tuple[Any, int, list[dict[str, Any]]]:
    """(train dataset, good rows, quarantine entries). Reads and converts once: the
    converted rows are materialized (Ray's object store, spilled to disk past its size),
    the quarantine and the counts come from them (ids and errors only reach the driver),
    and every epoch trains from them without reading or decoding the data again."""
    import ray.data

    uri = cfg.data.offline_pairs
    fs, path = storage.filesystem(uri)
    ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
    if cfg.data.max_rows:
        ds = ds.limit(cfg.data.max_rows)
    ranked = cfg.learner.loss == "mdpo"
    # Relative image paths resolve against data.image_root, else the Parquet's directory.
    base = uri
    if uri.lower().endswith(".parquet"):
        base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    root = _absolute(cfg.data.image_root or base)
    convert = functools.partial(
        convert_batch,
        image_root=root,
        ranked=ranked,
        model=_absolute(cfg.sampler.model, must_exist=True),
        max_response_tokens=cfg.learner.max_response_tokens,
    )
    converted = ds.map_batches(convert, batch_format="pyarrow").materialize()
    info = converted.select_columns(["id", ERROR_COLUMN, "responses"]).take_all()
    duplicates = duplicate_entries(info, uri)
    drop = frozenset(d["id"] for d in duplicates)
    bad, k = quarantine_entries([r for r in info if r["id"] not in drop], uri, ranked)
    bad += duplicates
    good = len(info) - len(bad)
    keep = functools.partial(keep_good, k=k, drop_ids=drop)
    train = converted.map_batches(keep, batch_format="pyarrow")
    return train, good, bad


def _resume_from(cfg: Config, checkpoints: str) -> str:
    """Our own fallback when Ray's run snapshot is missing; refuses to mix runs."""
    from mmalign.engines.checkpoint import latest_checkpoint

    latest = latest_checkpoint(checkpoints)
    snapshot = storage.exists(storage.join(checkpoints, "checkpoint_manager_snapshot.json"))
    if (latest or snapshot) and not cfg.storage.resume:
        raise SystemExit(
            f"{checkpoints} already holds checkpoints; pass --storage.resume true to continue "
            "that run or choose another --storage.checkpoint_dir"
        )
    return "" if snapshot else latest


def _evaluate(cfg: Config, model_dir: str) -> dict[str, Any]:
    """The evaluation of the merged model (pipelines/evaluate.py) on pipeline.eval_rows
    images, printed."""
    from mmalign.evaluation import format_report
    from pipelines.evaluate import run_evaluation

    report = dict(run_evaluation(cfg, model_dir, max_rows=cfg.pipeline.eval_rows))
    print(format_report(report))
    return report


def run(cfg: Config, evaluate: bool = True) -> dict[str, Any]:
    """The whole offline run; returns the metrics written to <output_dir>/metrics.json."""
    from actors.learner_train import TrainLoopConfig, make_trainer
    from actors.runtime import init_ray, quiet_data_context

    if not cfg.data.offline_pairs:
        raise SystemExit("data.offline_pairs: set the preference Parquet to train on")
    storage.use_config(cfg.storage)  # retries of transient storage errors, for this driver
    out, checkpoints = _absolute(cfg.storage.output_dir), _absolute(cfg.storage.checkpoints)
    for uri in (out, checkpoints, cfg.data.offline_pairs):
        storage.check_bucket(uri)
    resume_from = _resume_from(cfg, checkpoints)
    t_ray = time.perf_counter()
    init_ray(cfg.pipeline.ray_address)
    quiet_data_context()
    import ray.data

    # The quarantine pass and the training pass must see the same rows (data.max_rows).
    ray.data.DataContext.get_current().execution_options.preserve_order = True

    t0 = time.perf_counter()
    train, good, bad = prepare_data(cfg)
    io.write_jsonl(bad, storage.join(out, "quarantine.jsonl"))
    print(f"{good} pairs to train on, {len(bad)} quarantined -> {out}/quarantine.jsonl")
    what = f"offline_dpo ({cfg.data.offline_pairs})"
    guard.check(what, good + len(bad), bad, cfg.data.max_quarantined, usable=good)
    if good < cfg.learner.batch_size:
        raise SystemExit(
            f"only {good} usable pairs; learner.batch_size is {cfg.learner.batch_size}"
        )

    merged = storage.join(out, "merged")
    loop = TrainLoopConfig(
        model=_absolute(cfg.sampler.model, must_exist=True),
        learner=cfg.learner,
        dtype=cfg.sampler.dtype,
        output_dir=out,
        export_dir=merged,
        checkpoint_every=cfg.storage.checkpoint_every,
        resume_from=resume_from,
        cache_dir=cfg.storage.cache_dir,
    )
    t1 = time.perf_counter()
    result = make_trainer(loop, train, checkpoints=checkpoints).fit()
    t2 = time.perf_counter()
    last = result.checkpoint.path.rstrip("/").rpartition("/")[2] if result.checkpoint else ""
    metrics: dict[str, Any] = {
        "name": cfg.name,
        "loss": cfg.learner.loss,
        "final": dict(result.metrics or {}),
        "checkpoint": storage.join(checkpoints, last) if last else "",
        "merged_model": merged,
        "rows": {"trained_on": good, "quarantined": len(bad)},
        "seconds": {
            **{"startup": t_ray - _STARTED, "ray_start": t0 - t_ray},
            **{"data_check": t1 - t0, "train": t2 - t1},
        },
        "evaluation": None,
        "config": to_dict(cfg),
    }
    if evaluate and cfg.pipeline.eval_rows > 0:  # 0 = skip it (the field's help)
        metrics["evaluation"] = _evaluate(cfg, merged)
    storage.write_bytes(storage.join(out, "metrics.json"), json.dumps(metrics, indent=1).encode())
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        metrics = run(parse_args(argv, description=__doc__))
    except guard.QuarantineError as err:
        raise SystemExit(f"offline_dpo.py: error: {err}") from None
    print(json.dumps({k: metrics[k] for k in ("final", "checkpoint", "merged_model", "rows")}))
    return metrics


if __name__ == "__main__":
    # Through the module, not __main__: Ray pickles __main__'s functions by value, and the
    # Ray Data stage's lru_cache'd `_text_context` then fails to unpickle in its workers.
    from pipelines.offline_dpo import main as _main

    _main(sys.argv[1:])
