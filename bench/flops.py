"""Model FLOPs of a LLaVA preference-training step, for MFU (pure arithmetic, no torch).

Counting follows PaLM's MFU (Chowdhery et al. 2022, appendix B): a forward pass over a
sequence of T tokens costs 2 * P * T for the matrix multiplies of a transformer with P
non-embedding parameters (the LM head counts, the embedding lookup does not) plus
4 * L * d * T^2 for attention scores and values (L layers, width d, causal mask ignored);
a backward pass costs 2 x the forward (input and weight gradients).

One LoRA DPO step on a pair does, per sequence (chosen, rejected):
- LLM, policy: forward, then backward through the frozen weights (input gradients only:
  1 x their forward) and through attention (no weights: 2 x its forward);
  reference: forward with the adapters off. Total 6 * P * T + 16 * L * d * T^2.
- LoRA (policy only): forward and full backward, 6 * P_lora * T.
- vision tower + projector: forward in the policy pass and in the reference pass, no
  backward (both frozen): 2 x their forward. LLaVA-1.6 (AnyRes) runs them once per tile
  (a base tile plus the grid tiles; attention within a tile); the LLM's lengths already
  hold the unpadded grid features and newline tokens.
MFU = these FLOPs / (step time * the device's dense peak). Recomputation (gradient
checkpointing) and an implementation's extra passes are not model FLOPs: the same count is
used for every implementation of the step, so MFU compares them directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Dense bf16 peak (no sparsity), TFLOP/s, matched in this order as a substring of the CUDA
# device name (so the PCIe / NVL H100s come before the SXM one).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
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


@dataclass(frozen=True)
class LlavaDims:
    """What the FLOP count needs of a single-image LLaVA (LLaVA-1.5 or 1.6 layout)."""

    text: TowerDims
    vision: TowerDims
    vision_tokens: int
    """Tokens the vision tower sees per image tile (patches + CLS)."""
    projector_params: int
    image_tokens: int
    """Projector outputs per image tile (LLaVA-1.5: the LLM's image tokens)."""


def forward_flops(tower: TowerDims, lengths: Sequence[int]) -> float:
    """PaLM forward FLOPs of `tower` over sequences of the given (unpadded) lengths."""
    return float(
        sum(2 * tower.params * t + 4 * tower.layers * tower.width * t * t for t in lengths)
    )


def dpo_step_flops(
    dims: LlavaDims,
    text_lengths: Sequence[int],
    lora_params: int = 0,
    tiles: Sequence[int] | None = None,
) -> float:
    """Model FLOPs of one LoRA preference step over the given sequences, each with one image
    (module doc): LLM 6PT + 16LdT^2, LoRA 6 P_lora T, vision + projector 2 x forward.
    tiles: per sequence, the image's tiles (LLaVA-1.6 AnyRes); None = 1 each (LLaVA-1.5)."""
    text, n = dims.text, len(text_lengths)
    if tiles is not None and len(tiles) != n:
        raise ValueError(f"{len(tiles)} tile counts for {n} sequences")
    n_tiles = n if tiles is None else int(sum(tiles))
    llm = sum(
        6 * text.params * t + 16 * text.layers * text.width * t * t + 6 * lora_params * t
        for t in text_lengths
    )
    vision = forward_flops(dims.vision, [dims.vision_tokens] * n_tiles)
    vision += 2.0 * dims.projector_params * dims.image_tokens * n_tiles
    return float(llm) + 2.0 * vision


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known accelerator (by name), else None."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def llava_dims(model: object) -> LlavaDims | None:
    """The dims of a `LlavaForConditionalGeneration` or `LlavaNextForConditionalGeneration`
    (before LoRA is injected), per image tile, from its parameters and config; None for
    other classes. LLaVA-1.6's tiles per image depend on the image: `dpo_step_flops` takes
    them per sequence."""
    if type(model).__name__ not in (
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
    ):
        return None
    cfg = model.config  # type: ignore[attr-defined]
    named = dict(model.named_parameters())  # type: ignore[attr-defined]

    def total(predicate) -> int:  # noqa: ANN001
        return sum(p.numel() for n, p in named.items() if predicate(n))

    text_params = total(lambda n: "language_model" in n and "embed_tokens" not in n)
    text_params += total(lambda n: n.startswith("lm_head") or ".lm_head." in n)
    vision_params = total(lambda n: "vision_tower" in n and "position_embedding" not in n)
    tc, vc = cfg.text_config, cfg.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    return LlavaDims(
        text=TowerDims(text_params, tc.num_hidden_layers, tc.hidden_size),
        vision=TowerDims(vision_params, vc.num_hidden_layers, vc.hidden_size),
        vision_tokens=patches + 1,
        projector_params=total(lambda n: "multi_modal_projector" in n),
        image_tokens=patches,
    )
