"""Rejected-response generation (BDHS / BDHS-noise / POVID) on Ray Data -> preference Parquet.

    python pipelines/bdhs.py --config pipelines/configs/shapes-cpu.yaml
    python pipelines/bdhs.py --bdhs.variant povid --data.prompts data/llava.json
    ray job submit --working-dir . -- python pipelines/bdhs.py --config <preset>

Reads prompt records (`data.prompts`: shapesworld:pref, LLaVA JSON, Parquet; local or
s3://), skips ids already written when `storage.resume` is on, runs a pool of
`sampler.concurrency` BDHSOperator actors (each holds the policy `sampler.model`) that
call a separate CPU pool of `bdhs.embed_concurrency` sentence-embedder actors
(`bdhs.embedder`, actors/embedder_pool.py) for the similarity gate (both pools placed by
`bdhs.resources`, see pool_kwargs / embedder_pool_kwargs), and streams the rows
into shards of `storage.shard_rows` rows at <output_dir>/bdhs/part-NNNNN.parquet. Each
shard is written atomically, so a killed job loses only the shard in flight; rerunning
resumes. Rows that cannot be used go to <output_dir>/bdhs_quarantine.jsonl with a reason,
beside the shard directory, so <output_dir>/bdhs/ holds Parquet alone (every way of loading a
Parquet dataset, `datasets.load_dataset("parquet", data_dir=...)` included, reads it). Pairs
whose rejected equals the chosen are dropped (or flagged, `bdhs.identical`) and counted. A
run that quarantines more than `data.max_quarantined` of its rows, or writes none, fails
with the top reasons counted instead of exiting 0 (before any model loads when the reader
alone quarantines that many); so does an input that cannot be read at all (naming the file
and the byte offset).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # `python pipelines/x.py` from anywhere

from mmalign import io as mio  # noqa: E402
from mmalign import quarantine as guard  # noqa: E402
from mmalign import storage  # noqa: E402
from mmalign.config import Config, check_bdhs_engine, parse_args, parse_resources  # noqa: E402
from mmalign.schema import RowError  # noqa: E402

_PART = re.compile(r"part-(\d+)\.parquet$")


def existing_shards(out_dir: str) -> tuple[set[str], int]:
    """(ids already written, next shard index) of the shards under out_dir."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    next_index = 0
    for uri in mio.iter_shards(out_dir):
        m = _PART.search(uri)
        if not m:
            continue
        next_index = max(next_index, int(m.group(1)) + 1)
        fs, path = storage.filesystem(uri)
        table = storage.with_retries(
            uri,
            lambda p=path, f=fs: pq.read_table(p, columns=["id"], filesystem=f),  # type: ignore[misc]
        )
        ids.update(table.column("id").to_pylist())
    return ids, next_index


def pool_kwargs(cfg: Config) -> dict[str, Any]:
    """map_batches options of the BDHSOperator pool: `sampler.concurrency` actors with the
    sampler's CPUs/GPUs, placed by `bdhs.resources` (a node-type label, e.g. sampler_node)."""
    from actors.runtime import sampler_pool_kwargs

    s = cfg.sampler
    return sampler_pool_kwargs(s, s.batch_size, cfg.bdhs.resources, "bdhs.resources")


def embedder_pool_kwargs(cfg: Config) -> dict[str, Any]:
    """start_embedder_pool arguments: `bdhs.embed_concurrency` CPU actors with the BDHS
    pool's label (`bdhs.resources`), so they run on the sampler nodes whose actors call
    them once per try. Unlabelled, a CPU actor could land on (or make the autoscaler start)
    any node type with CPUs, e.g. a judge node; cluster.yaml's head offers no CPUs."""
    b = cfg.bdhs
    return {
        "model": b.embedder,
        "size": b.embed_concurrency,
        "num_cpus": 1.0,
        "batch_size": b.embed_batch_size,
        "resources": parse_resources(b.resources, "bdhs.resources"),
    }


