"""The BDHS engine: rejected answers y- for prompt rows (BDHS, BDHS-noise, POVID).

One engine for both hosts: the Ray Data operator (operators/bdhs.py, offline BDHS) and the
online sampler (actors/online.py, mode online-bdhs, on the policy's engine that holds the
synced LoRA weights). It owns what a row needs between the prompt record and the pure
algorithm (mmalign.bdhs): the prompt text, the image decode, the length check, the noise,
batched sampling across rows, POVID's teacher-forced rows and a per-row error instead of a
failed batch. Built from the config sections as they are (sampler, bdhs), a generation
engine (HF or vLLM) and an embed function (the similarity gate; None for POVID).

Variants (ALGORITHMS.md sections 2-3):
- "bdhs": mmalign.bdhs on the clean image with masked image tokens.
- "bdhs-noise": the same on the POVID-noised image.
- "povid": teacher-forced argmax of the policy over y+ on the noisy image (no masking).
For the two noise variants noise_steps = 0 means POVID's 500 (a noise variant without
noise is a configuration mistake, not a request); `params()` records the effective value.

Every row's randomness (mask, cuts, swaps, noise, sampling) comes from its own seed, so a
row's result does not depend on the other rows of its batch (greedy decoding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmalign.config import BDHSConfig, SamplerConfig
from mmalign.engines.hf_generation import SamplingSettings

POVID_NOISE_STEPS = 500

# {rejected, meta, error} of one row; error "" = usable.
RowResult = dict[str, Any]


def image_noise_steps(bdhs: BDHSConfig) -> int:
    """Diffusion step applied to the image: 0 for 'bdhs', else noise_steps (0 = POVID's 500)."""
    if bdhs.variant == "bdhs":
        return 0
    return bdhs.noise_steps or POVID_NOISE_STEPS


def sentence_embedder(bdhs: BDHSConfig, device: str) -> Any:
    """The similarity gate's embedder loaded in this process (bdhs.embedder)."""
    from mmalign.engines.embedder import SentenceEmbedder

    return SentenceEmbedder(bdhs.embedder, device=device, batch_size=bdhs.embed_batch_size)


@dataclass(frozen=True)
class BDHSRow:
    """One row ready to sample: chat-formatted prompt text, decoded image, y+, row seed."""

    prompt_text: str
    image: Any
    reference: str
    seed: int
    n_image: int = 0  # image-token positions of this row (its visibility mask's length)


class BDHSEngine:
    """y- for prepared rows under `engine`'s current weights.

    Args:
        engine: a generation engine (HFGenerationEngine or VLLMGenerationEngine; POVID needs
            HF's teacher_forced_argmax).
        embed_fn: texts -> float [n, d]; None only for variant "povid" (no gate).
        sampler: max_new_tokens caps every continuation (and the unguided final try).
        bdhs: the variant and its knobs (rho_th, n_bdhs, eps_s, swap_prob, noise_steps,
            mask_mode, splitter, temperature, seed).
    """

    def __init__(
        self,
        engine: Any,
        embed_fn: Callable[[list[str]], np.ndarray] | None,
        sampler: SamplerConfig,
        bdhs: BDHSConfig,
    ) -> None:
        from mmalign.bdhs import split_sentences_regex, split_sentences_spacy

        bdhs.validate("bdhs")
        if embed_fn is None and bdhs.variant != "povid":
            raise ValueError(f"bdhs.variant {bdhs.variant!r} needs an embedder (the gate)")
        self.engine, self.embed_fn, self.bdhs = engine, embed_fn, bdhs
        self.max_batch_errors = sampler.max_batch_errors
        self.noise_steps = image_noise_steps(bdhs)
        # guided continuations stop at the first full stop (SamplingSettings' default)
        self.sampling = SamplingSettings(
            max_new_tokens=sampler.max_new_tokens,
            temperature=bdhs.temperature,
            mask_mode=bdhs.mask_mode,  # type: ignore[arg-type]
        )
        self.splitter = split_sentences_spacy if bdhs.splitter == "spacy" else split_sentences_regex
        text_cfg = getattr(engine.model.config, "text_config", engine.model.config)
        self.max_positions = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)

    def params(self) -> dict[str, Any]:
        """The knobs that made a row (recorded in its meta); noise_steps is the effective one."""
        b = self.bdhs
        return {
            "rho_th": b.rho_th,
            "n_bdhs": b.n_bdhs,
            "eps_s": b.eps_s,
            "noise_steps": self.noise_steps,
            "mask_mode": b.mask_mode,
            "swap_prob": b.swap_prob,
            "seed": b.seed,
            "variant": b.variant,
        }

    # ------------------------------------------------------------------ row preparation

    def prepare(self, prompt: str, image: Any, reference: str, seed: int) -> BDHSRow | str:
        """A BDHSRow, or the reason the row cannot be sampled (empty y+, unreadable image,
        prompt too long). image: encoded bytes, {bytes, path} or PIL."""
        from mmalign.logprobs import default_prompt_text, to_pil

        reference = reference.strip()
        if not reference:
            return "reference: empty (BDHS and POVID need y+)"
        try:
            pil = to_pil(image)
        except Exception as err:  # noqa: BLE001 - any decode failure is a row error
            return f"images: unreadable ({type(err).__name__}: {err})"[:300]
        text = default_prompt_text(self.engine.processor, prompt)
        n_image = self.engine.image_token_count(text, pil)
        return self._too_long(text, reference, n_image) or BDHSRow(
            text, pil, reference, seed, n_image
        )

    def _too_long(self, prompt_text: str, reference: str, n_image: int) -> str:
        """'' when prompt + image features + y+ + new tokens fit the model, else the reason."""
        if not self.max_positions:
            return ""
        tok = self.engine.tokenizer
        n_text = len(tok(prompt_text + " " + reference, add_special_tokens=True)["input_ids"])
        # the single image placeholder expands to the row's n_image positions
        total = n_text - 1 + n_image + self.sampling.max_new_tokens
        if total > self.max_positions:
            return f"prompt: too long ({total} positions > {self.max_positions})"
        return ""

    def _noisy(self, image: Any, seed: int) -> Any:
        if self.noise_steps == 0:
            return image
        import torch

        from mmalign.noise import noisy_pil_image

        return noisy_pil_image(image, self.noise_steps, torch.Generator().manual_seed(seed))

    # ------------------------------------------------------------------ sampling

    def sample(self, rows: Sequence[BDHSRow], batched: bool = True) -> list[RowResult]:
        """One {rejected, meta, error} per row, in order. batched: all rows step through the
        tries together (mmalign.bdhs.bdhs_sample_batch); False: one row at a time
        (bdhs_sample, the reference loop). A crash fails only the rows that cause it,
        unless most of the batch fails the same way: then SystematicFailure
        (sampler.max_batch_errors) ends the job with that error."""
        from mmalign.quarantine import check_batch

        if self.bdhs.variant == "povid":
            out = _guarded(self._povid_rows, list(rows))
        elif batched:
            out = _guarded(self._bdhs_rows, list(rows))
        else:
            out = [_guarded_one(self._bdhs_row, row) for row in rows]
        check_batch([r["error"] for r in out], self.max_batch_errors, f"BDHS ({self.bdhs.variant})")
        return out

    def _bdhs_row(self, row: BDHSRow) -> RowResult:
        from mmalign.bdhs import bdhs_sample

        generate_fn = self.engine.bdhs_generate_fn(
            row.prompt_text, self._noisy(row.image, row.seed), self.sampling, seed=row.seed % 2**31
        )
        assert self.embed_fn is not None
        res = bdhs_sample(
            row.reference,
            generate_fn,
            self.embed_fn,
            np.random.default_rng(row.seed),
            self.bdhs,
            num_image_positions=row.n_image,
            splitter=self.splitter,
        )
        return result_row(res, row.n_image)

    def _bdhs_rows(self, rows: list[BDHSRow]) -> list[RowResult]:
        from mmalign.bdhs import bdhs_sample_batch

        gen_rows = [(r.prompt_text, self._noisy(r.image, r.seed), r.seed % 2**31) for r in rows]
        assert self.embed_fn is not None
        results = bdhs_sample_batch(
            [r.reference for r in rows],
            self.engine.bdhs_batch_generate_fn(gen_rows, self.sampling),
            self.embed_fn,
            [np.random.default_rng(r.seed) for r in rows],
            self.bdhs,
            num_image_positions=[r.n_image for r in rows],
            splitter=self.splitter,
        )
        return [result_row(res, r.n_image) for res, r in zip(results, rows)]

    def _povid_rows(self, rows: list[BDHSRow]) -> list[RowResult]:
        from mmalign.engines.mm_inputs import VLRequest

        reqs = [
            VLRequest(
                r.prompt_text, self._noisy(r.image, r.seed), r.reference, None, r.seed % 2**31
            )
            for r in rows
        ]
        outs = self.engine.teacher_forced_argmax(reqs, self.bdhs.mask_mode)
        return [_checked(o.text.strip(), {"iterations": 1}, "") for o in outs]


