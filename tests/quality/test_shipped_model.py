"""The shipped tiny policy (assets/models/shapes-llava-small) is calibrated as issue 3 asks.

On the unbiased eval split it must hallucinate like a real MLLM, neither perfect nor
broken: CHAIR_i in 5-25 % (issue 3), POPE F1 above chance and below 95 %; and hiding every
image token (the "mask" semantics BDHS uses) must raise CHAIR_i by a large margin. The numbers
on the full 200-image eval are in the model's README / eval.json; this test re-measures
a 100-image subset so that a retrained checkpoint that drifts out of the band fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.evaluation import evaluate
from mmalign.models.greedy import greedy_fn
from mmalign.shapes.world import WorldConfig, generate_split

SHIPPED = Path(__file__).resolve().parents[2] / "assets/models/shapes-llava-small"
N_IMAGES = 100


@pytest.fixture(scope="module")
def model_and_records() -> tuple:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(1)
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED).eval()
    processor = AutoProcessor.from_pretrained(SHIPPED)
    return model, processor, generate_split(WorldConfig(), "eval", N_IMAGES)


@pytest.mark.slow
def test_shipped_model_is_in_the_calibrated_band_on_cpu(model_and_records: tuple) -> None:
    model, processor, records = model_and_records
    report = evaluate(greedy_fn(model, processor), records, batch_size=64)
    chair_i, pope_f1 = report["chair"]["chair_i"], report["pope_mean_f1"]
    # Issue 3's band; the shipped model measures 10.0 % on 200 images (its README).
    assert 0.05 <= chair_i <= 0.25, report["chair"]
    assert 0.60 <= pope_f1 < 0.95, report["pope"]
    # it answers from the image, not always "Yes" or always "No"
    assert 0.3 < report["pope"]["random"]["yes_ratio"] < 0.7, report["pope"]["random"]


@pytest.mark.slow
def test_masking_every_image_token_raises_chair_sharply_on_cpu(model_and_records: tuple) -> None:
    model, processor, records = model_and_records
    kw = {"batch_size": 64, "splits": ()}  # descriptions only
    seen = evaluate(greedy_fn(model, processor), records, **kw)["chair"]
    masked = evaluate(greedy_fn(model, processor, keep_prob=0.0), records, **kw)["chair"]
    assert masked["n_mentions"] >= 0.8 * seen["n_mentions"], masked  # it still describes
    assert masked["chair_i"] >= seen["chair_i"] + 0.4, (seen, masked)


LARGE = SHIPPED.parent / "shapes-llava-large"


@pytest.mark.slow
def test_large_model_is_more_accurate_than_the_small_one_on_cpu(model_and_records: tuple) -> None:
    """Issue 3's second size: same family, clearly better descriptions and no worse on POPE
    (measured on 200 images: CHAIR_i 2.3 vs 10.0, Recall 94.1 vs 85.3, POPE F1 91.1 vs 90.3;
    the small one's stage-4 noisy captions make it hallucinate, see both READMEs)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    small, processor, records = model_and_records
    large = AutoModelForImageTextToText.from_pretrained(LARGE).eval()
    assert sum(p.numel() for p in large.parameters()) > 2 * sum(
        p.numel() for p in small.parameters()
    )
    s = evaluate(greedy_fn(small, processor), records, batch_size=64)
    big = evaluate(greedy_fn(large, AutoProcessor.from_pretrained(LARGE)), records, batch_size=64)
    assert big["chair"]["chair_i"] <= s["chair"]["chair_i"] - 0.05, (big["chair"], s["chair"])
    assert big["chair"]["recall"] >= s["chair"]["recall"] + 0.05, (big["chair"], s["chair"])
    assert big["pope_mean_f1"] >= s["pope_mean_f1"], (big["pope"], s["pope"])
