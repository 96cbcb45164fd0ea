"""Tiny random-weight LLaVA (CLIP vision tower + Llama text model), built fully offline.

The result is a real `LlavaForConditionalGeneration` + `LlavaProcessor` pair: after
`save_pretrained(dir)` it loads with `AutoModelForImageTextToText.from_pretrained(dir)`
and `AutoProcessor.from_pretrained(dir)` exactly like a LLaVA-1.5 checkpoint, and the
text model uses head_dim 64 so vLLM's attention kernels accept it.

Prompt format (LLaVA-1.5): "USER: <image>\\n{question} ASSISTANT:" and the answer
follows with a leading space and ends with "</s>". `format_prompt` / `format_answer`
build those strings; the processor's chat template produces the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmalign.models.tiny_tokenizer import BOS, EOS, IMAGE, PAD, build_tokenizer

DEFAULT_IMAGE_SIZE = 32
DEFAULT_PATCH_SIZE = 4

# Handles content given as a plain string or as a list of {"type": "image"|"text"} parts.
# Images are rendered before the text of a turn, as in llava-1.5-hf.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' }}"
    "{% else %}{{ '' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    """Widths and depths of a LLaVA (CLIP tower + Llama). The defaults are the tiny models':
    64-wide heads, the tokenizer's vocabulary, the vision tower's last layer (with 2-3 layers,
    LLaVA's -2 would waste a third of them), 1,024 positions."""

    text_hidden: int
    text_layers: int
    text_intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_intermediate: int
    text_heads: int = 0
    """Attention heads of the LLM (0: text_hidden // 64)."""
    vision_heads: int = 0
    """Attention heads of the CLIP tower (0: vision_hidden // 64)."""
    vocab: int = 0
    """LLM vocabulary rows (0: the tokenizer's size; rows beyond it are never used)."""
    vision_feature_layer: int = -1
    """CLIP layer whose features feed the projector (LLaVA: -2)."""
    max_positions: int = 1024
    """LLM context length."""


SIZES: dict[str, TinySize] = {
    # ~0.9M parameters: the policy.
    "small": TinySize(128, 2, 256, 128, 2, 256),
    # ~2.7M parameters: judge / larger expert.
    "large": TinySize(192, 4, 512, 128, 3, 256),
}


def format_prompt(question: str, with_image: bool = True) -> str:
    """Prompt text up to and including "ASSISTANT:" (the answer starts with a space)."""
    image = f"{IMAGE}\n" if with_image else ""
    return f"USER: {image}{question} ASSISTANT:"


def format_answer(answer: str) -> str:
    """Answer text as it follows `format_prompt` in training data: " {answer}</s>"."""
    return f" {answer}{EOS}"


def build_processor(image_size: int = DEFAULT_IMAGE_SIZE, patch_size: int = DEFAULT_PATCH_SIZE):
    """The tiny models' LlavaProcessor (byte-level BPE tokenizer, CLIP image processor at
    `image_size`, (image_size / patch_size) ** 2 image tokens per image); no network."""
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    try:  # transformers >= 5.2x: the PIL backend needs no torchvision
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor  # type: ignore[assignment]

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",  # generation batches are left-padded
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
    image_processor = ImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by "default"
    )


def build_tiny_llava(
    size: str = "small",
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    patch_size: int = DEFAULT_PATCH_SIZE,
):
    """Build a random-weight tiny LLaVA and its processor (no network access).

    Args:
        size: key of SIZES ("small" or "large").
        seed: torch seed for the weight initialisation.
        image_size: square input resolution in pixels (a multiple of patch_size); the
            processor resizes/crops every image to it.
        patch_size: CLIP patch side in pixels; the prompt holds (image_size / patch_size)
            ** 2 image tokens.

    Returns:
        (LlavaForConditionalGeneration in float32, LlavaProcessor).
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    dims = SIZES[size]
    processor = build_processor(image_size, patch_size)
    tokenizer = processor.tokenizer

    config = llava_config(dims, processor, image_size, patch_size)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()  # type: ignore[arg-type]
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def llava_config(dims: TinySize, processor, image_size: int, patch_size: int):  # noqa: ANN001
    """The LlavaConfig of `dims` for `processor` (`build_processor(image_size, patch_size)`):
    its image and special tokens, (image_size / patch_size) ** 2 image tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer = processor.tokenizer
    text_heads = dims.text_heads or dims.text_hidden // 64
    vision_config = CLIPVisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=dims.vision_intermediate,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads or dims.vision_hidden // 64,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=dims.vision_hidden,
    )
    text_config = LlamaConfig(
        vocab_size=max(dims.vocab, len(tokenizer)),
        hidden_size=dims.text_hidden,
        intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        head_dim=dims.text_hidden // text_heads,
        max_position_embeddings=dims.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=int(tokenizer.convert_tokens_to_ids(IMAGE)),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=dims.vision_feature_layer,
    )


def count_parameters(model) -> int:  # noqa: ANN001 (torch.nn.Module)
    """Number of parameters of a model."""
    return sum(p.numel() for p in model.parameters())
