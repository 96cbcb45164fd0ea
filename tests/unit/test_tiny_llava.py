"""The tiny LLaVA builds offline, round-trips through the Auto classes and generates."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.models.tiny_llava import build_tiny_llava, count_parameters, format_prompt
from mmalign.models.tiny_tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def saved_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    torch.set_num_threads(1)
    model, processor = build_tiny_llava("small", seed=0)
    path = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor


def test_tokenizer_is_deterministic_and_encodes_any_ascii_on_cpu() -> None:
    a, b = build_tokenizer(), build_tokenizer()
    assert a.to_str() == b.to_str()
    text = string.printable + " Zebra qwxz ~~ {}[]"
    enc = a.encode(text)
    assert a.decode(enc.ids, skip_special_tokens=True) == text
    # ShapesWorld words are single tokens (the model sees each word as one symbol).
    assert a.encode(" red circle wedge", add_special_tokens=False).tokens == [
        "Ġred",
        "Ġcircle",
        "Ġwedge",
    ]


def test_sizes_and_head_dim_on_cpu() -> None:
    small, _ = build_tiny_llava("small")
    large, _ = build_tiny_llava("large")
    assert 0.5e6 < count_parameters(small) < 1.5e6
    assert count_parameters(large) > 2 * count_parameters(small)
    for m in (small, large):
        tc = m.config.text_config
        assert tc.head_dim == 64 and tc.hidden_size == 64 * tc.num_attention_heads
    with pytest.raises(ValueError, match="size"):
        build_tiny_llava("huge")


def test_auto_classes_reload_and_generate_on_cpu(saved_small: tuple[Path, object, object]) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path, model, _ = saved_small
    assert (path / "model.safetensors").exists()
    model2 = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor2 = AutoProcessor.from_pretrained(path)
    assert type(model2).__name__ == "LlavaForConditionalGeneration"
    assert type(processor2).__name__ == "LlavaProcessor"

    image = Image.new("RGB", (32, 32), (255, 0, 0))
    inputs = processor2(
        images=image, text=format_prompt("Describe the image in detail."), return_tensors="pt"
    )
    image_id = model2.config.image_token_index
    assert int((inputs["input_ids"] == image_id).sum()) == 64  # (32 / 4) ** 2 patches
    assert inputs["input_ids"][0, 0].item() == processor2.tokenizer.bos_token_id
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)

    with torch.no_grad():
        logits = model2(**inputs).logits
        ref = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor2.tokenizer))
    torch.testing.assert_close(logits, ref)

    out = model2.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4 or (
        out[0, -1].item() == processor2.tokenizer.eos_token_id
    )
    # The image matters: a different image changes the logits.
    other = processor2(
        images=Image.new("RGB", (32, 32), (0, 0, 255)),
        text=format_prompt("Describe the image in detail."),
        return_tensors="pt",
    )
    with torch.no_grad():
        assert not torch.allclose(model2(**other).logits[0, -1], logits[0, -1])


def test_chat_template_matches_format_prompt_on_cpu(
    saved_small: tuple[Path, object, object],
) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(saved_small[0])
    user = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "Is there a red box?"}],
    }
    prompt = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert prompt == format_prompt("Is there a red box?")
    full = processor.apply_chat_template(
        [user, {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}],
        tokenize=False,
    )
    assert full == format_prompt("Is there a red box?") + " Yes.</s>"
