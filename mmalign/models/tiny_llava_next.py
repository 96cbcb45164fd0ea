"""Tiny random-weight LLaVA-1.6 (LLaVA-NeXT, AnyRes), built fully offline.

A real `LlavaNextForConditionalGeneration` + `LlavaNextProcessor` pair at toy widths: the
processor tiles each image on the best-fitting `image_grid_pinpoints` resolution (a base
tile plus grid tiles), and the prompt holds a *different* number of image tokens per image
(base tile, unpadded grid features and one newline token per feature row), exactly the
shapes a LLaVA-1.6 checkpoint produces. Tests use it to prove every role handles AnyRes
rows; it is never trained.
"""

from __future__ import annotations

from mmalign.models.tiny_llava import CHAT_TEMPLATE, SIZES, build_processor, llava_config

TILE = 16  # pixels per tile side (the CLIP tower's image_size)
PATCH = 4  # CLIP patch side: (16 / 4) ** 2 = 16 features per tile
PINPOINTS = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]


def build_llava_next_processor(tile: int = TILE, patch: int = PATCH):  # noqa: ANN201
    """LlavaNextProcessor with the tiny tokenizer and an AnyRes image processor."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    tokenizer = build_processor(tile, patch).tokenizer
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=PINPOINTS,
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=tokenizer.image_token,
        num_additional_image_tokens=1,
    )


def build_tiny_llava_next(size: str = "small", seed: int = 0):  # noqa: ANN201
    """(LlavaNextForConditionalGeneration in float32, LlavaNextProcessor), random weights."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    processor = build_llava_next_processor()
    base = llava_config(SIZES[size], processor, TILE, PATCH)
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=base.image_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=base.vision_feature_layer,
        image_seq_length=(TILE // PATCH) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).to(torch.float32).eval()  # type: ignore[arg-type]
    tok = processor.tokenizer
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor
