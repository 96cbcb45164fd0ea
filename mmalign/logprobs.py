"""Response log-probs for (image, prompt, response) triples, and the batches that feed them.

`response_logps` is the pure part: summed log-probs of the response tokens, taken from
logits [B, T, V] and labels [B, T] (labels = token ids on response positions, -100 on prompt,
image and padding positions). `build_response_batch` turns rows of plain strings and images
into one padded batch holding *all* responses of every row (chosen, rejected, extra rejected,
ranked MDPO responses), so the policy runs one forward per step, not one per response.

Padding: every row carries explicit position_ids = cumsum(attention_mask) - 1, so a row gets
the same positions (and hence the same log-probs) under left or right padding; this is also
what `generate()` uses, so sampling and training score tokens at the same positions.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labels, with the causal shift.

    Args:
        logits: [B, T, V]; logits[:, t] predicts token t + 1.
        labels: [B, T] token ids, IGNORE_INDEX (-100) where no log-prob is wanted.

    Returns:
        (logps [B, T-1] float32 (float64 for a float64 model), zero where masked; mask
        [B, T-1] bool), aligned with labels[:, 1:].
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    # Only response rows go through log_softmax: with ~600 image tokens per row the response
    # is a small fraction of T, and a full [B, T, V] float32 copy would dominate memory.
    # Half-precision logits are upcast; float64 ones keep their precision.
    picked = logits[:, :-1][mask]
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))  # [N, V]
    lp = picked.log_softmax(-1).gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)  # [N]
    out = torch.zeros(target.shape, dtype=lp.dtype, device=logits.device)
    out = out.masked_scatter(mask, lp)
    return out, mask


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of response-token log-probs, [B] (nats; dtype and shapes as in `token_logps`)."""
    lp, _ = token_logps(logits, labels)
    return lp.sum(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask -> [B, T] positions counting real tokens only (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def to_pil(image: Any) -> Any:
    """PNG/JPEG bytes, a PIL image, or a schema image struct {"bytes", "path"} -> RGB PIL
    (the path read through mmalign.storage: local or s3://)."""
    from PIL import Image

    if isinstance(image, dict):  # mmalign.schema IMAGE struct: bytes win over a path
        from mmalign import storage  # a path may be local or s3:// (LLaVA JSON on S3)

        image = image.get("bytes") or storage.read_bytes(image["path"])
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected image bytes or PIL.Image, got {type(image).__name__}")
    return image.convert("RGB")


def default_prompt_text(processor: Any, prompt: str) -> str:
    """Wrap a plain question into the model's chat format with one image placeholder.

    Uses the processor's chat template when it has one, else the LLaVA-1.5 format
    "USER: <image>\\n{prompt} ASSISTANT:".
    """
    if getattr(processor, "chat_template", None):
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        return processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
    return f"USER: {processor.image_token}\n{prompt} ASSISTANT:"


def build_response_batch(
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    padding_side: str = "right",
    append_eos: bool = True,
    max_response_tokens: int | None = None,
    format_prompt: Callable[[Any, str], str] = default_prompt_text,
    response_prefix: str = " ",
) -> dict[str, torch.Tensor]:
    """Encode B rows with G responses each into one batch of G*B sequences.

    Args:
        processor: a LLaVA processor (tokenizer + image processor, expands `<image>`).
        images: B images (PNG bytes or PIL).
        prompts: B plain questions; wrapped by `format_prompt(processor, prompt)`.
        responses: B lists of G response strings (same G for every row), e.g.
            [chosen, rejected] or MDPO's ranked list.
        padding_side: "right" or "left"; results do not depend on it (explicit position_ids).
        append_eos: end each response with EOS so the model is scored on stopping too.
        max_response_tokens: truncate each response to this many tokens (incl. EOS).
        response_prefix: text between the prompt and the response (LLaVA-1.5: one space
            after "ASSISTANT:"). Response tokens are those of tokenize(prompt + prefix +
            response) after tokenize(prompt), so they match how the model sees an answer.

    Returns:
        dict with input_ids, attention_mask, position_ids, labels [G*B, T] (labels hold the
        response token ids and IGNORE_INDEX elsewhere), response_mask [G*B, T] bool, and
        pixel_values [G*B, C, H, W] (plus any other per-image processor outputs). Row order is
        group-major: row g*B + b is response g of input row b; `split_groups` undoes it.
    """
    g = _group_size(images, prompts, responses, padding_side)
    tok = processor.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    prompt_texts = [format_prompt(processor, p) for p in prompts]
    prompt_ids, image_feats = _encode_prompts(processor, images, prompt_texts)
    seqs: list[tuple[list[int], int]] = []  # (token ids, prompt length), group-major
    for gi in range(g):
        for bi in range(len(prompts)):
            ids = _response_ids(tok, prompt_texts[bi], response_prefix + responses[bi][gi])
            if append_eos and eos is not None:
                ids = ids + [eos]
            if max_response_tokens is not None:
                ids = ids[:max_response_tokens]
            seqs.append((prompt_ids[bi] + ids, len(prompt_ids[bi])))

    batch = _pad_sequences(seqs, pad, padding_side)
    for key in image_feats[0] if image_feats else ():
        per_row = stack_image_inputs([f[key] for f in image_feats])  # [B, ...]
        batch[key] = per_row.repeat(g, *([1] * (per_row.dim() - 1)))  # group-major like rows
    return batch


def sequence_length(
    processor: Any,
    image: Any,
    prompt: str,
    responses: Sequence[str],
    max_response_tokens: int | None = None,
) -> int:
    """Positions of the longest sequence `build_response_batch` makes for one row: the
    prompt with its image tokens expanded, then a response (+ EOS, truncated alike)."""
    batch = build_response_batch(
        processor, [image], [prompt], [list(responses)], max_response_tokens=max_response_tokens
    )
    return int(batch["input_ids"].shape[1])


def stack_image_inputs(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row processor outputs [1, ...] -> [B, ...]. LLaVA-1.6 (AnyRes) gives each image
    its own number of tiles (pixel_values [1, n_b, C, H, W]); rows are zero-padded to the
    largest n_b, as the processor pads a batch: the model keeps only each image's first
    n_b tiles (from `image_sizes`), so the padding never reaches a feature."""
    if len({tuple(v.shape[1:]) for v in values}) <= 1:
        return torch.cat(list(values), 0)
    if len({v.dim() for v in values}) != 1 or len({tuple(v.shape[2:]) for v in values}) != 1:
        shapes = sorted({tuple(v.shape) for v in values})
        raise ValueError(f"image inputs of different shapes cannot be batched: {shapes}")
    n = max(v.shape[1] for v in values)
    out = values[0].new_zeros((len(values), n, *values[0].shape[2:]))
    for b, v in enumerate(values):
        out[b, : v.shape[1]] = v[0]
    return out


def _group_size(
    images: Sequence[Any],
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    padding_side: str,
) -> int:
    """G, the responses per row, after checking the batch's lengths and `padding_side`."""
    b = len(prompts)
    if len(images) != b or len(responses) != b:
        raise ValueError(f"got {len(images)} images, {b} prompts, {len(responses)} responses")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    g = len(responses[0]) if b else 0
    if any(len(r) != g for r in responses):
        raise ValueError("every row needs the same number of responses")
    return g


def _encode_prompts(
    processor: Any, images: Sequence[Any], prompt_texts: Sequence[str]
) -> tuple[list[list[int]], list[dict[str, torch.Tensor]]]:
    """(prompt token ids with the image tokens expanded, per-image processor outputs such as
    pixel_values [1, C, H, W]) of each row."""
    prompt_ids: list[list[int]] = []
    image_feats: list[dict[str, torch.Tensor]] = []
    for image, text in zip(images, prompt_texts, strict=True):
        enc = processor(text=text, images=to_pil(image), return_tensors="pt")
        prompt_ids.append(enc["input_ids"][0].tolist())
        image_feats.append(
            {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        )
    return prompt_ids, image_feats


def _pad_sequences(
    seqs: Sequence[tuple[list[int], int]], pad: int, padding_side: str
) -> dict[str, torch.Tensor]:
    """(token ids, prompt length) per sequence -> input_ids, attention_mask, position_ids,
    labels (response ids, IGNORE_INDEX elsewhere) and response_mask, all [N, T]."""
    t = max(len(s) for s, _ in seqs)
    n = len(seqs)
    input_ids = torch.full((n, t), pad, dtype=torch.long)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    for row, (ids, plen) in enumerate(seqs):
        start = t - len(ids) if padding_side == "left" else 0
        sl = slice(start, start + len(ids))
        input_ids[row, sl] = torch.tensor(ids)
        attention_mask[row, sl] = 1
        labels[row, start + plen : start + len(ids)] = torch.tensor(ids[plen:], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "labels": labels,
        "response_mask": labels != IGNORE_INDEX,
    }


def _response_ids(tokenizer: Any, prompt_text: str, response_text: str) -> list[int]:
    """Token ids of `response_text` as it is tokenized right after `prompt_text`.

    Tokenizing the response alone can differ from in context (a leading space becomes its
    own token in byte-level BPE; SentencePiece adds a prefix space), so take the tail of the
    joint tokenization. If a token straddles the boundary the split is ambiguous and the
    response is tokenized alone instead (still a valid tokenization of the same text).
    """
    head = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt_text + response_text, add_special_tokens=False)["input_ids"]
    if full[: len(head)] == head:
        return list(full[len(head) :])
    warnings.warn(
        "prompt/response token boundary merges; tokenizing the response alone", stacklevel=3
    )
    return list(tokenizer(response_text, add_special_tokens=False)["input_ids"])


def split_groups(values: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[G*B] group-major values (as from `build_response_batch`) -> [B, G]."""
    return values.view(num_groups, -1).transpose(0, 1)


def model_response_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward a LLaVA model on a `build_response_batch` batch -> [G*B] summed logps."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "response_mask")}
    out = model(**inputs, use_cache=False)
    return response_logps(out.logits, batch["labels"])
