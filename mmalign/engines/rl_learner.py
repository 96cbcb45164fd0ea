"""RLOO on LoRA ([ALIGN] App. A): the preference learner's model, optimizer, persistence and
weight sync, with an RLOO update instead of a preference loss.

One update takes B prompts with k sampled answers each and their scalar rewards (from a
reward model or the object-grounded judge). Rewards are normalised with the dataset's
statistics fixed once (`mmalign.rl.reward_stats`), the sequence KL to the reference (the
base with the adapter disabled) is subtracted with `kl_coef`, the leave-one-out baseline
gives each answer its advantage, and the loss is REINFORCE: -A * logp(y | x), averaged.
Gradient clipping, accumulation and the schedule are the learner's (`learner.*`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmalign import rl
from mmalign.engines.learner import PreferenceLearner, text_hidden_size
from mmalign.logprobs import model_response_logps, split_groups


class RLOOLearner(PreferenceLearner):
    """`rloo_step(rows, ...)`; everything else (state_dict, adapter_state, merged_model,
    checkpoints) is PreferenceLearner's."""

    def rloo_step(
        self,
        rows: Sequence[Mapping[str, Any]],
        reward_mean: float,
        reward_std: float,
        kl_coef: float,
    ) -> dict[str, float]:
        """rows: {image, prompt, samples: k answers, rewards: k floats} (the same k in
        every row, k >= 2). Returns loss, reward (normalised, before the KL), kl (sequence,
        k1), advantage_abs, lr, stepped and grad_norm (when the optimizer stepped)."""
        samples = [list(r["samples"]) for r in rows]
        rewards = torch.tensor([list(r["rewards"]) for r in rows], dtype=torch.float64)
        if rewards.shape != (len(rows), len(samples[0])) or any(len(s) < 2 for s in samples):
            raise ValueError("every row needs the same k >= 2 samples and one reward each")
        batch = self._batch(rows, samples)
        k = len(samples[0])
        with self._autocast():
            policy = split_groups(model_response_logps(self.model, batch), k)  # [B, k]
        ref = split_groups(self.reference_logps(batch), k)
        kl = rl.kl_estimate(policy.detach().double(), ref.double(), "k1")
        shaped = rl.normalize_rewards(rewards, reward_mean, reward_std) - kl_coef * kl.cpu()
        advantages = rl.leave_one_out_advantages(shaped).to(policy.device, policy.dtype)
        loss = rl.rloo_loss(policy, advantages).mean()
        return self._update(
            loss,
            reward=float(rl.normalize_rewards(rewards, reward_mean, reward_std).mean()),
            kl=float(kl.mean()),
            advantage_abs=float(advantages.abs().mean()),
        )

    def _update(self, loss: torch.Tensor, **metrics: float) -> dict[str, float]:
        """Backward of one micro-batch's loss, an optimizer step every `grad_accum` calls;
        the metrics with loss, lr, stepped and grad_norm (when it stepped)."""
        (loss / self.settings.grad_accum).backward()
        self.micro_step += 1
        out = {"loss": float(loss.detach()), **metrics}
        out["lr"], out["stepped"] = self.optimizer.param_groups[0]["lr"], 0.0
        if self.micro_step % self.settings.grad_accum == 0:
            out["grad_norm"] = self._optimizer_step()
            out["stepped"] = 1.0
        return out


