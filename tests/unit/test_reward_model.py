"""The reward model (mmalign.engines.reward_model) on a tiny random LLaVA: the loss by
hand, last-token pooling, training moves scores the right way, save/load round-trips."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from mmalign.config import LearnerConfig
from mmalign.engines.reward_model import RewardModel, last_token_index
from mmalign.losses import bradley_terry_loss


def test_bradley_terry_by_hand() -> None:
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert torch.allclose(loss, torch.tensor([math.log(1 + math.exp(-2.0)), math.log(2.0)]))
    with pytest.raises(ValueError, match="shapes differ"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_last_token_index_right_and_left_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 3, 3]


def _png(colour: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, "PNG")
    return out.getvalue()


def test_training_separates_a_pair_and_save_load_round_trips(tmp_path: Path) -> None:
    from mmalign.models.tiny_llava import build_tiny_llava

    torch.manual_seed(0)
    model, processor = build_tiny_llava("small", seed=0)
    settings = LearnerConfig(lora_r=4, lora_alpha=8, lr=5e-3, max_grad_norm=1.0, seed=0)
    rm = RewardModel(model, processor, settings)
    rows = [
        {"image": _png("red"), "prompt": "Describe the image.", "chosen": "a red square.",
         "rejected": "two blue circles and a dog."},
        {"image": _png("blue"), "prompt": "What is there?", "chosen": "a blue square.",
         "rejected": "a green cross."},
    ]  # fmt: skip
    margin = lambda: rm.score(rows, "chosen") - rm.score(rows, "rejected")  # noqa: E731
    first = rm.step(rows)
    for _ in range(15):
        last = rm.step(rows)
    assert last["loss"] < first["loss"] and last["accuracy"] == 1.0
    assert bool((margin() > 0).all())
    # only LoRA and the head train: the base weights are frozen
    trainable = [n for n, p in rm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    rm.save(str(tmp_path / "rm"))
    again = RewardModel.load(str(tmp_path / "rm"))
    assert type(again.model).__name__ == "LlavaForConditionalGeneration"
    assert torch.allclose(again.score(rows), rm.score(rows), atol=1e-4)
    with pytest.raises(FileNotFoundError, match="not a saved reward model"):
        model.save_pretrained(tmp_path / "plain")
        processor.save_pretrained(tmp_path / "plain")
        RewardModel.load(str(tmp_path / "plain"))


def test_reward_model_as_judge_kind(tmp_path: Path) -> None:
    """judge.kind reward-model: JudgeEngine.from_config loads the saved model; the higher
    score wins, swapping the slots swaps the winner (no position bias), scores within
    judge.tie_margin are a tie, a bad row fails alone."""
    from mmalign.config import JudgeConfig
    from mmalign.engines.judge_engine import JudgeEngine
    from mmalign.judge import score_verdict
    from mmalign.models.tiny_llava import build_tiny_llava

    assert score_verdict(1.0, 0.5).winner == "a" and score_verdict(0.5, 1.0).winner == "b"
    tie = score_verdict(1.0, 0.9, tie_margin=0.2)
    assert (tie.winner, tie.kept, tie.reason, tie.raw_a) == (None, False, "tie", "1")

    model, processor = build_tiny_llava("small", seed=1)
    RewardModel(model, processor, LearnerConfig(lora_r=4, seed=0)).save(str(tmp_path / "rm"))
    image = {"bytes": _png("red"), "path": None}
    rows = [
        {"image": image, "question": "Describe it.", "response_a": a, "response_b": b}
        for a, b in [("a red square.", "two dogs."), ("two dogs.", "a red square.")]
    ]
    engine = JudgeEngine.from_config(JudgeConfig(kind="reward-model", model=str(tmp_path / "rm")))
    first, swapped = engine.judge(rows)
    assert first["judge"] == "reward-model" and first["kept"] and first["orders"] == 0
    assert {first["winner"], swapped["winner"]} == {"a", "b"}  # the same answer both times
    assert (first["raw_a"], first["raw_b"]) == (swapped["raw_b"], swapped["raw_a"])
    gap = abs(float(first["raw_a"]) - float(first["raw_b"]))
    wide = JudgeConfig(kind="reward-model", model=str(tmp_path / "rm"), tie_margin=gap + 1)
    assert [v["reason"] for v in JudgeEngine.from_config(wide).judge(rows)] == ["tie", "tie"]
    bad = engine.judge([{**rows[0], "image": {"bytes": b"not an image", "path": None}}])
    assert bad[0]["reason"] == "invalid" and bad[0]["judge"] == "reward-model"
