"""Random-weight LLaVA models at real shapes, built offline, for throughput / MFU benchmarks.

"llava-7b" is LLaVA-1.5-7B's shape: CLIP ViT-L/14 at 336 px (576 image tokens, features
from the second-to-last layer) + a 2-layer MLP projector + Llama-2-7B (32 layers, hidden
4096, 32 heads, MLP 11008, vocab 32000). "mini" is the same architecture at toy widths
for CPU tests. The tokenizer is the tiny models' byte-level BPE (1,024 ids; the vocab
rows above it exist but are never used), so no download is needed; the weights are
random: throughput does not depend on them.
"""

from __future__ import annotations

from typing import Any

from mmalign.models.tiny_llava import TinySize

# name -> (dims, image size, patch size)
SHAPES: dict[str, tuple[TinySize, int, int]] = {
    "llava-7b": (
        TinySize(
            text_hidden=4096,
            text_layers=32,
            text_intermediate=11008,
            text_heads=32,
            vocab=32000,
            vision_hidden=1024,
            vision_layers=24,
            vision_intermediate=4096,
            vision_heads=16,
            vision_feature_layer=-2,
            max_positions=4096,
        ),
        336,
        14,
    ),
    "mini": (
        TinySize(
            text_hidden=256,
            text_layers=2,
            text_intermediate=512,
            vocab=2048,
            vision_hidden=128,
            vision_layers=2,
            vision_intermediate=256,
            vision_feature_layer=-2,
        ),
        56,
        14,
    ),
}


def build_llava(shape: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration with random weights on `device` in `dtype`, processor).
    The weights are created on the device directly (a 7B model never touches host memory;
    "meta" builds no weights at all)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from mmalign.models.tiny_llava import build_processor, llava_config

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    dims, image_size, patch_size = SHAPES[shape]
    processor = build_processor(image_size, patch_size)
    config = llava_config(dims, processor, image_size, patch_size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), processor
