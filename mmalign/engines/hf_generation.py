"""Hugging Face generation engine for LLaVA-style models, with image-token visibility masks.

We run our own decode loop over the language model (inputs_embeds + explicit position_ids
+ KV cache) instead of `model.generate`, because generate() recomputes position ids from
the attention mask and so cannot express the "mask" semantics BDHS needs (see
mm_inputs.py). With every image position visible the loop reproduces generate()'s greedy
output token for token (tests/unit/test_hf_generation.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from mmalign.bdhs import BatchGenerateFn, ContinuationRequest, GenerateFn, cut_at_sentence_end
from mmalign.engines.mm_inputs import (
    MaskMode,
    MMBatch,
    VLRequest,
    build_mm_batch,
    count_image_tokens,
    model_device,
)

if TYPE_CHECKING:
    from mmalign.config import SamplerConfig

FinishReason = Literal["stop", "eos", "length"]


@dataclass(frozen=True)
class SamplingSettings:
    """Decoding knobs for one generate() call (a value object, not user config: built from
    the validated config sections, SamplingSettings.for_sampler or the BDHS engine, or by
    code with fixed values, so it does not validate again).

    Attributes:
        max_new_tokens: hard cap on generated tokens per row.
        temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling mass (1.0 = off); ignored when greedy.
        stop_strings: a row stops at the first of these that ends a sentence in its
            generated text (followed by whitespace, not closing an abbreviation: see
            mmalign.bdhs.cut_at_sentence_end; the text is cut after it, so "2.5" or
            "e.g." never cut a sentence). () = stop only at EOS / length.
        mask_mode: "mask" or "drop", how hidden image positions are removed.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = (".",)
    mask_mode: MaskMode = "mask"

    @classmethod
    def for_sampler(cls, sampler: SamplerConfig) -> SamplingSettings:
        """The online samplers' decoding (config section `sampler`): no stop strings."""
        return cls(sampler.max_new_tokens, sampler.temperature, sampler.top_p, stop_strings=())


