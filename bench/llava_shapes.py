"""Random-weight LLaVA models at real shapes, built offline, for throughput / MFU benchmarks.

"llava-7b" is LLaVA-1.5-7B's shape: CLIP ViT-L/14 at 336 px (576 image tokens, features
from the second-to-last layer) + a 2-layer MLP projector + Llama-2-7B (32 layers, hidden
4096, 32 heads, MLP 11008, vocab 32000). "mini" is the same architecture at toy widths
for CPU tests. The "llava-1.6-*" shapes (`NEXT_SHAPES`) are LLaVA-NeXT
(`LlavaNextForConditionalGeneration`, AnyRes tiles): "llava-1.6-7b" is
llava-v1.6-vicuna-7b (Vicuna-7B = Llama-2-7B's shape, CLIP ViT-L/14-336, 7.06 B
parameters), "llava-1.6-34b" is llava-v1.6-34b (Nous-Hermes-2-Yi-34B: hidden 7168, 60
layers, 56 heads, 8 KV heads, MLP 20480, vocab 64000; 34.8 B), "llava-1.6-mini" toy widths.
A `NextShape.image_side` square image fills the 2 x 2 grid pinpoint: a base tile plus 4
grid tiles, 576 + 48 x 48 + 48 newline = 2,928 image tokens at 336-px tiles.
The tokenizer is the tiny models' byte-level BPE (1,024 ids; the vocab rows above it exist
but are never used), so no download is needed; the weights are random: throughput does
not depend on them (random weights seldom emit "." or EOS, so a generation usually runs to
max_new_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class NextShape:
    """A LLaVA-1.6 (AnyRes) shape: LLM + CLIP dims, tiles, grid pinpoints."""

    dims: TinySize
    kv_heads: int
    """LLM key/value heads (grouped-query attention; Yi-34B: 8)."""
    tile: int
    """CLIP input side in pixels (one tile)."""
    patch: int
    image_side: int
    """Side of the square bench image that selects the 2 x 2 pinpoint (5 tiles)."""

    @property
    def pinpoints(self) -> list[list[int]]:
        """LLaVA-1.6's image_grid_pinpoints, in tiles: 1x2, 2x1, 2x2, 1x3, 3x1."""
        t = self.tile
        return [[t, 2 * t], [2 * t, t], [2 * t, 2 * t], [t, 3 * t], [3 * t, t]]


_CLIP_L = {"vision_hidden": 1024, "vision_layers": 24, "vision_intermediate": 4096}
NEXT_SHAPES: dict[str, NextShape] = {
    "llava-1.6-7b": NextShape(
        TinySize(
            text_hidden=4096,
            text_layers=32,
            text_intermediate=11008,
            text_heads=32,
            vocab=32000,
            vision_heads=16,
            vision_feature_layer=-2,
            max_positions=4096,
            **_CLIP_L,
        ),
        kv_heads=32,
        tile=336,
        patch=14,
        image_side=672,
    ),
    "llava-1.6-34b": NextShape(
        TinySize(
            text_hidden=7168,
            text_layers=60,
            text_intermediate=20480,
            text_heads=56,
            vocab=64000,
            vision_heads=16,
            vision_feature_layer=-2,
            max_positions=4096,
            **_CLIP_L,
        ),
        kv_heads=8,
        tile=336,
        patch=14,
        image_side=672,
    ),
    "llava-1.6-mini": NextShape(
        TinySize(
            text_hidden=128,
            text_layers=2,
            text_intermediate=256,
            vision_hidden=64,
            vision_layers=2,
            vision_intermediate=128,
            vision_feature_layer=-2,
        ),
        kv_heads=1,
        tile=28,
        patch=14,
        image_side=56,
    ),
}
ALL_SHAPES = sorted([*SHAPES, *NEXT_SHAPES])


def build_llava(shape: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, or LlavaNextForConditionalGeneration for a
    `NEXT_SHAPES` name, with random weights on `device` in `dtype`; its processor).
    The weights are created on the device directly (a 7B model never touches host memory;
    "meta" builds no weights at all)."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from mmalign.models.tiny_llava import build_processor, llava_config

    if shape in NEXT_SHAPES:
        processor, config = llava_next_parts(NEXT_SHAPES[shape])
        cls: Any = LlavaNextForConditionalGeneration
    elif shape in SHAPES:
        dims, image_size, patch_size = SHAPES[shape]
        processor = build_processor(image_size, patch_size)
        config = llava_config(dims, processor, image_size, patch_size)
        cls = LlavaForConditionalGeneration
    else:
        raise ValueError(f"shape must be one of {ALL_SHAPES}, got {shape!r}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), processor


def llava_next_parts(shape: NextShape) -> tuple[Any, Any]:
    """(LlavaNextProcessor, LlavaNextConfig) of `shape`, built as
    mmalign/models/tiny_llava_next.py builds the tiny one, at this shape's tiles, pinpoints
    and grouped-query attention."""
    from transformers import LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor

    from mmalign.models.tiny_llava import CHAT_TEMPLATE, build_processor, llava_config

    base = build_processor(shape.tile, shape.patch)
    tokenizer = base.tokenizer
    tokenizer.model_max_length = shape.dims.max_positions  # 2,928 image tokens > 1,024
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": shape.tile},
        crop_size={"height": shape.tile, "width": shape.tile},
        image_grid_pinpoints=shape.pinpoints,
        do_center_crop=True,
        do_convert_rgb=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shape.patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=tokenizer.image_token,
        num_additional_image_tokens=1,
    )
    llava = llava_config(shape.dims, base, shape.tile, shape.patch)
    text = llava.text_config
    text.num_key_value_heads = shape.kv_heads
    config = LlavaNextConfig(
        vision_config=llava.vision_config,
        text_config=text,
        image_token_index=llava.image_token_id,
        image_grid_pinpoints=shape.pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=shape.dims.vision_feature_layer,
        image_seq_length=(shape.tile // shape.patch) ** 2,
        tie_word_embeddings=False,
    )
    return processor, config
