"""Random-weight LLaVA models at real shapes, built offline, for throughput / MFU benchmarks.

"llava-7b" is LLaVA-1.5-7B's shape: CLIP ViT-L/14 at 336 px (576 image tokens, features
from the second-to-last layer) + a 2-layer MLP projector + Llama-2-7B (32 layers, hidden
4096, 32 heads, MLP 11008, vocab 32000). "mini" is the same architecture at toy widths
for CPU tests. The tokenizer is the tiny models' byte-level BPE (1,024 ids; the vocab
rows above it exist but are never used), so no download is needed; the weights are
random: throughput does not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LlavaShape:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int


SHAPES: dict[str, LlavaShape] = {
    "llava-7b": LlavaShape(4096, 32, 32, 11008, 32000, 1024, 24, 16, 4096, 336, 14),
    "mini": LlavaShape(256, 2, 4, 512, 2048, 128, 2, 2, 256, 56, 14),
}


def build_llava(shape: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration with random weights on `device` in `dtype`, processor).
    The weights are created on the device directly (a 7B model never touches host memory)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from mmalign.models.tiny_llava import build_processor
    from mmalign.models.tiny_tokenizer import IMAGE

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    s = SHAPES[shape]
    processor = build_processor(s.image_size, s.patch_size)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=s.vision_hidden,
        intermediate_size=s.vision_intermediate,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
        projection_dim=s.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=max(s.vocab, len(tok)),
        hidden_size=s.text_hidden,
        intermediate_size=s.text_intermediate,
        num_hidden_layers=s.text_layers,
        num_attention_heads=s.text_heads,
        num_key_value_heads=s.text_heads,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=int(tok.convert_tokens_to_ids(IMAGE)),
        image_seq_length=(s.image_size // s.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), processor