@dataclass(frozen=True)
class GenerationOutput:
    """New text of one row (prefix excluded), its token ids and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Next token per row. logits: float [B, V]; returns long [B].

    Each row draws from its own generator so its sample does not depend on the batch.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top one stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.cat(
        [torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)]
    )


def ids_for_cut(ids: list[int], cut: str, tokenizer: Any) -> list[int]:
    """The shortest prefix of `ids` whose text still holds `cut`: the token generated past a
    sentence end (to see the whitespace after it) is dropped again."""
    ids = list(ids)
    while len(ids) > 1 and tokenizer.decode(ids[:-1], skip_special_tokens=True).startswith(cut):
        ids.pop()
    return ids


class HFGenerationEngine:
    """Owns a LLaVA model + processor; batched masked generation and teacher-forced scoring.

    Args:
        model: a LlavaForConditionalGeneration (or a PEFT wrapper of one), in eval mode.
        processor: its LlavaProcessor (tokenizer with left padding).
        separator: text between the prompt and the response (" " in LLaVA-1.5 format).
        eos_token_ids: ids that end a row; default the tokenizer's EOS plus the model's
            generation_config.eos_token_id (an int or a list in HF checkpoints).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        separator: str = " ",
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.separator = separator
        self.device = model_device(model)
        if eos_token_ids is None:
            cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            cfg_list = cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]
            eos_token_ids = [i for i in [self.tokenizer.eos_token_id, *cfg_list] if i is not None]
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)

    @classmethod
    def from_pretrained(cls, path: str, **load_kwargs: Any) -> HFGenerationEngine:
        """Load through mmalign.models.loading.load_model(path, **load_kwargs)."""
        from mmalign.models.loading import load_model

        model, processor = load_model(path, **load_kwargs)
        return cls(model, processor)

    def image_token_count(self, prompt_text: str, image: Any) -> int:
        """Image-feature positions of `image` in `prompt_text` (the length of its
        visibility mask): the processor's own expansion, so LLaVA-1.6 AnyRes rows get their
        tile and newline tokens counted, not `config.image_seq_length`."""
        return count_image_tokens(self.processor, prompt_text, image)

    def _batch(self, requests: Sequence[VLRequest], mode: MaskMode, eos: bool) -> MMBatch:
        return build_mm_batch(
            self.model, self.processor, requests, mode, separator=self.separator, append_eos=eos
        )

    @torch.inference_mode()
    def generate(
        self, requests: Sequence[VLRequest], settings: SamplingSettings = SamplingSettings()
    ) -> list[GenerationOutput]:
        """Continue prompt + (masked) image + separator + request.response for every row."""
        if not requests:
            return []
        batch = self._batch(requests, settings.mask_mode, eos=False)
        gens = [torch.Generator(device=self.device).manual_seed(r.seed) for r in requests]
        n = len(requests)
        attention = batch.attention_mask
        next_pos = batch.position_ids.max(dim=1).values + 1
        new_ids: list[list[int]] = [[] for _ in range(n)]
        texts: list[str | None] = [None] * n
        reasons: list[FinishReason | None] = [None] * n

        out = self.model(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=attention,
            position_ids=batch.position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        for step in range(settings.max_new_tokens):
            tokens = sample_next(out.logits[:, -1], settings.temperature, settings.top_p, gens)
            for b, tok in enumerate(tokens.tolist()):
                if reasons[b] is not None:
                    continue
                if tok in self.eos_token_ids:
                    reasons[b] = "eos"
                    continue
                new_ids[b].append(tok)
                text = self.tokenizer.decode(new_ids[b], skip_special_tokens=True)
                cut = cut_at_sentence_end(text, settings.stop_strings)
                if cut is not None:
                    texts[b], reasons[b] = cut, "stop"
                    new_ids[b] = ids_for_cut(new_ids[b], cut, self.tokenizer)
                elif step + 1 == settings.max_new_tokens:
                    reasons[b] = "length"
            if all(r is not None for r in reasons):
                break
            attention = torch.cat([attention, attention.new_ones(n, 1)], dim=1)
            out = self.model(
                inputs_embeds=self.model.get_input_embeddings()(tokens[:, None]),
                attention_mask=attention,
                position_ids=next_pos[:, None],
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            next_pos = next_pos + 1
        return [
            GenerationOutput(
                text if text is not None else self.tokenizer.decode(ids, skip_special_tokens=True),
                ids,
                reason or "length",
            )
            for text, ids, reason in zip(texts, new_ids, reasons)
        ]

    def bdhs_generate_fn(
        self, prompt: str, image: Any, settings: SamplingSettings, seed: int = 0
    ) -> GenerateFn:
        """Adapt this engine to mmalign.bdhs.bdhs_sample for one (prompt, image) sample.

        Guided requests stop at settings.stop_strings (the first full stop by default); the
        unguided final try stops only at EOS / max_new_tokens. For the "noise" variant pass
        an already-noised image (mmalign.noise).
        """
        unguided = SamplingSettings(
            settings.max_new_tokens, settings.temperature, settings.top_p, (), settings.mask_mode
        )

        def generate_fn(requests: Sequence[ContinuationRequest]) -> list[str]:
            rows = [VLRequest(prompt, image, r.response_prefix, r.visible, seed) for r in requests]
            guided = all(r.stop_at_full_stop for r in requests)
            if not guided and any(r.stop_at_full_stop for r in requests):
                raise ValueError("mixing guided and unguided requests in one batch")
            return [o.text for o in self.generate(rows, settings if guided else unguided)]

        return generate_fn

    def bdhs_batch_generate_fn(
        self, rows: Sequence[tuple[str, Any, int]], settings: SamplingSettings
    ) -> BatchGenerateFn:
        """Adapt this engine to mmalign.bdhs.bdhs_sample_batch for n (prompt, image, seed) rows.

        Each (row, request) becomes one VLRequest of that row's prompt, image and seed, so
        the sentences of all open rows go through one generate() call. Same stop rules as
        bdhs_generate_fn.
        """
        unguided = SamplingSettings(
            settings.max_new_tokens, settings.temperature, settings.top_p, (), settings.mask_mode
        )

        def generate_fn(requests: Sequence[tuple[int, ContinuationRequest]]) -> list[str]:
            reqs = [
                VLRequest(rows[i][0], rows[i][1], r.response_prefix, r.visible, rows[i][2])
                for i, r in requests
            ]
            guided = all(r.stop_at_full_stop for _, r in requests)
            if not guided and any(r.stop_at_full_stop for _, r in requests):
                raise ValueError("mixing guided and unguided requests in one batch")
            return [o.text for o in self.generate(reqs, settings if guided else unguided)]

        return generate_fn

    def _response_logits(
        self, requests: Sequence[VLRequest], mask_mode: MaskMode, append_eos: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per row: logits float [T_b, V] predicting each response token, and the tokens [T_b]."""
        batch = self._batch(requests, mask_mode, eos=append_eos)
        logits = self.model(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits
        rows = []
        for b, ids in enumerate(batch.response_ids):
            start = int(batch.response_start[b])
            rows.append(logits[b, start - 1 : start - 1 + len(ids)].float())
        return rows, batch.response_ids

    @torch.inference_mode()
    def continuation_logprobs(
        self, requests: Sequence[VLRequest], mask_mode: MaskMode = "mask", append_eos: bool = False
    ) -> list[torch.Tensor]:
        """Per row, float [T_b] log-probs (CPU) of the response tokens given prompt + image.

        Sum a row for logp(y | x). append_eos scores the EOS that ends a complete answer.
        """
        rows, ids = self._response_logits(requests, mask_mode, append_eos)
        return [
            torch.log_softmax(r, dim=-1).gather(-1, t.to(r.device)[:, None])[:, 0].cpu()
            for r, t in zip(rows, ids)
        ]

    @torch.inference_mode()
    def teacher_forced_argmax(
        self, requests: Sequence[VLRequest], mask_mode: MaskMode = "mask"
    ) -> list[GenerationOutput]:
        """POVID hallucination: run the model over y+ (request.response) and take the argmax
        token at every response position. Pass the noisy image in request.image.

        Returns per row the argmax tokens (same count as y+'s tokens, EOS included) decoded.
        """
        rows, _ = self._response_logits(requests, mask_mode, append_eos=True)
        outs = []
        for r in rows:
            ids = r.argmax(-1).tolist()
            # keep the text up to the first EOS the model predicts
            ends = [k for k, t in enumerate(ids) if t in self.eos_token_ids]
            kept = ids[: ends[0]] if ends else ids
            reason: FinishReason = "eos" if ends else "length"
            outs.append(
                GenerationOutput(self.tokenizer.decode(kept, skip_special_tokens=True), ids, reason)
            )
        return outs
