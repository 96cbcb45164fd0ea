"""The plain HF + peft DPO step that `bench_learner.py --impl hf-peft` measures against.

What a user writes without a framework: peft LoRA on the same LLM linears, then per step
four separate forwards (policy chosen, policy rejected, and both again with the adapters
disabled for the reference), full-vocabulary log-softmax in float32, DPO loss, backward,
AdamW. Same tokenization as the learner (`build_response_batch`), so both implementations
do the same model FLOPs per step (`bench/flops.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mmalign.logprobs import build_response_batch

LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HFPeftDPO:
    def __init__(
        self, model: Any, processor: Any, lora_r: int, lr: float = 1e-5, beta: float = 0.1
    ) -> None:
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        target = rf".*language_model\..*\.({'|'.join(LLM_LINEAR)})"
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=target)
        self.model = get_peft_model(model, lora)
        self.processor = processor
        self.beta = beta
        self.device = next(model.parameters()).device
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    def _encode(self, rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, torch.Tensor]:
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

    def _logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "response_mask")}
        logits = self.model(**inputs, use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        logp = F.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(-1)

    def step(self, rows: Sequence[Mapping[str, Any]]) -> float:
        chosen, rejected = self._encode(rows, "chosen"), self._encode(rows, "rejected")
        with torch.no_grad(), self.model.disable_adapter():
            ref_c, ref_r = self._logps(chosen), self._logps(rejected)
        pol_c, pol_r = self._logps(chosen), self._logps(rejected)
        delta = (pol_c - ref_c) - (pol_r - ref_r)
        loss = -F.logsigmoid(self.beta * delta).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