def pack_responses(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] values at response positions (mask, one contiguous block a row) -> left-aligned
    [N, R] values and their 0/1 mask (R = the longest response)."""
    lengths = mask.sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    out = values.new_zeros((values.shape[0], width))
    packed = torch.zeros((values.shape[0], width), dtype=values.dtype, device=values.device)
    for i in range(values.shape[0]):
        row = values[i][mask[i]]
        out[i, : row.numel()] = row
        packed[i, : row.numel()] = 1
    return out, packed


class PPOLearner(RLOOLearner):
    """PPO on LoRA with a value head ([ALIGN] App. A): `ppo_step(rows, ...)`.

    The value head (a linear layer on the policy's last hidden state at each position
    predicting a response token) trains with the adapter; it is part of the learner's
    state (checkpoints and resume), not of the exported policy."""

    def __init__(self, model: Any, processor: Any, settings: Any, **kw: Any) -> None:
        hidden = text_hidden_size(model)
        param = next(model.parameters())
        # before the optimizer is built: the head joins the adapter's parameter group
        self.value_head = torch.nn.Linear(hidden, 1).to(param.device, param.dtype)
        with torch.no_grad():
            self.value_head.weight.zero_()
            self.value_head.bias.zero_()
        super().__init__(model, processor, settings, **kw)

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token log-probs [N, T-1], values [N, T-1]) aligned with labels[:, 1:]."""
        from mmalign.logprobs import token_logps

        inputs = {k: v for k, v in batch.items() if k not in ("labels", "response_mask")}
        with self._autocast():
            out = self.model(**inputs, use_cache=False, output_hidden_states=True)
            logps, _ = token_logps(out.logits, batch["labels"])
            values = self.value_head(out.hidden_states[-1][:, :-1]).squeeze(-1)
        return logps, values.to(logps.dtype)

    def ppo_step(
        self,
        rows: Sequence[Mapping[str, Any]],
        kl_coef: float,
        clip_eps: float = 0.2,
        clip_value: float = 0.2,
        vf_coef: float = 0.5,
        gamma: float = 1.0,
        lam: float = 0.95,
        epochs: int = 1,
    ) -> dict[str, float]:
        """rows: {image, prompt, samples, rewards} (rewards already normalised). Each sample
        is one episode: per-token reward -kl_coef * KL_t plus its reward on the last token,
        GAE advantages (whitened) and returns under the values before the update, then
        `epochs` clipped policy + value updates on the same batch."""
        samples = [list(r["samples"]) for r in rows]
        k = len(samples[0])
        if any(len(s) != k for s in samples):
            raise ValueError("every row needs the same number of samples")
        batch = self._batch(rows, samples)
        mask_full = batch["labels"][:, 1:] != -100
        scores = torch.tensor(
            [[float(x) for x in r["rewards"]] for r in rows], dtype=torch.float64
        ).T.reshape(-1)  # group-major, as build_response_batch orders the sequences
        with torch.no_grad(), self._eval_mode():
            old_lp, old_v = self._forward(batch)
            with self.model.disable_adapter():
                ref_lp, _ = self._forward(batch)
        old_lp, mask = pack_responses(old_lp.double(), mask_full)
        old_v, _ = pack_responses(old_v.double(), mask_full)
        ref_lp, _ = pack_responses(ref_lp.double(), mask_full)
        kl = rl.kl_estimate(old_lp, ref_lp, "k1")
        token_r = rl.token_rewards(scores.to(old_lp.device), kl, mask, kl_coef)
        adv, returns = rl.gae(token_r, old_v, mask, gamma, lam)
        adv = rl.whiten(adv, mask)
        out: dict[str, float] = {}
        for _ in range(epochs):
            lp, values = self._forward(batch)
            lp, _ = pack_responses(lp, mask_full)
            values, _ = pack_responses(values, mask_full)
            m = mask.to(lp.dtype)
            policy = rl.ppo_policy_loss(lp, old_lp.to(lp.dtype), adv.to(lp.dtype), m, clip_eps)
            value_loss = rl.ppo_value_loss(
                values, old_v.to(lp.dtype), returns.to(lp.dtype), m, clip_value
            )
            out = self._update(
                policy.loss + vf_coef * value_loss,
                policy_loss=float(policy.loss.detach()),
                value_loss=float(value_loss.detach()),
                clip_fraction=float(policy.clip_fraction),
                kl=float((kl * mask).sum(dim=1).mean()),
                reward=float(scores.mean()),
            )
        return out

    def _trainable(self) -> Any:  # the value head trains (and is clipped) with the adapter
        yield from super()._trainable()
        if hasattr(self, "value_head"):
            for name, p in self.value_head.named_parameters():
                yield f"value_head.{name}", p