class ShardWriter:
    """Buffers preference rows and writes full shards atomically as part-NNNNN.parquet."""

    def __init__(self, out_dir: str, shard_rows: int, first_index: int) -> None:
        self.out_dir, self.shard_rows, self.index = out_dir, shard_rows, first_index
        self.buffer: list[dict[str, Any]] = []
        self.written = 0

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        uri = storage.join(self.out_dir, f"part-{self.index:05d}.parquet")
        mio.write_preferences(self.buffer, uri)
        self.written += len(self.buffer)
        self.index += 1
        self.buffer = []


def summarize(
    metas: list[dict[str, Any]], written: int, quarantined: int, identical: int = 0
) -> dict[str, Any]:
    """Run summary: rows, quarantine, identical pairs (dropped or flagged), re-sampling rate
    (tries > 1), final unguided fraction."""
    n = max(len(metas), 1)
    sims = [float(m["similarity"]) for m in metas if m.get("similarity") is not None]
    return {
        "rows": written,
        "quarantined": quarantined,
        "identical": identical,
        "resample_rate": sum(int(m.get("iterations") or 1) > 1 for m in metas) / n,
        "final_unguided_rate": sum(bool(m.get("final_unguided")) for m in metas) / n,
        "mean_similarity": sum(sims) / len(sims) if sims else None,
    }


def run_bdhs(cfg: Config) -> dict[str, Any]:
    """Generate rejected responses for `data.prompts`; returns the summary dict."""
    check_bdhs_engine(cfg.sampler, cfg.bdhs)
    storage.use_config(cfg.storage)
    t0 = time.time()
    out_dir = storage.join(cfg.storage.output_dir, "bdhs")
    records, quarantine = mio.read_prompts(
        cfg.data.prompts, cfg.data.image_root, cfg.data.max_rows, cfg.data.world_seed
    )
    read_bad = len(quarantine)  # rows the reader could not use (retried by every run)
    if read_bad:  # mostly unreadable: fail before Ray and the models start
        what = f"bdhs ({cfg.data.prompts})"
        guard.check(what, len(records) + read_bad, quarantine, cfg.data.max_quarantined)
    done, first_index = existing_shards(out_dir)
    if done and not cfg.storage.resume:
        # never overwrite or duplicate a finished run's rows
        raise SystemExit(
            f"bdhs: {out_dir} already holds {len(done)} rows; pass --storage.resume true "
            "to continue it or choose another --storage.output_dir"
        )
    todo = [r for r in records if r["id"] not in done]
    print(f"bdhs: {len(records)} prompts, {len(done)} already written, {len(todo)} to do")

    writer = ShardWriter(out_dir, cfg.storage.shard_rows, first_index)
    quarantine_uri = storage.join(cfg.storage.output_dir, "bdhs_quarantine.jsonl")
    stream = _Stream(writer, quarantine, quarantine_uri, cfg.bdhs.identical)
    embedder_stats: list[dict[str, Any]] = []
    if todo:
        embedder_stats = _generate(cfg, todo, stream)
    mio.write_jsonl(quarantine, quarantine_uri)
    attempted = len(todo) + read_bad
    if attempted:  # a resumed run with nothing left to do wrote nothing, rightly
        guard.check(
            f"bdhs ({cfg.data.prompts})",
            attempted,
            quarantine,
            cfg.data.max_quarantined,
            usable=writer.written,
        )
    summary = summarize(stream.metas, writer.written, len(quarantine), stream.identical)
    seconds = time.time() - t0
    t_first, t_last, metas = stream.t_first, stream.t_last, stream.metas
    summary.update(
        variant=cfg.bdhs.variant,
        model=cfg.sampler.model,
        total_rows=len(done) + writer.written,
        seconds=round(seconds, 1),
        pairs_per_s=round(writer.written / seconds, 3) if seconds > 0 else None,
        first_row_seconds=round(t_first - t0, 1) if t_first else None,
        # after start-up (Ray, actors, model loads): rows that arrived after the first one
        steady_pairs_per_s=(
            round((len(metas) - 1) / (t_last - t_first), 3) if t_last > t_first else None
        ),
        output=out_dir,
        embedder_actors=embedder_stats,  # per embedder actor: pid, calls, texts served
    )
    return summary


