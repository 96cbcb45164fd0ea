"""Ray Data prompt source of the online loop: rows live in the object store, the driver
holds only references.

1. `plan_locators` (driver): one small locator row per input row, `idx` = the row's
   input position (stable across runs). ShapesWorld rows are generated from their index,
   Parquet rows are read by (file, position) and LLaVA JSON rows carry their JSON text
   (paths, no image bytes). The driver reads no image bytes here.
2. `load_prompt_rows` (`map_batches`, tasks): locator batch -> prompt records
   (mmalign.schema.PROMPT_SCHEMA) + `idx` + `error`, one output row per input row. Each
   row is normalised (mmalign.io.normalize_row), its images loaded as bytes and checked to
   decode; a row that fails keeps its `idx`/`id` with `error` = the reason (quarantine)
   and never fails its batch.
3. `read_prompt_source`: `materialize()`s the blocks, then a tiny task per block returns
   only (idx, id, error) so the driver can build the idx -> (block, offset) table.

The driver-side view (`PromptSource`), the `RowRef`s it hands out and the resolving
functions actors call (`resolve_rows`, `resolve_pairs`) are in `mmalign.rows`.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pyarrow as pa

from mmalign import io as mio
from mmalign import storage
from mmalign.rows import ImageStruct, PromptSource
from mmalign.schema import PROMPT_SCHEMA, RowError

LOCATOR_COLUMNS = ("idx", "kind", "uri", "pos", "raw", "root", "source", "seed")
OUTPUT_SCHEMA = PROMPT_SCHEMA.append(pa.field("idx", pa.int64())).append(
    pa.field("error", pa.string())
)


def plan_locators(
    uri: str, image_root: str = "", max_rows: int = 0, world_seed: int = 0
) -> list[dict[str, Any]]:
    """Locator rows (LOCATOR_COLUMNS) of `data.prompts`; fails at once on unusable columns."""
    fmt = mio.detect_format(uri)
    base = {"kind": fmt, "uri": "", "pos": 0, "raw": "", "root": "", "source": uri, "seed": 0}
    if fmt == "shapesworld":
        from mmalign.shapes.world import SPLITS, WorldConfig

        split = uri.split(":", 1)[1] or "pref"
        if split not in SPLITS:
            raise ValueError(f"{uri}: unknown split (choose from {list(SPLITS)})")
        n = max_rows or WorldConfig(seed=world_seed).split_size(split)
        base = {**base, "uri": split, "source": "shapesworld", "seed": world_seed}
        return [{**base, "idx": i, "pos": i} for i in range(n)]
    if fmt == "llava-json":
        raw = mio.read_llava_json(uri)[: max_rows or None]
        root = image_root or os.path.dirname(uri)
        return [{**base, "idx": i, "raw": json.dumps(r), "root": root} for i, r in enumerate(raw)]
    import pyarrow.parquet as pq

    files = [uri] if uri.lower().endswith(".parquet") else list(mio.iter_shards(uri))
    if not files:
        raise ValueError(f"{uri}: no Parquet files")
    out: list[dict[str, Any]] = []
    for path in files:
        fs, p = storage.filesystem(path)
        meta = pq.ParquetFile(fs.open_input_file(p)).metadata  # footer only, no row data
        mio.check_columns(meta.schema.to_arrow_schema().names, path)
        for pos in range(meta.num_rows):
            out.append({**base, "idx": len(out), "uri": path, "pos": pos, "root": image_root})
            if max_rows and len(out) >= max_rows:
                return out
    return out


def _raw_rows(batch: dict[str, list[Any]]) -> list[dict[str, Any] | Exception]:
    """The raw input row of each locator (an exception where it cannot be read)."""
    out: list[dict[str, Any] | Exception] = []
    parquet: dict[str, list[dict[str, Any]]] = {}
    for i, kind in enumerate(batch["kind"]):
        try:
            if kind == "shapesworld":
                from mmalign.shapes.world import WorldConfig, generate_record

                cfg = WorldConfig(seed=int(batch["seed"][i]))
                out.append(generate_record(cfg, str(batch["uri"][i]), int(batch["pos"][i])))
            elif kind == "llava-json":
                out.append(json.loads(batch["raw"][i]))
            else:
                uri = str(batch["uri"][i])
                if uri not in parquet:  # one read per file per batch
                    parquet[uri] = mio.read_parquet(uri).to_pylist()
                out.append(parquet[uri][int(batch["pos"][i])])
        except Exception as err:  # noqa: BLE001 - quarantined with its reason
            out.append(err)
    return out


def _with_bytes(image: Any) -> ImageStruct:
    """{bytes, path} with the encoded bytes loaded and checked to decode (pixels dropped)."""
    from PIL import Image

    ref = image if isinstance(image, dict) else {"bytes": None, "path": image}
    data = mio.load_image_bytes(ref)
    try:
        Image.open(io.BytesIO(data)).verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad images
        raise RowError(f"images: unreadable image ({err})") from None
    return {"bytes": data, "path": ref.get("path")}


def load_prompt_rows(batch: pa.Table) -> pa.Table:
    """Locators -> prompt records + idx + error (OUTPUT_SCHEMA), one row per locator."""
    cols = batch.to_pydict()
    missing = [c for c in LOCATOR_COLUMNS if c not in cols]
    if missing:
        raise ValueError(f"load_prompt_rows: missing input columns {missing}")
    rows = []
    for i, raw in enumerate(_raw_rows(cols)):
        idx, source = int(cols["idx"][i]), str(cols["source"][i])
        try:
            if isinstance(raw, Exception):
                raise RowError(f"row: cannot read ({raw})")
            rec = mio.normalize_row(raw, str(cols["root"][i]), source)
            rec["images"] = [_with_bytes(img) for img in rec["images"]]
            rows.append({**rec, "idx": idx, "error": ""})
        except (RowError, ValueError, TypeError, OSError, storage.StorageError) as err:
            rid = raw.get("id") if isinstance(raw, dict) else None
            rows.append(
                {
                    "id": str(rid if rid not in (None, "") else f"row-{idx}"),
                    "prompt": "",
                    "images": [],
                    "reference": "",
                    "rejected": "",
                    "objects": [],
                    "source": source,
                    "idx": idx,
                    "error": str(err),
                }
            )
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def _block_index(block: Any) -> tuple[list[int], list[str], list[str]]:
    """(idx, id, error) columns of one block: all the driver ever reads of it."""
    from ray.data.block import BlockAccessor

    table = BlockAccessor.for_block(block).to_arrow()
    cols = table.select(["idx", "id", "error"]).to_pydict()
    return cols["idx"], cols["id"], cols["error"]


def read_prompt_source(
    uri: str,
    image_root: str = "",
    max_rows: int = 0,
    world_seed: int = 0,
    rows_per_block: int = 8,
    num_cpus: float = 1.0,
) -> PromptSource:
    """Read, validate and load `data.prompts` with Ray Data into object-store blocks."""
    import ray

    locators = plan_locators(uri, image_root, max_rows, world_seed)
    if not locators:
        raise ValueError(f"{uri}: no prompt rows")
    ds = ray.data.from_items(
        locators, override_num_blocks=max(1, -(-len(locators) // rows_per_block))
    ).map_batches(
        load_prompt_rows, batch_size=rows_per_block, batch_format="pyarrow", num_cpus=num_cpus
    )
    blocks = []
    for bundle in ds.materialize().iter_internal_ref_bundles():
        if any(s is not None for s in bundle.slices):
            raise RuntimeError("prompt source: sliced blocks are not supported")
        blocks += list(bundle.block_refs)
    index = ray.remote(num_cpus=0.1)(_block_index)
    cols = ray.get([index.remote(b) for b in blocks])  # a block travels as a top-level arg
    good: list[tuple[int, int, int, str]] = []
    bad: list[dict[str, Any]] = []
    for b, (idxs, ids, errors) in enumerate(cols):
        for offset, (idx, rid, err) in enumerate(zip(idxs, ids, errors, strict=True)):
            if err:
                bad.append({"id": rid, "idx": idx, "reason": err, "source": uri})
            else:
                good.append((idx, b, offset, rid))
    good.sort()
    bad.sort(key=lambda q: int(q["idx"]))
    return PromptSource(
        blocks=blocks,
        table=[(idx, b, off) for idx, b, off, _ in good],
        ids=[rid for *_, rid in good],
        quarantine=bad,
    )
