"""Every role on LLaVA-1.6 (AnyRes), with a tiny random LlavaNext checkpoint built on the
real LlavaNextProcessor and images of different aspect ratios (different tile grids in
one batch): image-token counts are the processor's, masks have each row's own length,
log-probs equal a plain HF forward of each row alone, LoRA merge round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.engines.hf_generation import HFGenerationEngine, SamplingSettings
from mmalign.engines.mm_inputs import VLRequest, build_mm_batch
from mmalign.logprobs import build_response_batch, default_prompt_text, model_response_logps
from mmalign.models.loading import check_architecture, load_model
from tests.llava_next import SIZES, jpeg, save_tiny_llava_next


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> HFGenerationEngine:
    model, processor = load_model(save_tiny_llava_next(tmp_path_factory.mktemp("next")))
    return HFGenerationEngine(model, processor)


def _rows(engine: HFGenerationEngine) -> list[tuple[str, bytes]]:
    prompt = default_prompt_text(engine.processor, "Describe the image.")
    return [(prompt, jpeg(size, seed=i)) for i, size in enumerate(SIZES)]


def _processor_counts(engine: HFGenerationEngine, rows: list[tuple[str, bytes]]) -> list[int]:
    """Image tokens the processor puts in each row's prompt (ids == image_token_id)."""
    import io

    from PIL import Image

    out = []
    for prompt, image in rows:
        pil = Image.open(io.BytesIO(image)).convert("RGB")
        ids = engine.processor(images=[pil], text=[prompt], return_tensors="pt")["input_ids"]
        out.append(int((ids == engine.model.config.image_token_id).sum()))
    return out


def test_image_token_counts_are_the_processors_and_differ_by_aspect_ratio(engine) -> None:  # noqa: ANN001
    rows = _rows(engine)
    counts = [engine.image_token_count(p, im) for p, im in rows]
    assert counts == _processor_counts(engine, rows)
    assert len(set(counts)) >= 3, counts  # AnyRes: not config.image_seq_length for all
    assert all(c != engine.model.config.image_seq_length for c in counts)


