"""The embedding-side byte count at LLaVA-1.6-7B / -34B shapes, on the meta device."""

from __future__ import annotations

import pytest

from bench.bench_embedding_side import KEPT, measure, parameter_bytes
from bench.llava_shapes import build_llava

# Published totals: llava-v1.6-vicuna-7b 7.06 B, llava-v1.6-34b 34.8 B parameters.
KNOWN_TOTALS = {"llava-1.6-7b": 7.06e9, "llava-1.6-34b": 34.8e9}
CLIP_L_336_VISION = 303.5e6  # CLIP ViT-L/14-336 vision model


@pytest.mark.parametrize(
    ("shape", "hidden", "vocab"), [("llava-1.6-7b", 4096, 32000), ("llava-1.6-34b", 7168, 64000)]
)
def test_counts_match_known_totals_and_kept_parts_by_hand(
    shape: str, hidden: int, vocab: int
) -> None:
    r = measure(shape)
    assert r["full_params"] == pytest.approx(KNOWN_TOTALS[shape], rel=0.02)
    assert r["full"] == 2 * r["full_params"]  # bf16
    model, _ = build_llava(shape, device="meta", dtype="bfloat16")
    by_part = {k: 0 for k in KEPT}
    for name, p in model.named_parameters():
        for k in KEPT:
            by_part[k] += p.numel() if k in name else 0
    assert by_part["vision_tower."] == pytest.approx(CLIP_L_336_VISION, rel=0.01)
    assert by_part["embed_tokens."] == vocab * hidden
    assert by_part["multi_modal_projector."] == 1024 * hidden + hidden + hidden * hidden + hidden
    assert by_part["image_newline"] == hidden
    assert r["embedding_side_params"] == sum(by_part.values())
    assert r["embedding_side"] == 2 * r["embedding_side_params"]


def test_gigabytes_held_vs_full_copy() -> None:
    seven, big = measure("llava-1.6-7b"), measure("llava-1.6-34b")
    assert (seven["embedding_side_gb"], seven["full_gb"]) == (0.91, 14.13)
    assert (big["embedding_side_gb"], big["full_gb"]) == (1.64, 69.5)


def test_same_rule_as_mmalign_embedding_side_when_present() -> None:
    side = pytest.importorskip("mmalign.engines.embedding_side")
    model, _ = build_llava("llava-1.6-mini", device="meta")
    assert side.KEPT == KEPT
    ours = parameter_bytes(model)
    assert side.parameter_bytes(model) == {k: ours[k] for k in ("full", "embedding_side")}
