"""Response log-probs: pure masking/shift logic and the batched LLaVA forward."""

from __future__ import annotations

import io

import pytest
import torch

from mmalign.logprobs import (
    IGNORE_INDEX,
    build_response_batch,
    model_response_logps,
    position_ids_from_mask,
    response_logps,
    split_groups,
    token_logps,
)


def test_response_logps_hand_numbers_on_cpu() -> None:
    # B = 1, T = 3, V = 2. Logits at t = 0 are [0, 0] -> log p = log 0.5 for either token;
    # at t = 1 they are [ln 3, 0] -> p = [0.75, 0.25]. labels[1] = 1 (predicted at t = 0),
    # labels[2] = 0 (predicted at t = 1); labels[0] (prompt) is never predicted.
    logits = torch.tensor([[[0.0, 0.0], [torch.log(torch.tensor(3.0)), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    # log 0.5 + log 0.75 = -0.6931472 - 0.2876821 = -0.9808293
    assert response_logps(logits, labels).item() == pytest.approx(-0.9808293, abs=1e-6)
    # masking the first response token leaves only log 0.75
    labels_tail = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]])
    assert response_logps(logits, labels_tail).item() == pytest.approx(-0.2876821, abs=1e-6)


def test_response_logps_dtype_upcasts_half_keeps_float64_on_cpu() -> None:
    logits = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1]])
    assert response_logps(logits.bfloat16(), labels).dtype == torch.float32
    lp64 = response_logps(logits.double(), labels)
    assert lp64.dtype == torch.float64  # data-parallel checks in float64 rely on this
    assert lp64.item() == pytest.approx(-0.6931471805599453, abs=1e-15)


def test_response_logps_equals_per_token_loop_on_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, :2] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX  # right padding
    labels[2, :] = IGNORE_INDEX  # no response at all -> 0
    expected = torch.zeros(3)
    for b in range(3):
        for t in range(1, 7):
            if labels[b, t] != IGNORE_INDEX:
                expected[b] += torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
    got = response_logps(logits, labels)
    torch.testing.assert_close(got, expected)
    assert got[2].item() == 0.0
    got.sum().backward()  # gradient flows through the masked gather
    assert logits.grad is not None and logits.grad[0, 2:6].abs().sum() > 0
    assert logits.grad[2].abs().sum() == 0  # no response tokens, no gradient
    lp, mask = token_logps(logits.detach(), labels)
    assert lp.shape == mask.shape == (3, 6) and not lp[~mask].any()


def test_response_logps_padding_invariance_pure_on_cpu() -> None:
    # The same row's logits placed at different offsets with garbage around them.
    g = torch.Generator().manual_seed(1)
    row_logits = torch.randn(5, 9, generator=g)
    row_labels = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 4, 7, 2])
    logits = torch.randn(2, 8, 9, generator=g) * 10
    labels = torch.full((2, 8), IGNORE_INDEX)
    logits[0, :5], labels[0, :5] = row_logits, row_labels  # right padded
    logits[1, 3:], labels[1, 3:] = row_logits, row_labels  # left padded
    got = response_logps(logits, labels)
    torch.testing.assert_close(got[0], got[1])
    torch.testing.assert_close(got[0], response_logps(row_logits[None], row_labels[None])[0])


def test_position_ids_from_mask_on_cpu() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_split_groups_on_cpu() -> None:
    # group-major rows [c0, c1, c2, r0, r1, r2] -> per-row [[c0, r0], [c1, r1], [c2, r2]]
    assert split_groups(torch.arange(6), 2).tolist() == [[0, 3], [1, 4], [2, 5]]


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    from mmalign.models.tiny_llava import build_tiny_llava

    torch.manual_seed(0)
    model, processor = build_tiny_llava("small", seed=0)
    return model.eval(), processor


def _png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


QUESTIONS = ["Is there a red circle in the image?", "Describe the image in detail."]
ANSWERS = [["Yes.", "No."], ["There is a red circle.", "There is a blue square. There is a cross."]]


def test_batch_layout_matches_training_format_on_cpu(tiny) -> None:
    from mmalign.models.tiny_llava import format_answer, format_prompt

    _, processor = tiny
    images = [_png((255, 0, 0)), _png((0, 0, 255))]
    batch = build_response_batch(processor, images, QUESTIONS, ANSWERS)
    # schema image structs {"bytes", "path"} are accepted too and give the same batch
    as_structs = [{"bytes": png, "path": None} for png in images]
    same = build_response_batch(processor, as_structs, QUESTIONS, ANSWERS)
    assert all(torch.equal(batch[k], same[k]) for k in batch)
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 4
    for row, (b, gi) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):  # group-major
        ref = processor(
            text=format_prompt(QUESTIONS[b]) + format_answer(ANSWERS[b][gi]),
            images=_pil(images[b]),
            return_tensors="pt",
        )["input_ids"][0]
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == ref.tolist()  # right padded
        prompt_len = len(
            processor(text=format_prompt(QUESTIONS[b]), images=_pil(images[b]))["input_ids"][0]
        )
        # labels hold exactly the answer tokens incl. </s>
        assert batch["labels"][row, :prompt_len].eq(IGNORE_INDEX).all()
        assert batch["labels"][row, prompt_len:n].tolist() == ref[prompt_len:].tolist()
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        torch.testing.assert_close(batch["pixel_values"][row], batch["pixel_values"][b])
    assert batch["response_mask"].equal(batch["labels"] != IGNORE_INDEX)


def _pil(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def test_model_logps_padding_invariance_on_cpu(tiny) -> None:
    model, processor = tiny
    images = [_png((255, 0, 0)), _png((0, 0, 255))]
    with torch.no_grad():
        right = model_response_logps(
            model, build_response_batch(processor, images, QUESTIONS, ANSWERS)
        )
        left = model_response_logps(
            model, build_response_batch(processor, images, QUESTIONS, ANSWERS, padding_side="left")
        )
        # the short "Yes." row alone (no padding at all)
        alone = model_response_logps(
            model, build_response_batch(processor, images[:1], QUESTIONS[:1], [["Yes."]])
        )
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], right[0], atol=1e-5, rtol=1e-5)


def test_model_logps_equal_manual_forward_on_cpu(tiny) -> None:
    from mmalign.models.tiny_llava import format_answer, format_prompt

    model, processor = tiny
    images = [_png((255, 0, 0)), _png((0, 0, 255))]
    with torch.no_grad():
        got = model_response_logps(
            model, build_response_batch(processor, images, QUESTIONS, ANSWERS)
        )
        # manual: forward one unpadded sequence, sum log_softmax over the answer tokens
        prompt = processor(
            text=format_prompt(QUESTIONS[1]), images=_pil(images[1]), return_tensors="pt"
        )
        full = processor(
            text=format_prompt(QUESTIONS[1]) + format_answer(ANSWERS[1][1]),
            images=_pil(images[1]),
            return_tensors="pt",
        )
        logits = model(**full).logits[0].log_softmax(-1)
        ids = full["input_ids"][0]
        p = prompt["input_ids"].shape[1]
        manual = sum(logits[t - 1, ids[t]] for t in range(p, len(ids)))
    torch.testing.assert_close(got[3], manual, atol=1e-5, rtol=1e-5)
