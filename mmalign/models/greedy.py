"""Batched greedy answers for calibration and quick checks, through the project's engine.

A thin adapter from (PNG bytes, question) pairs to `HFGenerationEngine.generate` (greedy,
"mask" semantics: a hidden image position gets attention 0 and every other position
keeps its place), so training scripts evaluate with exactly the decoding the pipelines use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mmalign.engines.hf_generation import HFGenerationEngine, SamplingSettings
from mmalign.engines.mm_inputs import VLRequest
from mmalign.models.tiny_llava import format_prompt


def generate_greedy(
    model,  # noqa: ANN001 (LlavaForConditionalGeneration)
    processor,  # noqa: ANN001 (LlavaProcessor)
    items: Sequence[tuple[bytes, str]],
    max_new_tokens: int = 40,
    keep_prob: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Greedy answers to (PNG bytes, question) pairs, prompt in LLaVA-1.5 format.

    keep_prob: each image-token position stays visible with this probability (1.0: the
    full image; 0.0: every image token masked, i.e. a text-only model); the draw is
    seeded by `seed`, one mask per item.
    """
    engine = HFGenerationEngine(model, processor)
    rng = np.random.default_rng(seed)
    requests = []
    for png, question in items:
        prompt, visible = format_prompt(question), None
        if keep_prob < 1.0:
            visible = rng.random(engine.image_token_count(prompt, png)) < keep_prob
        requests.append(VLRequest(prompt, png, visible=visible))
    settings = SamplingSettings(max_new_tokens=max_new_tokens, stop_strings=())
    return [out.text.strip() for out in engine.generate(requests, settings)]


def greedy_fn(
    model,  # noqa: ANN001
    processor,  # noqa: ANN001
    max_new_tokens: int = 40,
    keep_prob: float = 1.0,
) -> Callable[[list[tuple[bytes, str]]], list[str]]:
    """A `mmalign.evaluation.GenerateFn` around `generate_greedy`."""

    def generate(items: list[tuple[bytes, str]]) -> list[str]:
        return generate_greedy(model, processor, items, max_new_tokens, keep_prob)

    return generate
