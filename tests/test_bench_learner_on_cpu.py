"""The learner benchmark's FLOP count, its real-shape models and both implementations."""

from __future__ import annotations

import pytest

from bench.flops import TowerDims, dpo_step_flops, forward_flops, peak_tflops


def test_forward_flops_by_hand() -> None:
    tower = TowerDims(params=10, layers=2, width=4)
    # 2 * 10 * 3 + 4 * 2 * 4 * 3^2 = 348; 2 * 10 * 5 + 4 * 2 * 4 * 5^2 = 900
    assert forward_flops(tower, [3, 5]) == 348 + 900


def test_dpo_step_counts_three_llm_and_two_vision_forwards() -> None:
    text, vision = TowerDims(10, 2, 4), TowerDims(5, 1, 2)
    # LLM forward 348 (x3); vision 2*5*2 + 4*1*2*2^2 = 52, projector 2*7*1 = 14 (x2)
    flops = dpo_step_flops(text, [3], vision, vision_tokens=2, projector_params=7, image_tokens=1)
    assert flops == 3 * 348 + 2 * (52 + 14)


def test_peak_is_looked_up_by_device_name() -> None:
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("cpu") is None


def test_llava_7b_shape_has_llava_1_5_7b_parameter_counts() -> None:
    from bench.flops import llava_dims
    from bench.llava_shapes import build_llava

    model, processor = build_llava("llava-7b", device="meta")  # no memory for the weights
    text, vision, vision_tokens, projector, image_tokens = llava_dims(model)
    # Llama-2-7B: 6,738,415,616 parameters, 32000 x 4096 of them the input embedding.
    assert text == TowerDims(6_738_415_616 - 32000 * 4096, 32, 4096)
    assert vision.layers == 24 and vision.width == 1024
    assert (vision_tokens, image_tokens) == (577, 576)  # CLIP ViT-L/14 at 336 px + CLS
    assert projector == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert processor.tokenizer.decode([model.config.image_token_index]) == "<image>"


@pytest.mark.slow
def test_both_implementations_time_the_same_model_flops_on_cpu() -> None:
    from bench.bench_learner import main

    argv = ["--shape", "mini", "--steps", "1", "--batch-size", "2", "--peak-tflops", "1"]
    ours, plain = main([*argv, "--impl", "mmalign"]), main([*argv, "--impl", "hf-peft"])

    assert ours["tokens_per_step"] == plain["tokens_per_step"] > 0
    assert ours["model_tflops_per_step"] == plain["model_tflops_per_step"] > 0
    assert ours["trainable_params"] == plain["trainable_params"] > 0  # same LoRA targets
    for result in (ours, plain):
        assert result["mfu"] == pytest.approx(result["achieved_tflops"], rel=1e-3)


def test_hf_peft_baseline_refuses_what_it_does_not_implement() -> None:
    from bench.bench_learner import main

    with pytest.raises(SystemExit):
        main(["--shape", "mini", "--impl", "hf-peft", "--loss", "ipo"])
