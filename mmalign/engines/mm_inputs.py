"""Multimodal inputs with per-row image-token visibility, shared by sampling and scoring.

A LLaVA prompt holds one `<image>` token per image-feature position. BDHS hides most of
them, in one of two semantics (ALGORITHMS.md section 2):

- "mask": hidden positions stay in the sequence with attention-mask 0; every token keeps
  its ORIGINAL position id (0..L-1 over the unpadded row, hidden positions included).
- "drop": hidden rows are removed from inputs_embeds; position ids stay contiguous, so
  the text after the image moves closer to it.

transformers' `generate()` derives position ids as cumsum(attention_mask) - 1, which turns
"mask" into "drop" silently; we therefore always pass position_ids explicitly, and the
same builder serves generation, log-probs and training so all of them agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mmalign.logprobs import _response_ids, to_pil

MaskMode = Literal["mask", "drop"]


@dataclass(frozen=True)
class VLRequest:
    """One row for the engine.

    Attributes:
        prompt: prompt text with the model's image placeholder, ending where the answer
            starts (e.g. tiny_llava.format_prompt(q) = "USER: <image>\\n{q} ASSISTANT:").
        image: a PIL image or encoded image bytes.
        response: answer text after the prompt, without the separator: the prefix to
            continue when generating, the text to score when scoring.
        visible: bool [num_image_tokens], True = image position visible; None = all.
        seed: seeds this row's sampling generator (rows sample independently, so a
            row's output does not depend on its batch).
    """

    prompt: str
    image: Any
    response: str = ""
    visible: np.ndarray | torch.Tensor | None = None
    seed: int = 0


@dataclass
class MMBatch:
    """Left-padded language-model inputs.

    Attributes:
        inputs_embeds: float [B, L, D].
        attention_mask: long [B, L]; 0 on padding and on hidden image positions.
        position_ids: long [B, L]; 0 on padding.
        response_start: long [B], index in L of the first response token (== L when the
            response is empty).
        response_ids: per row, long [T_b] response token ids (separator included).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_start: torch.Tensor
    response_ids: list[torch.Tensor]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def image_features(model: Any, enc: Any) -> Sequence[torch.Tensor]:
    """Per image, the projected features [n_b, D] that replace its `<image>` tokens, from a
    processor output `enc`. Every per-image processor output goes to the model: LLaVA-1.6
    (AnyRes) needs `image_sizes` to unpad its grid tiles and adds a newline feature per
    row of features, so n_b differs between images; LLaVA-1.5 gives the same n for all."""
    device = model_device(model)
    kwargs = {k: v.to(device) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    kwargs["pixel_values"] = kwargs["pixel_values"].to(dtype=model.dtype)
    return model.get_image_features(**kwargs).pooler_output


def count_image_tokens(processor: Any, prompt: str, image: Any) -> int:
    """Image-token positions the processor gives `image` in `prompt` (the length of the
    row's visibility mask): fixed per model for LLaVA-1.5, per image size for AnyRes."""
    enc = processor(images=[to_pil(image)], text=[prompt], return_tensors="pt")
    return int((enc["input_ids"][0] == image_token_id(processor)).sum())


def image_token_id(processor: Any) -> int:
    tok = processor.tokenizer
    return int(tok.convert_tokens_to_ids(processor.image_token))


def build_mm_batch(
    model: Any,
    processor: Any,
    requests: Sequence[VLRequest],
    mask_mode: MaskMode = "mask",
    *,
    separator: str = " ",
    append_eos: bool = False,
) -> MMBatch:
    """Embed prompts + images + responses with the model's own vision tower and projector.

    The response tokens are those of tokenize(prompt + separator + response) after
    tokenize(prompt), exactly as mmalign.logprobs does for training, so generation, scoring
    and training split the text the same way. append_eos adds the tokenizer's EOS after a
    non-empty response (scoring a complete answer). Gradients flow outside no_grad.
    """
    if mask_mode not in ("mask", "drop"):
        raise ValueError(f"mask_mode must be 'mask' or 'drop', got {mask_mode!r}")
    tok = processor.tokenizer
    device = model_device(model)
    enc = processor(
        images=[to_pil(r.image) for r in requests],
        text=[r.prompt for r in requests],
        return_tensors="pt",
        padding=True,
    )
    features = image_features(model, enc)
    embed = model.get_input_embeddings()
    image_token_id = model.config.image_token_id

    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
    response_ids: list[torch.Tensor] = []
    for b, req in enumerate(requests):
        prompt_ids = enc["input_ids"][b][enc["attention_mask"][b].bool()]
        resp = _response_ids(tok, req.prompt, separator + req.response) if req.response else []
        if append_eos and resp:
            resp = [*resp, tok.eos_token_id]
        resp_t = torch.tensor(resp, dtype=torch.long)
        ids = torch.cat([prompt_ids, resp_t]).to(device)
        emb = embed(ids)
        is_image = ids == image_token_id
        n_image = int(is_image.sum())
        feats = features[b].to(emb.dtype)
        if n_image != feats.shape[0]:
            raise ValueError(f"row {b}: {n_image} image tokens but {feats.shape[0]} features")
        emb = emb.masked_scatter(is_image[:, None], feats)
        keep = torch.ones(len(ids), dtype=torch.bool, device=device)
        if req.visible is not None:
            vis = torch.as_tensor(np.asarray(req.visible), dtype=torch.bool, device=device)
            if vis.shape != (n_image,):
                raise ValueError(
                    f"row {b}: visible has shape {tuple(vis.shape)}, want ({n_image},)"
                )
            keep[is_image] = vis
        start = len(prompt_ids)
        if mask_mode == "drop":
            start = int(keep[:start].sum())
            emb, keep = emb[keep], keep[keep]
        positions = torch.arange(len(keep), device=device)
        rows.append((emb, keep.long(), positions, start))
        response_ids.append(resp_t)

    length = max(len(r[1]) for r in rows)
    width = rows[0][0].shape[-1]
    batch = len(rows)
    inputs_embeds = rows[0][0].new_zeros(batch, length, width)
    attention_mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    position_ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    starts = torch.zeros(batch, dtype=torch.long)
    for b, (emb, keep, pos, start) in enumerate(rows):
        pad = length - len(keep)
        inputs_embeds[b, pad:] = emb
        attention_mask[b, pad:] = keep
        position_ids[b, pad:] = pos
        starts[b] = pad + start
    return MMBatch(inputs_embeds, attention_mask, position_ids, starts, response_ids)
