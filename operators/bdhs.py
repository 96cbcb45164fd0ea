"""Ray Data operator: one rejected response y- per prompt record (BDHS, BDHS-noise, POVID).

Input columns (prompt records, mmalign.schema.PROMPT_SCHEMA): id, prompt, images,
reference, rejected, objects, source. Output: one row per input row with
`id, prompt, chosen, rejected, rejected_extra (JSON list), source, method, meta (JSON),
error`. `error` is "" for a good row, else the reason (empty reference, unreadable image,
prompt too long for the model, BDHS gate failed, generation crashed): the row is
quarantined by the pipeline instead of failing its batch. Images are not echoed back:
the driver already holds the records and joins them by id (`to_preference_row`).

The rows are made by mmalign.engines.bdhs_engine.BDHSEngine (variants, noise, length
checks, batched sampling, error rows); this operator only checks columns and maps one
input row to one output row. For "povid", rejected_extra = the dataset's rejected answer
when the record has one. The effective noise step is in meta.

Data flow (BDHS variants): each sampler actor (GPU in production) holds only the policy.
All rows of a batch step through the tries together (mmalign.bdhs.bdhs_sample_batch): per
try, one generate() call with every sentence of every open row, then one embedding call
with every open row's candidate y-, sent through an actor handle to a separate CPU pool of
EmbedderActor (actors/embedder_pool.py, `bdhs.embed_concurrency` actors, started by the
pipeline and passed in as `embedder_pool`). The call blocks, but it is one small request
per try against a whole batch of generation, so the sampler stays busy; rows that pass the
gate leave the batch, the rest retry with fresh masks. Without `embedder_pool` (dict-batch
tests) the operator loads the embedder itself.

Every row's randomness (mask, cuts, swaps, noise, sampling) is seeded from (seed, id), so
a row's output depends neither on its batch nor on which run (first or resumed) made it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mmalign import seeds
from mmalign.config import BDHSConfig, SamplerConfig
from operators.generate import check_columns

INPUT_COLUMNS = ("id", "prompt", "images", "reference", "rejected", "objects", "source")
OUTPUT_COLUMNS = (
    "id",
    "prompt",
    "chosen",
    "rejected",
    "rejected_extra",
    "source",
    "method",
    "meta",
    "error",
)


def as_batch(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Prompt records -> the numpy dict batch Ray Data hands the operator (1-D object
    columns of INPUT_COLUMNS; np.array on lists of lists would build 2-D arrays instead),
    for calling the operator in-process."""
    batch = {}
    for c in INPUT_COLUMNS:
        col = np.empty(len(records), dtype=object)
        col[:] = [r[c] for r in records]
        batch[c] = col
    return batch


def row_seed(seed: int, row_id: str) -> int:
    """Stable 63-bit seed of one row: independent of batching, order and process."""
    return seeds.row_id_seed(seed, row_id)


def first_image(images: Any) -> dict[str, Any]:
    """The first {bytes, path} struct of an `images` cell (list or numpy object array)."""
    items = list(images) if images is not None else []
    if not items:
        raise ValueError("images: missing")
    img = items[0]
    return img if isinstance(img, dict) else {"bytes": img, "path": None}


