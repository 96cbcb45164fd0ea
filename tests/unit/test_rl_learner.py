"""RLOOLearner on a tiny random LLaVA: the update raises the log-prob of the answer the
reward favours over the others, equal rewards (and no KL) change nothing, and the KL to
the reference starts at 0 (LoRA starts as the identity)."""

from __future__ import annotations

import io

import torch

from mmalign.config import LearnerConfig
from mmalign.engines.rl_learner import RLOOLearner


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(out, "PNG")
    return out.getvalue()


def _learner() -> RLOOLearner:
    from mmalign.models.tiny_llava import build_tiny_llava

    model, processor = build_tiny_llava("small", seed=0)
    settings = LearnerConfig(lora_r=4, lora_alpha=8, lr=1e-2, lora_dropout=0.0, seed=0)
    return RLOOLearner(model, processor, settings)


SAMPLES = ["a red square.", "two dogs.", "a blue cross.", "nothing."]


def test_rloo_raises_the_rewarded_answer_and_starts_at_zero_kl() -> None:
    learner = _learner()
    row = {"image": _png(), "prompt": "Describe the image.", "samples": SAMPLES,
           "rewards": [1.0, 0.0, 0.0, 0.0]}  # fmt: skip

    def logps() -> torch.Tensor:
        rows = [{"image": row["image"], "prompt": row["prompt"], "chosen": s} for s in SAMPLES]
        return learner.policy_logps(rows)

    before = logps()
    first = learner.rloo_step([row], reward_mean=0.25, reward_std=0.5, kl_coef=0.05)
    assert abs(first["kl"]) < 1e-5 and first["stepped"] == 1.0 and first["grad_norm"] > 0
    for _ in range(4):
        last = learner.rloo_step([row], reward_mean=0.25, reward_std=0.5, kl_coef=0.05)
    gain = logps() - before
    assert gain[0] > 0 and bool((gain[0] > gain[1:]).all()), gain
    assert last["kl"] != 0.0


def test_equal_rewards_without_kl_leave_the_weights_alone() -> None:
    learner = _learner()
    state = {k: v.clone() for k, v in learner.adapter_state().items()}
    row = {"image": _png(), "prompt": "Describe the image.", "samples": SAMPLES,
           "rewards": [0.5] * 4}  # fmt: skip
    out = learner.rloo_step([row], reward_mean=0.0, reward_std=1.0, kl_coef=0.0)
    assert out["loss"] == 0.0 and out["advantage_abs"] == 0.0
    after = learner.adapter_state()
    assert all(torch.equal(state[k], after[k]) for k in state)
