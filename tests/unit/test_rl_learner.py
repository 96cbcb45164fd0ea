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


def test_pack_responses_left_aligns_each_block() -> None:
    from mmalign.engines.rl_learner import pack_responses

    values = torch.tensor([[9.0, 1.0, 2.0, 9.0], [9.0, 9.0, 3.0, 9.0]])
    mask = torch.tensor([[False, True, True, False], [False, False, True, False]])
    packed, m = pack_responses(values, mask)
    assert packed.tolist() == [[1.0, 2.0], [3.0, 0.0]] and m.tolist() == [[1, 1], [1, 0]]


def test_ppo_raises_the_rewarded_answer_and_checkpoints_its_value_head(tmp_path) -> None:  # noqa: ANN001
    from mmalign.engines import checkpoint
    from mmalign.engines.rl_learner import PPOLearner
    from mmalign.models.tiny_llava import build_tiny_llava

    def make() -> PPOLearner:
        model, processor = build_tiny_llava("small", seed=0)
        s = LearnerConfig(lora_r=4, lora_alpha=8, lr=1e-2, lora_dropout=0.0, seed=0)
        return PPOLearner(model, processor, s)

    learner = make()
    row = {"image": _png(), "prompt": "Describe the image.", "samples": SAMPLES,
           "rewards": [1.5, -0.5, -0.5, -0.5]}  # fmt: skip

    def logps() -> torch.Tensor:
        rows = [{"image": row["image"], "prompt": row["prompt"], "chosen": s} for s in SAMPLES]
        return learner.policy_logps(rows)

    before = logps()
    first = learner.ppo_step([row], kl_coef=0.05)
    assert abs(first["kl"]) < 1e-5 and first["clip_fraction"] == 0.0  # ratio 1 at epoch 1
    assert first["value_loss"] > 0 and first["stepped"] == 1.0
    for _ in range(4):
        learner.ppo_step([row], kl_coef=0.05, epochs=2)
    gain = logps() - before
    assert gain[0] > 0 and bool((gain[0] > gain[1:]).all()), gain
    assert float(learner.value_head.weight.detach().abs().sum()) > 0  # the head trained

    uri = str(tmp_path / "step_000005")
    checkpoint.save(uri, learner, {"step": 5})
    again = make()
    checkpoint.load(uri, again)
    assert torch.equal(again.value_head.weight, learner.value_head.weight)
    assert torch.allclose(
        again.policy_logps(
            [{"image": row["image"], "prompt": row["prompt"], "chosen": SAMPLES[0]}]
        ),
        learner.policy_logps(
            [{"image": row["image"], "prompt": row["prompt"], "chosen": SAMPLES[0]}]
        ),
    )


def test_reward_model_rloo_and_ppo_on_llava_next_with_mixed_tiles(tmp_path) -> None:  # noqa: ANN001
    """LLaVA-1.6 (AnyRes): rows of different aspect ratios (different tile counts) in one
    batch through the reward model, an RLOO step and a PPO step."""
    from mmalign.engines.reward_model import RewardModel
    from mmalign.engines.rl_learner import PPOLearner
    from mmalign.models.loading import load_model
    from tests.llava_next import SIZES, jpeg, save_tiny_llava_next

    path = save_tiny_llava_next(tmp_path / "next")
    rows = [
        {"image": jpeg(size, seed=i), "prompt": "Describe the image.", "samples": SAMPLES,
         "rewards": [1.0, -1.0, 0.0, 0.0], "chosen": SAMPLES[0], "rejected": SAMPLES[1]}
        for i, size in enumerate(SIZES[:3])
    ]  # fmt: skip
    settings = LearnerConfig(lora_r=4, lora_alpha=8, lr=1e-2, lora_dropout=0.0, seed=0)
    model, processor = load_model(path)
    rm = RewardModel(model, processor, settings)
    assert rm.score(rows).shape == (3,) and rm.step(rows)["loss"] > 0
    model, processor = load_model(path)
    rloo = RLOOLearner(model, processor, settings).rloo_step(rows, 0.0, 1.0, 0.05)
    assert rloo["stepped"] == 1.0 and rloo["grad_norm"] > 0
    model, processor = load_model(path)
    ppo = PPOLearner(model, processor, settings).ppo_step(rows, kl_coef=0.05)
    assert ppo["stepped"] == 1.0 and ppo["grad_norm"] > 0 and ppo["value_loss"] > 0