def test_mixed_tiles_batch_embeds_like_the_model_and_masks_per_row(engine) -> None:  # noqa: ANN001
    rows = _rows(engine)
    counts = [engine.image_token_count(p, im) for p, im in rows]
    # all visible: the masked-attention batch gives the model's own next-token logits
    reqs = [VLRequest(p, im) for p, im in rows]
    batch = build_mm_batch(engine.model, engine.processor, reqs)
    with torch.no_grad():
        ours = engine.model(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits[:, -1]
        for b, (p, im) in enumerate(rows):
            from mmalign.logprobs import to_pil

            enc = engine.processor(images=[to_pil(im)], text=[p], return_tensors="pt")
            ref = engine.model(**enc).logits[0, -1]
            torch.testing.assert_close(ours[b], ref, atol=1e-4, rtol=1e-4)
    # a mask of each row's own length; drop removes exactly the hidden positions
    rng = np.random.default_rng(0)
    visible = [rng.random(n) < 0.25 for n in counts]
    masked = [VLRequest(p, im, visible=v) for (p, im), v in zip(rows, visible)]
    mask = build_mm_batch(engine.model, engine.processor, masked, "mask")
    drop = build_mm_batch(engine.model, engine.processor, masked, "drop")
    full_len = batch.attention_mask.sum(1)
    hidden = torch.tensor([int((~v).sum()) for v in visible])
    assert torch.equal(mask.attention_mask.sum(1), full_len - hidden)
    assert torch.equal(drop.attention_mask.sum(1), full_len - hidden)
    with pytest.raises(ValueError, match="visible has shape"):
        wrong = [VLRequest(p, im, visible=np.ones(counts[0] + 1, bool)) for p, im in rows[:1]]
        build_mm_batch(engine.model, engine.processor, wrong)
    outs = engine.generate(masked, SamplingSettings(max_new_tokens=4, mask_mode="drop"))
    assert len(outs) == len(rows) and all(o.token_ids for o in outs)
    argmax = engine.teacher_forced_argmax([VLRequest(p, im, "a red circle") for p, im in rows])
    assert all(len(o.token_ids) > 0 for o in argmax)


def test_learner_logps_with_mixed_tiles_equal_plain_hf_forward(engine) -> None:  # noqa: ANN001
    from mmalign.logprobs import to_pil

    images = [im for _, im in _rows(engine)]
    questions = ["Describe the image."] * len(images)
    responses = [["a red circle.", "two blue squares."]] * len(images)
    batch = build_response_batch(engine.processor, images, questions, responses)
    assert batch["pixel_values"].dim() == 5  # [G*B, max tiles, C, H, W], zero-padded
    with torch.no_grad():
        ours = model_response_logps(engine.model, batch)
    prompt = default_prompt_text(engine.processor, questions[0])
    tok = engine.processor.tokenizer
    for g in range(2):
        for b, image in enumerate(images):
            enc = engine.processor(images=[to_pil(image)], text=[prompt], return_tensors="pt")
            full = tok(prompt + " " + responses[b][g], add_special_tokens=False)["input_ids"]
            head = tok(prompt, add_special_tokens=False)["input_ids"]
            resp = [*full[len(head) :], tok.eos_token_id]
            ids = torch.cat([enc["input_ids"], torch.tensor([resp])], 1)
            with torch.no_grad():
                logits = engine.model(
                    input_ids=ids, pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"]
                ).logits[0]
            start = enc["input_ids"].shape[1]
            lp = torch.log_softmax(logits[start - 1 : -1], -1)
            ref = lp.gather(-1, torch.tensor(resp)[:, None]).sum()
            torch.testing.assert_close(ours[g * len(images) + b], ref, atol=1e-4, rtol=1e-4)


def test_bdhs_engine_masks_each_rows_own_image_tokens(engine) -> None:  # noqa: ANN001
    from mmalign.config import BDHSConfig, SamplerConfig
    from mmalign.engines.bdhs_engine import BDHSEngine

    def embed(texts: list[str]) -> np.ndarray:  # one-hot by text: distinct texts differ
        return np.stack([np.eye(64)[hash(t) % 64] for t in texts])

    bdhs = BDHSConfig(rho_th=0.5, n_bdhs=2, eps_s=0.97)
    sampler = BDHSEngine(engine, embed, SamplerConfig(max_new_tokens=6), bdhs)
    rows = [
        sampler.prepare("Describe the image.", im, "A red circle. A blue square.", i)
        for i, (_, im) in enumerate(_rows(engine))
    ]
    assert [r.n_image for r in rows] == _processor_counts(engine, _rows(engine))
    out = sampler.sample(rows)
    for row, res in zip(rows, out):
        assert res["meta"]["image_tokens"] == row.n_image
        # rho_th 0.5 keeps about half of *this row's* positions visible
        assert 0.2 < res["meta"]["mask_density"] < 0.8, res["meta"]


def test_lora_merge_round_trips_and_other_architectures_fail_at_load(
    engine,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    from transformers import AutoConfig

    from mmalign.config import LearnerConfig
    from mmalign.engines.learner import PreferenceLearner

    learner = PreferenceLearner(engine.model, engine.processor, LearnerConfig(lora_r=4, lr=1e-2))
    rows = [
        {"id": str(i), "prompt": "Describe the image.", "image": im, "chosen": "a red circle.",
         "rejected": "two blue squares.", "rejected_extra": [], "responses": []}
        for i, (_, im) in enumerate(_rows(engine))
    ]  # fmt: skip
    learner.step(rows)
    merged = learner.merged_model()
    merged.save_pretrained(tmp_path / "merged")
    engine.processor.save_pretrained(tmp_path / "merged")
    again, _ = load_model(str(tmp_path / "merged"))
    assert type(again).__name__ == "LlavaNextForConditionalGeneration"
    with torch.no_grad():
        want = learner.policy_logps(rows[:2])
    batch = build_response_batch(
        engine.processor, [r["image"] for r in rows[:2]], [r["prompt"] for r in rows[:2]],
        [[r["chosen"]] for r in rows[:2]],
    )  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model_response_logps(again, batch), want, atol=1e-4, rtol=1e-4)

    other = AutoConfig.for_model("llama")
    other.architectures = ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="architecture LlamaForCausalLM is not supported"):
        check_architecture(other, "some/model")


def test_readme_names_every_supported_architecture() -> None:
    """The README's model table and loading.SUPPORTED list the same classes."""
    import re

    from mmalign.models.loading import SUPPORTED

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Models", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))
    assert rows == set(SUPPORTED)
