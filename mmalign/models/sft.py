"""Supervised fine-tuning of a (tiny) LLaVA on LLaVA-style conversation records.

The loss is the mean token cross-entropy over assistant tokens only (the answer and its
closing "</s>"); prompt and image tokens carry label -100. Sequences are right-padded so
that positions need no position_ids (HF Llama numbers positions 0..L-1 in a plain
forward, which is only right for right padding).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mmalign.models.tiny_llava import format_answer, format_prompt
from mmalign.shapes.render import from_png

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTConfig:
    """Optimisation settings of `train_sft`."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    """Conversations per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (tiny models from scratch tolerate a large one)."""
    warmup_steps: int = 50
    """Linear warm-up steps, then cosine decay to lr * min_lr_ratio."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global grad norm."""
    seed: int = 0
    """Seed of batch order."""
    log_every: int = 50
    """Log every this many steps."""
    image_dropout: float = 0.0
    """Fraction of conversations trained with every image token hidden (attention 0,
    positions kept: the "mask" semantics of BDHS), so that with the image masked the
    model answers from its language prior, as a text-pretrained LLM does, instead of
    producing out-of-distribution noise."""
    loss_per: str = "token"
    """"token": mean over all answer tokens of the batch (long descriptions dominate);
    "example": mean over conversations of each one's mean token loss, so a one-word
    yes/no answer weighs as much as a four-sentence description."""


@dataclass
class TokenizedSet:
    """A dataset ready for training: N conversations, right-padded to length L.

    input_ids: (N, L) int64; labels: (N, L) int64 with IGNORE_INDEX outside the answer;
    attention_mask: (N, L) int64; pixel_values: (N, 3, H, W) float32, processor-normalised.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows idx, trimmed to the longest real sequence among them."""
        length = int(self.attention_mask[idx].sum(1).max())
        return {
            "input_ids": self.input_ids[idx, :length],
            "labels": self.labels[idx, :length],
            "attention_mask": self.attention_mask[idx, :length],
            "pixel_values": self.pixel_values[idx],
        }


def split_record(record: dict) -> tuple[str, str]:
    """(question without the "<image>\\n" marker, answer) of a single-turn record."""
    human, gpt = record["conversations"][0]["value"], record["conversations"][1]["value"]
    return human.replace("<image>\n", "").replace("<image>", "").strip(), gpt


def tokenize_records(processor, records: Sequence[dict], chunk: int = 512) -> TokenizedSet:  # noqa: ANN001
    """Tokenize single-turn image conversations for SFT (see TokenizedSet for shapes)."""
    tok = processor.tokenizer
    ids_rows: list[list[int]] = []
    label_rows: list[list[int]] = []
    pixels: list[torch.Tensor] = []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        qa = [split_record(r) for r in part]
        images = [from_png(r["image"]) for r in part]
        prompts = [format_prompt(q) for q, _ in qa]
        enc_prompt = processor(text=prompts, images=images, return_tensors="np", padding=False)
        enc_answer = tok([format_answer(a) for _, a in qa], add_special_tokens=False)
        pixels.append(torch.as_tensor(enc_prompt["pixel_values"], dtype=torch.float32))
        for p_ids, a_ids in zip(enc_prompt["input_ids"], enc_answer["input_ids"], strict=True):
            ids_rows.append(list(p_ids) + list(a_ids))
            label_rows.append([IGNORE_INDEX] * len(p_ids) + list(a_ids))
    length = max(len(r) for r in ids_rows)
    n = len(ids_rows)
    input_ids = torch.full((n, length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(ids_rows, label_rows, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return TokenizedSet(input_ids, labels, mask, torch.cat(pixels))


def sft_loss(model, batch: dict[str, torch.Tensor], per: str = "token") -> torch.Tensor:  # noqa: ANN001
    """Cross-entropy over answer tokens (labels != IGNORE_INDEX); scalar tensor.

    per="token": mean over every answer token of the batch; per="example": mean over
    rows of each row's mean answer-token loss (see SFTConfig.loss_per).

    The LM head runs only on the positions that predict an answer token: with 64 image
    tokens most positions are prompt, and the head is a third of the tiny model's compute.
    """
    hidden = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    ).last_hidden_state  # (B, L, H)
    targets = batch["labels"][:, 1:]  # token t is predicted from position t-1
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep])  # (n_answer_tokens, V)
    if per == "token":
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep])
    if per != "example":
        raise ValueError(f"SFTConfig.loss_per must be 'token' or 'example', got {per!r}")
    token_loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
    counts = keep.sum(1)  # (B,) answer tokens per row
    rows = keep.nonzero()[:, 0]  # row of each kept token, row-major like targets[keep]
    weights = 1.0 / counts[rows].clamp(min=1)
    return (token_loss * weights).sum() / int((counts > 0).sum())


def shuffled_batches(n: int, batch_size: int, rng: random.Random) -> Iterator[torch.Tensor]:
    """Endless batches of row indices (long [batch_size]): epochs of a fresh shuffle of
    range(n), a batch may straddle two epochs. Draws from `rng` only when it refills."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        yield torch.tensor(order[:batch_size])
        order = order[batch_size:]


def hide_images(
    model,  # noqa: ANN001
    batch: dict[str, torch.Tensor],
    prob: float,
    rng: random.Random,
) -> torch.Tensor:
    """attention_mask with every image position zeroed in each row drawn with prob `prob`."""
    image_id = getattr(model.config, "image_token_id", None)
    if image_id is None:
        image_id = model.config.image_token_index
    rows = torch.tensor([rng.random() < prob for _ in range(batch["input_ids"].shape[0])])
    hidden = rows[:, None] & (batch["input_ids"] == image_id)
    return batch["attention_mask"].masked_fill(hidden, 0)


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Learning rate at `step` (0-based): linear warm-up, then cosine to lr*min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def train_sft(
    model,  # noqa: ANN001 (LlavaForConditionalGeneration)
    data: TokenizedSet,
    cfg: SFTConfig,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train in place for cfg.steps steps; returns the loss of every step."""
    model.train()
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    batches = shuffled_batches(len(data), cfg.batch_size, rng)
    losses: list[float] = []
    t0 = time.time()
    for step in range(cfg.steps):
        idx = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = data.batch(idx)
        if cfg.image_dropout > 0:
            batch["attention_mask"] = hide_images(model, batch, cfg.image_dropout, rng)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = sft_loss(model, batch, cfg.loss_per)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step == 0:
            recent = losses[-cfg.log_every :]
            log(
                f"step {step + 1}/{cfg.steps} loss {sum(recent) / len(recent):.4f} "
                f"lr {lr_at(step, cfg):.2e} {time.time() - t0:.0f}s"
            )
    model.eval()
    return losses
