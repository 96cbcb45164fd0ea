"""The part of a LLaVA that the vLLM engine needs beside vLLM's own language model.

vLLM decodes from prompt embeddings that the HF model computes: the vision tower, the
projector (plus LLaVA-1.6's image_newline) and the text embedding table. The HF copy's
decoder layers and LM head are never used there, and at 7B they are ~13 GB of bf16 on the
GPU beside vLLM's copy of the same weights. `strip_language_model` frees them; any later
HF forward through the language model fails with a message instead of a wrong answer.
"""

from __future__ import annotations

from typing import Any

import torch

# name fragments of the parameters kept: what prompt embeddings are computed from
KEPT = ("vision_tower.", "multi_modal_projector.", "embed_tokens.", "image_newline")


def parameter_bytes(model: Any) -> dict[str, int]:
    """{"full", "embedding_side"} bytes of a LLaVA's parameters (meta tensors count too)."""
    full = side = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        full += n
        side += n if any(k in name for k in KEPT) else 0
    return {"full": full, "embedding_side": side}


class LanguageModelRemoved(RuntimeError):
    """The HF copy was stripped to its embedding side (the vLLM engine decodes)."""


def _refuse(*_: Any, **__: Any) -> None:
    raise LanguageModelRemoved(
        "this HF model keeps only the image-embedding side (vision tower, projector, text "
        "embeddings): the vLLM engine decodes with its own language model. Load the model "
        "again (or use sampler.engine 'hf') for HF scoring or generation."
    )


def strip_language_model(model: Any) -> int:
    """Drop the decoder layers, final norm and LM head of a LLaVA in place; bytes freed.

    The text embedding table stays (prompt embeddings are looked up from it), as do the
    vision tower and projector. The language model's forward then raises
    LanguageModelRemoved."""
    lm = model.model.language_model
    before = parameter_bytes(model)["full"]
    lm.layers = torch.nn.ModuleList()
    lm.norm = torch.nn.Identity()
    model.lm_head = torch.nn.Identity()
    lm.register_forward_pre_hook(_refuse)
    model.mmalign_embedding_side_only = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return before - parameter_bytes(model)["full"]
