"""SFT of the tiny LLaVA: labels cover only the answer, the loss is the answer CE, it learns."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.models.greedy import generate_greedy
from mmalign.models.sft import (
    IGNORE_INDEX,
    SFTConfig,
    lr_at,
    sft_loss,
    split_record,
    tokenize_records,
    train_sft,
)
from mmalign.models.tiny_llava import build_tiny_llava
from mmalign.shapes.world import WorldConfig, generate_split


@pytest.fixture(scope="module")
def setup() -> tuple:
    torch.set_num_threads(1)
    model, processor = build_tiny_llava("small", seed=0)
    records = generate_split(WorldConfig(seed=0), "sft", 8)
    return model, processor, records, tokenize_records(processor, records)


def test_labels_cover_exactly_the_answer_on_cpu(setup: tuple) -> None:
    _, processor, records, data = setup
    tok = processor.tokenizer
    assert data.pixel_values.shape == (8, 3, 32, 32)
    for i, record in enumerate(records):
        _, answer = split_record(record)
        real = data.attention_mask[i].bool()
        assert tok.decode(data.labels[i][data.labels[i] != IGNORE_INDEX]) == f" {answer}</s>"
        # Right padding: real tokens first, labels ignored on padding.
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()
        assert (data.labels[i][n:] == IGNORE_INDEX).all()
        assert data.input_ids[i, 0] == tok.bos_token_id


def test_loss_equals_cross_entropy_over_answer_tokens_on_cpu(setup: tuple) -> None:
    model, _, _, data = setup
    batch = data.batch(torch.arange(4))
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
        logp = torch.log_softmax(logits.float(), -1)
        total, count = 0.0, 0
        for b in range(4):
            for t in range(1, batch["input_ids"].shape[1]):
                label = int(batch["labels"][b, t])
                if label != IGNORE_INDEX:
                    total -= float(logp[b, t - 1, label])
                    count += 1
        assert math.isclose(float(sft_loss(model, batch)), total / count, rel_tol=1e-5)


def test_per_example_loss_weighs_each_conversation_equally_on_cpu(setup: tuple) -> None:
    model, _, _, data = setup
    batch = data.batch(torch.arange(4))
    with torch.no_grad():
        rows = [
            float(sft_loss(model, {k: v[b : b + 1] for k, v in batch.items()})) for b in range(4)
        ]
        per_example = float(sft_loss(model, batch, per="example"))
    assert math.isclose(per_example, sum(rows) / 4, rel_tol=1e-5)
    # Rows have different answer lengths, so the token mean differs from the row mean.
    assert not math.isclose(float(sft_loss(model, batch)), per_example, rel_tol=1e-3)
    with pytest.raises(ValueError, match="loss_per"):
        sft_loss(model, batch, per="sentence")


def test_lr_schedule_hand_values_on_cpu() -> None:
    cfg = SFTConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_training_overfits_a_small_set_on_cpu() -> None:
    torch.set_num_threads(1)
    model, processor = build_tiny_llava("small", seed=1)
    world = WorldConfig(seed=0, max_objects=1, synonym_prob=0.0, task_weights=(("describe", 1),))
    records = generate_split(world, "sft", 4)
    data = tokenize_records(processor, records)
    cfg = SFTConfig(steps=80, batch_size=4, lr=3e-3, warmup_steps=5, log_every=1000)
    losses = train_sft(model, data, cfg, log=lambda _: None)
    assert losses[0] > 4.0 and sum(losses[-5:]) / 5 < 0.1, (losses[0], losses[-5:])
    # Greedy decoding (left-padded batch) reproduces the memorised, image-specific answers.
    items = [(r["image"], split_record(r)[0]) for r in records]
    assert len({split_record(r)[1] for r in records}) > 1
    assert generate_greedy(model, processor, items) == [split_record(r)[1] for r in records]
