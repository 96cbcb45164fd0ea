"""Model FLOPs of a LLaVA preference-training step, for MFU (pure arithmetic, no torch).

Counting follows PaLM's MFU (Chowdhery et al. 2022, appendix B): a forward pass over a
sequence of T tokens costs 2 * P * T for the matrix multiplies of a transformer with P
non-embedding parameters (the LM head counts, the embedding lookup does not) plus
4 * L * d * T^2 for attention scores and values (L layers, width d, causal mask ignored).

One LoRA DPO step on a pair does, per sequence (chosen, rejected):
- the policy forward (1 x the LLM forward), the policy backward through the frozen LLM
  (input gradients only: 1 x; the LoRA weights' own gradients are negligible) and the
  reference forward (1 x): 3 x the LLM forward;
- the vision tower + projector forward in the policy pass and in the reference pass, no
  backward (both frozen): 2 x their forward.
MFU = these FLOPs / (step time * the device's dense peak). Recomputation (gradient
checkpointing) and the other implementations' extra passes are not model FLOPs: the same
count is used for every implementation of the step, so MFU compares them directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Dense bf16 peak (no sparsity), TFLOP/s, matched as a substring of the CUDA device name.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}


@dataclass(frozen=True)
class TowerDims:
    """One transformer: non-embedding parameters (matmuls: LM head / patch projection
    included), layers and width."""

    params: int
    layers: int
    width: int


def forward_flops(tower: TowerDims, lengths: Sequence[int]) -> float:
    """PaLM forward FLOPs of `tower` over sequences of the given (unpadded) lengths."""
    return float(
        sum(2 * tower.params * t + 4 * tower.layers * tower.width * t * t for t in lengths)
    )


def dpo_step_flops(
    text: TowerDims,
    text_lengths: Sequence[int],
    vision: TowerDims,
    vision_tokens: int,
    projector_params: int,
    image_tokens: int,
) -> float:
    """Model FLOPs of one LoRA preference step over the given sequences (each with one
    image): 3 x the LLM forward + 2 x the vision tower and projector forward (module doc).
    `vision_tokens`: tokens the vision tower sees per image (patches + CLS);
    `image_tokens`: projector outputs per image (the LLM's image tokens)."""
    n = len(text_lengths)
    vision_fwd = forward_flops(vision, [vision_tokens] * n)
    vision_fwd += 2.0 * projector_params * image_tokens * n
    return 3.0 * forward_flops(text, text_lengths) + 2.0 * vision_fwd


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known accelerator (by name), else None."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def llava_dims(model: object) -> tuple[TowerDims, TowerDims, int, int, int]:
    """(text tower, vision tower, vision tokens per image, projector params, image tokens
    per image) of a `LlavaForConditionalGeneration`, from its parameters and config: the
    arguments of `dpo_step_flops` around its `text_lengths`."""
    cfg = model.config  # type: ignore[attr-defined]
    named = dict(model.named_parameters())  # type: ignore[attr-defined]

    def total(predicate) -> int:  # noqa: ANN001
        return sum(p.numel() for n, p in named.items() if predicate(n))

    text_params = total(lambda n: "language_model" in n and "embed_tokens" not in n)
    text_params += total(lambda n: n.startswith("lm_head") or ".lm_head." in n)
    vision_params = total(lambda n: "vision_tower" in n and "position_embedding" not in n)
    projector = total(lambda n: "multi_modal_projector" in n)
    tc, vc = cfg.text_config, cfg.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    return (
        TowerDims(text_params, tc.num_hidden_layers, tc.hidden_size),
        TowerDims(vision_params, vc.num_hidden_layers, vc.hidden_size),
        patches + 1,
        projector,
        patches,
    )
