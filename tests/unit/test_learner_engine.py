"""PreferenceLearner on the tiny random LLaVA: training moves the right weights the right way."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from mmalign.config import ConfigError, LearnerConfig
from mmalign.engines.learner import PreferenceLearner, lr_factor
from mmalign.logprobs import build_response_batch, model_response_logps


def _image(colour: tuple[int, int, int]):
    from PIL import Image

    img = Image.new("RGB", (32, 32), (255, 255, 255))
    img.paste(colour, (8, 8, 24, 24))
    return img


ROW = {
    "image": _image((255, 0, 0)),
    "prompt": "Is there a red square in the image?",
    "chosen": "Yes.",
    "rejected": "No.",
}
ROW2 = {
    "image": _image((0, 0, 255)),
    "prompt": "Describe the image in detail.",
    "chosen": "There is a blue square.",
    "rejected": "There is a red circle.",
}

# Small LoRA and a large constant rate so a handful of steps visibly moves the tiny model
# (steps=1000: the cosine horizon these tests were written against).
FAST = LearnerConfig(
    lora_r=8, lora_alpha=16, lora_dropout=0.0, lr=1e-2, schedule="constant", steps=1000
)


def _base() -> tuple[torch.nn.Module, object]:
    from mmalign.models.tiny_llava import build_tiny_llava

    model, processor = build_tiny_llava("small", seed=0)
    return model, processor


def _learner(**overrides) -> tuple[PreferenceLearner, torch.nn.Module]:
    """A learner and an untouched deep copy of its base model."""
    model, processor = _base()
    base_copy = copy.deepcopy(model).eval()
    return PreferenceLearner(model, processor, dataclasses.replace(FAST, **overrides)), base_copy


def _batch(learner: PreferenceLearner, rows) -> dict[str, torch.Tensor]:
    return build_response_batch(
        learner.processor,
        [r["image"] for r in rows],
        [r["prompt"] for r in rows],
        [[r["chosen"], r["rejected"]] for r in rows],
    )


def test_lr_factor_hand_numbers_on_cpu() -> None:
    # warmup 2, total 6: steps 0,1 -> 1/2, 2/2; then progress = (step - 2) / 4
    #   step 3: 0.5 * (1 + cos(pi/4)) = 0.5 * 1.7071068 = 0.8535534; step 4: cos(pi/2) -> 0.5
    got = [lr_factor(s, 2, 6, "cosine") for s in range(7)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.8535534, 0.5, 0.1464466, 0.0], abs=1e-6)
    assert [lr_factor(s, 2, 6, "constant") for s in (0, 1, 5, 60)] == [0.5, 1.0, 1.0, 1.0]


def test_settings_validation_names_field_on_cpu() -> None:
    with pytest.raises(ConfigError, match=r"learner\.beta"):
        LearnerConfig(beta=0.0).validate("learner")
    with pytest.raises(ConfigError, match=r"learner\.loss"):  # the learner validates too
        PreferenceLearner(*_base(), LearnerConfig(loss="kto"))


def test_learner_takes_the_config_section_on_cpu() -> None:
    cfg = LearnerConfig(
        lr=2e-6,
        projector_lr=1e-5,
        reference="separate",
        max_grad_norm=0.0,
        gradient_checkpointing=True,
        lora_r=8,
        lora_alpha=16,
    )
    learner = PreferenceLearner(*_base(), cfg)
    assert learner.settings is cfg  # no second settings object
    assert [g["lr"] for g in learner.optimizer.param_groups] == [2e-6, 1e-5]
    assert learner.ref_model is not None and learner.model.is_gradient_checkpointing
    assert learner.model.peft_config["default"].r == cfg.lora_r
    assert learner.scheduler.lr_lambdas[0](cfg.steps) == 0.0  # cosine ends at learner.steps
    assert learner.step([ROW])["grad_norm"] > 0  # max_grad_norm 0: no clipping, still steps
    frozen = PreferenceLearner(*_base(), LearnerConfig(lora_r=8, lora_alpha=16))
    assert len(frozen.optimizer.param_groups) == 1 and frozen.ref_model is None


def test_dpo_steps_raise_reward_margin_on_cpu() -> None:
    learner, _ = _learner()
    metrics = [learner.step([ROW]) for _ in range(6)]
    # step 0 runs with LoRA B = 0, so policy == reference and the margin is exactly 0.
    assert metrics[0]["reward_margin"] == 0.0
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    margins = [m["reward_margin"] for m in metrics]
    assert margins[-1] > margins[1] > 0
    assert metrics[-1]["reward_accuracy"] == 1.0 and metrics[-1]["loss"] < math.log(2)
    assert metrics[-1]["optimizer_step"] == 6.0 and metrics[-1]["lr"] == 1e-2
    # the pair-level metric agrees with a fresh evaluation of the trained policy
    chosen = learner.policy_logps([ROW], "chosen")
    assert chosen.item() > metrics[0]["chosen_logps"]


def test_only_lora_and_projector_change_on_cpu() -> None:
    learner, base = _learner(projector_lr=5e-3)
    assert [g["lr"] for g in learner.optimizer.param_groups] == [1e-2, 5e-3]
    names = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    assert not any("vision_tower" in n for n in names)  # CLIP's q/k/v_proj get no LoRA
    assert all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in names)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    for _ in range(3):
        learner.step([ROW])
    changed = {n for n, p in learner.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert changed <= set(names)
    assert any("lora_B" in n for n in changed)
    assert any("modules_to_save" in n for n in changed)
    # the wrapped original projector (used by the reference) keeps the base weights
    orig = learner.model.base_model.model.model.multi_modal_projector.original_module
    torch.testing.assert_close(
        orig.linear_1.weight, base.model.multi_modal_projector.linear_1.weight, rtol=0, atol=0
    )


def test_frozen_projector_stays_put_on_cpu() -> None:
    learner, base = _learner(projector_lr=0.0)
    for _ in range(2):
        learner.step([ROW])
    state = learner.model.base_model.model.model.multi_modal_projector.state_dict()
    for k, v in base.model.multi_modal_projector.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert len(learner.optimizer.param_groups) == 1


@pytest.mark.parametrize("reference", ["adapters-off", "separate"])
def test_reference_logps_equal_base_model_on_cpu(reference: str) -> None:
    learner, base = _learner(projector_lr=1e-2, reference=reference)
    for _ in range(3):
        learner.step([ROW, ROW2])
    batch = _batch(learner, [ROW, ROW2])
    with torch.no_grad():
        expected = model_response_logps(base, batch)
        policy = model_response_logps(learner.model, batch)
    torch.testing.assert_close(learner.reference_logps(batch), expected, atol=1e-5, rtol=1e-5)
    assert (policy - expected).abs().max() > 1e-2  # the policy itself did move


def test_state_dict_round_trip_gives_identical_next_step_on_cpu() -> None:
    # Mid-accumulation save (3 micro-steps, accum 2), warmup+cosine and LoRA dropout, so the
    # pending gradient, scheduler position and RNG all have to come back.
    settings = dict(grad_accum=2, schedule="cosine", warmup_steps=1, steps=5, lora_dropout=0.2)
    a, _ = _learner(**settings)
    for _ in range(3):
        a.step([ROW, ROW2])
    # build b first: building a model reseeds the global RNG, which is part of the state
    b, _ = _learner(**settings)
    state = a.state_dict()
    ma = a.step([ROW, ROW2])
    b.load_state_dict(state)  # also rewinds the global RNG to where a's step started
    mb = b.step([ROW, ROW2])
    assert ma == mb and ma["stepped"] == 1.0 and ma["optimizer_step"] == 2.0
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), n
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()
    with pytest.raises(ValueError, match="different learner settings"):
        _learner()[0].load_state_dict(state)


def test_grad_accumulation_equals_one_big_batch_on_cpu() -> None:
    # Gradients, not weights, are compared: Adam's first step is ~lr * sign(g), which turns
    # float noise in near-zero gradients into full-size differences.
    # one: accum 2, one call on [ROW, ROW2] -> grad = mean_grad / 2
    # two: accum 4, calls on [ROW] and [ROW2] -> grad = (g_ROW + g_ROW2) / 4 = mean_grad / 2
    one, _ = _learner(grad_accum=2)
    assert one.step([ROW, ROW2])["stepped"] == 0.0
    two, _ = _learner(grad_accum=4)
    two.step([ROW])
    assert two.step([ROW2])["stepped"] == 0.0
    grads = 0
    for (n, p1), (_, p2) in zip(one.model.named_parameters(), two.model.named_parameters()):
        assert (p1.grad is None) == (p2.grad is None), n
        if p1.grad is not None:
            torch.testing.assert_close(p1.grad, p2.grad, atol=1e-7, rtol=1e-4, msg=n)
            grads += int(p1.grad.abs().sum() > 0)
    assert grads > 0
    # the next call completes the accumulation window and steps the optimizer
    assert one.step([ROW])["stepped"] == 1.0 and one.global_step == 1


def test_two_rejected_and_mdpo_steps_on_cpu() -> None:
    learner, _ = _learner(gamma=0.5)
    extra = dict(ROW, rejected_extra=["There is a red circle."])
    m = learner.step([extra, ROW2])  # ROW2 has no extra: its loss is the plain pair loss
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == ref at step 0
    assert all(math.isfinite(v) for v in m.values())
    # the step reports its batch kind (the online driver counts two-rejected steps)
    assert m["two_rejected"] == 1.0 and learner.step([ROW2])["two_rejected"] == 0.0

    mdpo, _ = _learner(loss="mdpo", beta=0.5)
    ranked = dict(ROW, responses=["Yes.", "Yes, there is.", "No.", "No, there is not."])
    first = mdpo.step([ranked])
    assert first["two_rejected"] == 0.0
    # policy == ref at step 0: every pair term is log 2 and the penalty -r(y_0) is 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for _ in range(5):
        last = mdpo.step([ranked])
    assert last["reward_margin"] > 0 and last["loss"] < first["loss"]
    with pytest.raises(ValueError, match="same K"):
        mdpo.step([ranked, dict(ROW, responses=["Yes.", "No."])])
    # a plain pair is the K = 2 ranking [chosen, rejected] (online pairs, TRL sets)
    as_pair, _ = _learner(loss="mdpo", beta=0.5)
    as_ranking, _ = _learner(loss="mdpo", beta=0.5)
    ranking = dict(ROW, responses=[ROW["chosen"], ROW["rejected"]])
    for _ in range(2):
        a, b = as_pair.step([ROW]), as_ranking.step([ranking])
    assert a["loss"] == pytest.approx(b["loss"]) and a["loss"] != pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="rejected_extra"):
        mdpo.step([extra])  # two rejected answers have no single ranking


def test_gradient_checkpointing_same_loss_and_grads_on_cpu() -> None:
    plain, _ = _learner(grad_accum=2)
    ckpt, _ = _learner(grad_accum=2, gradient_checkpointing=True)
    assert plain.step([ROW, ROW2])["loss"] == pytest.approx(ckpt.step([ROW, ROW2])["loss"])
    for (n, p1), (_, p2) in zip(plain.model.named_parameters(), ckpt.model.named_parameters()):
        if p1.grad is not None:
            assert p2.grad is not None, n
            torch.testing.assert_close(p1.grad, p2.grad, atol=1e-7, rtol=1e-4, msg=n)


def test_adapter_export_and_weight_sync_on_cpu(tmp_path) -> None:
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    learner, _ = _learner(projector_lr=1e-2)
    for _ in range(3):
        learner.step([ROW])
    batch = _batch(learner, [ROW, ROW2])
    with torch.no_grad():
        expected = model_response_logps(learner.model.eval(), batch)
        learner.model.train()
        # 1) peft directory -> fresh base
        learner.save_adapter(str(tmp_path / "adapter"))
        assert (tmp_path / "adapter" / "adapter_config.json").exists()
        loaded = PeftModel.from_pretrained(_base()[0], str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(model_response_logps(loaded, batch), expected)
        # 2) merged standalone copy
        merged = learner.merged_model().eval()
        assert type(merged).__name__ == "LlavaForConditionalGeneration"
        torch.testing.assert_close(
            model_response_logps(merged, batch), expected, atol=1e-4, rtol=1e-5
        )
        # 3) adapter_state() tensors -> another peft model with the same config
        state = learner.adapter_state()
        assert all(t.device.type == "cpu" for t in state.values())
        other = get_peft_model(_base()[0], learner.model.peft_config["default"]).eval()
        set_peft_model_state_dict(other, state)
        torch.testing.assert_close(model_response_logps(other, batch), expected)
    assert any("lora_" in n for n, _ in learner.model.named_parameters())  # still unmerged


def test_rpo_alpha_adds_the_chosen_per_token_nll_on_cpu() -> None:
    """loss = DPO + alpha * (-logp(y+) / |y+|); at step 0 DPO is log 2 (policy == ref)."""
    learner, _ = _learner(rpo_alpha=0.5)
    tokens = int(_batch(learner, [ROW])["response_mask"][0].sum())  # chosen row first
    nll = -float(learner.policy_logps([ROW])[0]) / tokens
    m = learner.step([ROW])
    assert m["chosen_nll"] == pytest.approx(nll, rel=1e-5)
    assert m["loss"] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-5)
    with pytest.raises(ValueError, match="rpo_alpha"):
        _learner(rpo_alpha=-1.0)
