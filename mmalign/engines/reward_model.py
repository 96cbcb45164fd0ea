"""A reward model for the RLHF baselines ([ALIGN] Sec. 5.5): the LLaVA policy architecture
with a scalar head on the last response token, LoRA on the language model, the head trained
in full, Bradley-Terry loss on preference pairs (`mmalign.losses.bradley_terry_loss`).

Saved in Hugging Face format: the merged LLaVA (`save_pretrained` + processor) plus
`reward_head.safetensors` and `reward_head.json` beside it; `RewardModel.load` reads both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmalign.config import LearnerConfig
from mmalign.engines.learner import encode_rows, text_hidden_size
from mmalign.logprobs import split_groups
from mmalign.losses import bradley_terry_loss

HEAD_FILE, HEAD_META = "reward_head.safetensors", "reward_head.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] index of each row's last real token (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


class RewardModel:
    """score(rows, key) -> [B] scalar rewards; step(rows) trains on (chosen, rejected).

    `model`: a LLaVA (taken over; LoRA is injected when `settings.lora_r` > 0, else the
    model stays frozen and only the head trains). `settings`: the learner section as it is
    (lr, lora_*, max_grad_norm, max_response_tokens, seed); `head` restores a saved head."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        settings: LearnerConfig,
        head: torch.nn.Linear | None = None,
    ) -> None:
        from peft import get_peft_model

        from mmalign.engines.learner import _fork_rng, lora_config

        self.settings, self.processor = settings, processor
        generator = torch.Generator().manual_seed(settings.seed)
        param = next(model.parameters())
        if settings.lora_r > 0:
            with _fork_rng(settings.seed):  # LoRA init as the preference learner's
                model = get_peft_model(model, lora_config(settings))
        else:
            model.requires_grad_(False)
        self.model = model
        if head is None:
            hidden = text_hidden_size(model)
            head = torch.nn.Linear(hidden, 1)
            with torch.no_grad():
                head.weight.normal_(0.0, 1.0 / hidden**0.5, generator=generator)
                head.bias.zero_()
        self.head = head.to(param.device, param.dtype)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": params}, {"params": list(self.head.parameters())}],
            lr=settings.lr,
            weight_decay=settings.weight_decay,
        )
        self.steps = 0

    def _batch(self, rows: Sequence[Mapping[str, Any]], responses: list[list[str]]) -> dict:
        return encode_rows(
            self.model, self.processor, rows, responses, self.settings.max_response_tokens
        )

    def _scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "response_mask")}
        out = self.model(**inputs, use_cache=False, output_hidden_states=True)
        last = out.hidden_states[-1]  # [N, T, D], after the final norm
        index = last_token_index(batch["attention_mask"])
        picked = last[torch.arange(last.shape[0], device=last.device), index]
        return self.head(picked).squeeze(-1)

    @torch.no_grad()
    def score(self, rows: Sequence[Mapping[str, Any]], key: str = "chosen") -> torch.Tensor:
        """[B] rewards of rows[i][key] for rows[i]'s image and prompt (eval mode)."""
        was = self.model.training
        self.model.eval()
        try:
            return self._scores(self._batch(rows, [[r[key]] for r in rows])).float().cpu()
        finally:
            self.model.train(was)

    def step(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """One update on B pairs: Bradley-Terry loss of (chosen, rejected), clipped at
        settings.max_grad_norm. Returns loss, accuracy (chosen scored higher) and margin."""
        self.model.train()
        batch = self._batch(rows, [[r["chosen"], r["rejected"]] for r in rows])
        scores = split_groups(self._scores(batch), 2)  # [B, 2]
        losses = bradley_terry_loss(scores[:, 0], scores[:, 1])
        loss = losses.mean()
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        margin = (scores[:, 0] - scores[:, 1]).detach()
        return {
            "loss": float(loss.detach()),
            "accuracy": float((margin > 0).float().mean()),
            "margin": float(margin.mean()),
        }

    def save(self, directory: str) -> None:
        """Merged LLaVA + processor in HF format, and the head beside them."""
        from safetensors.torch import save_file

        model: Any = self.model
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, os.path.join(directory, HEAD_FILE))
        meta = {"hidden_size": self.head.in_features, "pooling": "last_token", "steps": self.steps}
        with open(os.path.join(directory, HEAD_META), "w") as f:
            json.dump(meta, f)

    @classmethod
    def load(
        cls, directory: str, settings: LearnerConfig | None = None, dtype: str = "float32"
    ) -> RewardModel:
        """A saved reward model (no LoRA injected: settings.lora_r 0 unless given)."""
        from safetensors.torch import load_file

        from mmalign.models.loading import load_model

        model, processor = load_model(directory, dtype)
        path = os.path.join(directory, HEAD_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory}: no {HEAD_FILE}; not a saved reward model")
        state = load_file(path)
        head = torch.nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        return cls(model, processor, settings or LearnerConfig(lora_r=0), head=head)
