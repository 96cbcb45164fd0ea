"""LLaVA-1.6 (AnyRes) shapes of the benchmarks: FLOPs per tile, 5 tiles, 2,928 image tokens."""

from __future__ import annotations

from bench.flops import LlavaDims, TowerDims, dpo_step_flops, llava_dims


def test_vision_and_projector_count_once_per_tile() -> None:
    dims = LlavaDims(
        text=TowerDims(10, 2, 4),
        vision=TowerDims(5, 1, 2),
        vision_tokens=2,
        projector_params=7,
        image_tokens=1,
    )
    # as tests/unit/test_bench_learner.py at T=3, with the vision + projector part
    # (52 + 14, twice) counted for each of 5 tiles
    assert dpo_step_flops(dims, [3], lora_params=3, tiles=[5]) == 1332 + 54 + 5 * 2 * (52 + 14)
    assert dpo_step_flops(dims, [3, 3], tiles=[1, 1]) == dpo_step_flops(dims, [3, 3])


def test_llava_1_6_7b_shape_has_vicuna_7b_dims_5_tiles_and_2928_image_tokens() -> None:
    from PIL import Image

    from bench.bench_learner import image_tiles
    from bench.llava_shapes import NEXT_SHAPES, build_llava
    from mmalign.engines.mm_inputs import count_image_tokens
    from mmalign.logprobs import build_response_batch, default_prompt_text

    model, processor = build_llava("llava-1.6-7b", device="meta")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    dims = llava_dims(model)
    assert dims is not None
    assert dims.text == TowerDims(6_738_415_616 - 32000 * 4096, 32, 4096)  # Vicuna-7B
    assert (dims.vision_tokens, dims.image_tokens) == (577, 576)  # per 336-px tile
    side = NEXT_SHAPES["llava-1.6-7b"].image_side
    image = Image.new("RGB", (side, side), (200, 30, 30))
    prompt = default_prompt_text(processor, "Describe the image.")
    # base tile 576 + 2 x 2 grid of 24 x 24 features + one newline per grid row (48)
    assert count_image_tokens(processor, prompt, image) == 576 + 48 * 48 + 48 == 2928
    enc = build_response_batch(processor, [image], ["Describe the image."], [["A red square."]])
    assert image_tiles(processor, enc) == [5]


def test_llava_1_6_34b_shape_is_yi_34b_with_grouped_query_attention() -> None:
    from bench.llava_shapes import build_llava

    model, _ = build_llava("llava-1.6-34b", device="meta")
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (7168, 60, 20480)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (56, 8, 64000)
    k_proj = model.model.language_model.layers[0].self_attn.k_proj.weight
    assert tuple(k_proj.shape) == (8 * 128, 7168)
