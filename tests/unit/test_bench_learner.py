"""The learner benchmark's FLOP count, its real-shape models and both implementations."""

from __future__ import annotations

import pytest

from bench.flops import LlavaDims, TowerDims, dpo_step_flops, forward_flops, peak_tflops


def test_forward_flops_by_hand() -> None:
    tower = TowerDims(params=10, layers=2, width=4)
    # 2 * 10 * 3 + 4 * 2 * 4 * 3^2 = 348; 2 * 10 * 5 + 4 * 2 * 4 * 5^2 = 900
    assert forward_flops(tower, [3, 5]) == 348 + 900


def test_dpo_step_counts_llm_lora_and_two_vision_forwards() -> None:
    dims = LlavaDims(
        text=TowerDims(10, 2, 4),
        vision=TowerDims(5, 1, 2),
        vision_tokens=2,
        projector_params=7,
        image_tokens=1,
    )
    # LLM at T=3: 6*10*3 + 16*2*4*9 = 1332; LoRA 6*3*3 = 54; vision 2*5*2 + 4*1*2*4 = 52,
    # projector 2*7*1 = 14, both twice
    assert dpo_step_flops(dims, [3], lora_params=3) == 1332 + 54 + 2 * (52 + 14)


def test_peak_is_looked_up_by_device_name() -> None:
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0  # not the SXM part's 989
    assert peak_tflops("cpu") is None


def test_llava_7b_shape_has_llava_1_5_7b_parameter_counts() -> None:
    from bench.flops import llava_dims
    from bench.llava_shapes import build_llava

    model, processor = build_llava("llava-7b", device="meta")  # no memory for the weights
    dims = llava_dims(model)
    assert dims is not None
    # Llama-2-7B: 6,738,415,616 parameters, 32000 x 4096 of them the input embedding.
    assert dims.text == TowerDims(6_738_415_616 - 32000 * 4096, 32, 4096)
    assert dims.vision.layers == 24 and dims.vision.width == 1024
    assert (dims.vision_tokens, dims.image_tokens) == (577, 576)  # ViT-L/14 at 336 px + CLS
    assert dims.projector_params == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert processor.tokenizer.decode([model.config.image_token_index]) == "<image>"
    assert llava_dims(model.model) is None  # not a LLaVA-1.5 layout: no FLOP count


def test_hf_peft_baseline_scores_like_the_learner_and_starts_at_ln2() -> None:
    """The baseline's textbook log-probs equal mmalign's, and with fresh LoRA (B = 0) the
    policy equals the reference, so its first DPO loss is ln 2."""
    import math

    import torch

    from bench.bench_learner import make_rows
    from bench.hf_peft_dpo import HFPeftDPO
    from bench.llava_shapes import build_llava
    from mmalign.logprobs import model_response_logps

    model, processor = build_llava("mini")
    baseline = HFPeftDPO(model, processor, lora_r=4)
    rows = make_rows(2, words=6, seed=0)
    batch = baseline.encode(rows, "chosen")
    with torch.no_grad():
        assert torch.allclose(baseline.logps(batch), model_response_logps(baseline.model, batch))
    assert baseline.step(rows) == pytest.approx(math.log(2), abs=1e-5)
    assert baseline.step(rows) != pytest.approx(math.log(2), abs=1e-5)  # the step trained


@pytest.mark.slow
def test_both_implementations_time_the_same_model_flops_on_cpu() -> None:
    import torch

    from bench.bench_learner import main
    from bench.flops import llava_dims
    from bench.llava_shapes import build_llava

    argv = ["--shape", "mini", "--steps", "1", "--batch-size", "2", "--peak-tflops", "1"]
    argv += ["--dtype", "bfloat16"]
    ours, plain = main([*argv, "--impl", "mmalign"]), main([*argv, "--impl", "hf-peft"])

    assert torch.get_default_dtype() == torch.float32  # restored after the bf16 build
    assert ours["tokens_per_step"] == plain["tokens_per_step"] > 0
    assert ours["trainable_params"] == plain["trainable_params"] > 0  # same LoRA targets
    dims = llava_dims(build_llava("mini")[0])
    assert dims is not None
    # the count is at least the LLM's 6 P T over the step's tokens, plus vision
    floor = 6 * dims.text.params * ours["tokens_per_step"] / 1e12
    assert floor < ours["model_tflops_per_step"] == plain["model_tflops_per_step"] < 2 * floor
    for result in (ours, plain):
        assert result["mfu"] == pytest.approx(result["achieved_tflops"], rel=1e-3)


def test_real_shape_builds_in_bf16_and_restores_the_default_dtype() -> None:
    import torch

    from bench.llava_shapes import build_llava

    model, _ = build_llava("mini", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


def test_hf_peft_baseline_refuses_what_it_does_not_implement() -> None:
    from bench.bench_learner import main

    with pytest.raises(SystemExit):
        main(["--shape", "mini", "--impl", "hf-peft", "--loss", "ipo"])