def result_row(res: Any, image_tokens: int) -> RowResult:
    """A mmalign.bdhs.BDHSResult -> {rejected, meta, error} of one row; `image_tokens` is
    the row's image-token count, the denominator of its mask density."""
    meta = {
        "image_tokens": image_tokens,
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
    return _checked(res.rejected, meta, error)


def _checked(rejected: str, meta: dict[str, Any], error: str) -> RowResult:
    # an empty y- is no preference pair, whatever the gate said
    return {
        "rejected": rejected,
        "meta": meta,
        "error": error or ("" if rejected else "rejected: empty"),
    }


def _guarded_one(fn: Callable[[Any], RowResult], row: Any) -> RowResult:
    """fn(row), or an error row when it raises (one bad row must not fail the batch)."""
    try:
        return fn(row)
    except Exception as err:  # noqa: BLE001
        return {
            "rejected": "",
            "meta": {},
            "error": f"generation: {type(err).__name__}: {err}"[:300],
        }


def _guarded(fn: Callable[[list[Any]], list[RowResult]], rows: list[Any]) -> list[RowResult]:
    """Batched fn(rows); on failure retry row by row so only the bad rows get an error."""
    if not rows:
        return []
    try:
        return fn(rows)
    except Exception:  # noqa: BLE001
        return [_guarded_one(lambda r: fn([r])[0], r) for r in rows]
