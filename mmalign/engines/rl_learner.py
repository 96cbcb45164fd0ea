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
from mmalign.engines.learner import PreferenceLearner
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
        (loss / self.settings.grad_accum).backward()
        self.micro_step += 1
        out = {
            "loss": float(loss.detach()),
            "reward": float(rl.normalize_rewards(rewards, reward_mean, reward_std).mean()),
            "kl": float(kl.mean()),
            "advantage_abs": float(advantages.abs().mean()),
            "lr": self.optimizer.param_groups[0]["lr"],
            "stepped": 0.0,
        }
        if self.micro_step % self.settings.grad_accum == 0:
            out["grad_norm"] = self._optimizer_step()
            out["stepped"] = 1.0
        return out