class BDHSOperator:
    """Hosts one BDHSEngine: the policy engine and the sentence embedder, loaded once per actor.

    Args:
        sampler: the policy (model, dtype, engine "hf"/"vllm", vllm_gpu_memory) and
            max_new_tokens. POVID is one teacher-forced forward of the HF model, so it
            always uses "hf" (vLLM would only add its start-up, the output is the same).
        bdhs: variant and knobs (mmalign.engines.bdhs_engine); "vllm" needs mask_mode
            "drop"; each row uses row_seed(bdhs.seed, id).
        device: where to load the policy (and a local embedder); None = cuda when available.
        embedder_pool: handles of actors.embedder_pool.EmbedderActor; when given, the
            similarity gate calls that pool and this actor loads no embedder.
        batched: True = all rows of a batch step together (bdhs_sample_batch: one
            generate and one embed call per try); False = the per-row reference loop.
    """

    def __init__(
        self,
        sampler: SamplerConfig,
        bdhs: BDHSConfig,
        device: str | None = None,
        embedder_pool: list[Any] | None = None,
        batched: bool = True,
    ) -> None:
        import torch

        from mmalign.config import check_bdhs_engine
        from mmalign.engines import factory
        from mmalign.engines.bdhs_engine import BDHSEngine, sentence_embedder

        bdhs.validate("bdhs")
        check_bdhs_engine(sampler, bdhs)  # before the model is loaded
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        povid = bdhs.variant == "povid"
        engine = factory.load_generation_engine(
            "hf" if povid else sampler.engine,
            sampler.model,
            sampler.vllm_gpu_memory,
            dtype=sampler.dtype,
            device=device,
        )
        embed: Any = None  # POVID needs no similarity gate
        if not povid and embedder_pool:
            from actors.embedder_pool import EmbedderClient

            embed = EmbedderClient(embedder_pool)
        elif not povid:
            embed = sentence_embedder(bdhs, device)
        self.bdhs = BDHSEngine(engine, embed, sampler, bdhs)
        self.model_id, self.variant, self.batched = sampler.model, bdhs.variant, batched

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mmalign.engines.bdhs_engine import BDHSRow

        check_columns(batch, INPUT_COLUMNS, "BDHSOperator")
        n = len(batch["id"])
        out: dict[str, list[Any]] = {c: [""] * n for c in OUTPUT_COLUMNS}
        todo: list[tuple[int, BDHSRow]] = []
        for i in range(n):
            rid = str(batch["id"][i])
            reference = str(batch["reference"][i] or "").strip()
            out["id"][i], out["prompt"][i], out["chosen"][i] = (
                rid,
                str(batch["prompt"][i]),
                reference,
            )
            out["source"][i] = str(batch["source"][i] or "")
            out["method"][i] = self.variant
            extra = [str(batch["rejected"][i])] if self.variant == "povid" else []
            out["rejected_extra"][i] = json.dumps([e for e in extra if e.strip()])
            out["meta"][i] = "{}"
            row = self._prepare(batch, i, reference, row_seed(self.bdhs.bdhs.seed, rid))
            if isinstance(row, str):
                out["error"][i] = row
            else:
                todo.append((i, row))
        params = self.bdhs.params()
        results = self.bdhs.sample([row for _, row in todo], batched=self.batched)
        for (i, row), res in zip(todo, results, strict=True):
            out["rejected"][i], out["error"][i] = res["rejected"], res["error"]
            # meta.seed is the run's seed; row_seed(seed, id) = row_seed drove this row
            meta = {**params, "model_id": self.model_id, "row_seed": row.seed, **res["meta"]}
            out["meta"][i] = json.dumps(meta, sort_keys=True)
        return {c: np.array(v, dtype=object) for c, v in out.items()}

    def _prepare(self, batch: dict[str, np.ndarray], i: int, reference: str, seed: int) -> Any:
        if not reference:  # before the image: an empty y+ is the first thing to report
            return "reference: empty (BDHS and POVID need y+)"
        try:
            image = first_image(batch["images"][i])
        except Exception as err:  # noqa: BLE001 - a missing image is a row error
            return f"images: unreadable ({type(err).__name__}: {err})"[:300]
        return self.bdhs.prepare(str(batch["prompt"][i]), image, reference, seed)


def to_preference_row(out: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """An operator output row + its prompt record -> a validated PREFERENCE_SCHEMA row.

    Raises mmalign.schema.RowError when the row breaks the contract (e.g. empty y-).
    """
    from mmalign.schema import preference_row

    meta = json.loads(out["meta"] or "{}")
    core = {k: meta.pop(k) for k in ("model_id", "seed", "similarity", "iterations") if k in meta}
    return preference_row(
        id=str(out["id"]),
        prompt=str(out["prompt"]),
        chosen=str(out["chosen"]),
        rejected=str(out["rejected"]),
        images=list(record["images"]),
        source=str(out["source"] or "unknown"),
        method=str(out["method"]),
        rejected_extra=json.loads(out["rejected_extra"] or "[]"),
        meta={**core, "params": meta},
    )
