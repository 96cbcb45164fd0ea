"""The plain HF + peft DPO step that `bench_learner.py --impl hf-peft` measures against.

What a user writes without a framework: peft LoRA on the same LLM linears (the learner's
`lora_config`), then per step four separate forwards (policy chosen, policy rejected, and
both again with the adapters disabled for the reference), full-vocabulary log-softmax in
float32, DPO loss, backward, gradient clipping at 1, AdamW. What it shares with the
learner so that only the step's structure differs: the tokenization
(`build_response_batch`), bf16 autocast on CUDA, LoRA dropout 0 (the bench sets the
learner's too) and non-reentrant gradient checkpointing when asked. Both do the same model
FLOPs per step (`bench/flops.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mmalign.config import LearnerConfig
from mmalign.engines.learner import cuda_bf16_autocast, lora_config
from mmalign.logprobs import IGNORE_INDEX, build_response_batch


class HFPeftDPO:
    def __init__(
        self,
        model: Any,
        processor: Any,
        lora_r: int,
        lr: float = 1e-5,
        beta: float = 0.1,
        gradient_checkpointing: bool = False,
    ) -> None:
        from peft import get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        lora = LearnerConfig(lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0)
        self.model = get_peft_model(model, lora_config(lora))
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.model.train()  # checkpointing only acts in training mode
        self.processor = processor
        self.beta = beta
        self.device = next(model.parameters()).device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)

    def encode(self, rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, torch.Tensor]:
        """One G = 1 batch of `rows`' `key` answers ("chosen" / "rejected") on the device."""
        batch = build_response_batch(
            self.processor,
            [r["image"] for r in rows],
            [r["prompt"] for r in rows],
            [[r[key]] for r in rows],
        )
        dtype = next(self.model.parameters()).dtype
        out = {k: v.to(self.device) for k, v in batch.items()}
        out["pixel_values"] = out["pixel_values"].to(dtype)
        return out

    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] summed response log-probs, the textbook way: full log-softmax over [B, T, V]."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "response_mask")}
        with cuda_bf16_autocast(self.device):
            logits = self.model(**inputs, use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        logp = F.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(-1)

    def step(self, rows: Sequence[Mapping[str, Any]]) -> float:
        """One optimizer step of DPO on `rows`; returns the loss."""
        chosen, rejected = self.encode(rows, "chosen"), self.encode(rows, "rejected")
        with torch.no_grad(), self.model.disable_adapter():
            ref_c, ref_r = self.logps(chosen), self.logps(rejected)
        pol_c, pol_r = self.logps(chosen), self.logps(rejected)
        delta = (pol_c - ref_c) - (pol_r - ref_r)
        loss = -F.logsigmoid(self.beta * delta).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