class _Stream:
    """Where the operator's output rows go: the shards, or the quarantine with a reason."""

    def __init__(
        self, writer: ShardWriter, quarantine: list[dict[str, Any]], uri: str, identical: str
    ) -> None:
        self.writer, self.quarantine, self.uri = writer, quarantine, uri
        self.drop_identical = identical == "drop"
        self.identical = 0  # pairs whose rejected equals the chosen
        self.metas: list[dict[str, Any]] = []
        self.t_first = self.t_last = 0.0  # arrival of the first/last output row

    def add(self, out: dict[str, Any], record: dict[str, Any]) -> None:
        from operators.bdhs import to_preference_row

        self.t_last = time.time()
        self.t_first = self.t_first or self.t_last
        try:
            if out["error"]:
                raise RowError(out["error"])
            if _same_text(out["chosen"], out["rejected"]):
                self.identical += 1
                if self.drop_identical:
                    return
                out = {**out, "meta": json.dumps({**json.loads(out["meta"]), "identical": True})}
            row = to_preference_row(out, record)
        except (RowError, ValueError, KeyError) as err:
            self.quarantine.append({"id": out["id"], "reason": str(err), "source": out["source"]})
            return
        shards_before = self.writer.index
        self.writer.add(row)
        self.metas.append(json.loads(out["meta"]))
        if self.writer.index != shards_before:  # keep the quarantine as current as the shards
            mio.write_jsonl(self.quarantine, self.uri)


def _generate(cfg: Config, todo: list[dict[str, Any]], stream: _Stream) -> list[dict[str, Any]]:
    """Run the BDHSOperator pool (+ the embedder pool) over `todo` into `stream`; returns the
    embedder actors' stats."""
    import ray

    from actors.embedder_pool import pool_stats, start_embedder_pool, stop_embedder_pool
    from actors.runtime import init_ray, quiet_data_context
    from operators.bdhs import BDHSOperator

    init_ray(cfg.pipeline.ray_address)
    quiet_data_context()
    s = cfg.sampler
    pool: list[Any] = []
    if cfg.bdhs.variant != "povid":  # POVID has no similarity gate
        pool = start_embedder_pool(**embedder_pool_kwargs(cfg))  # beside the samplers
    kwargs = {"sampler": s, "bdhs": cfg.bdhs, "embedder_pool": pool or None}
    by_id = {r["id"]: r for r in todo}
    items = ray.data.from_items(todo, override_num_blocks=max(1, len(todo) // s.batch_size))
    # pool_kwargs: sizes + bdhs.resources, the node-type label (e.g. sampler_node)
    ds = items.map_batches(BDHSOperator, fn_constructor_kwargs=kwargs, **pool_kwargs(cfg))
    for out in _rows(ds.iter_batches(batch_size=s.batch_size, batch_format="numpy")):
        stream.add(out, by_id[out["id"]])
    stream.writer.flush()
    if not pool:
        return []
    stats = pool_stats(pool)
    stop_embedder_pool(pool)
    return stats


def _same_text(a: str, b: str) -> bool:
    """Equal up to whitespace: such a pair's preference term is exactly zero."""
    return " ".join(str(a).split()) == " ".join(str(b).split())


def _rows(batches: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for batch in batches:
        cols = list(batch)
        for i in range(len(batch[cols[0]])):
            yield {c: batch[c][i] for c in cols}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv, description=__doc__)
    try:
        summary = run_bdhs(cfg)
    except (
        guard.QuarantineError,
        mio.InputError,
        storage.StorageError,
    ) as err:  # each names the cause
        raise SystemExit(f"bdhs.py: error: {err}") from None
    except Exception as err:  # Ray wraps an operator's SystematicFailure
        failure = guard.find_systematic(err)
        if failure is None:
            raise
        raise SystemExit(f"bdhs.py: error: {failure}") from None
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
