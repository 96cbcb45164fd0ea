"""RLHF baselines of [ALIGN] Sec. 5.5 / App. A (RLOO and PPO on LoRA) as pure tensor functions.

Like `mmalign.losses`, nothing here owns a model: the learner passes log-probs, values and
rewards in, and gets per-sample or per-token quantities back, so each formula is tested
against hand-computed numbers (tests/unit/test_rl.py).

Shapes: P prompts with k samples each ([P, k]) for RLOO; B sequences of T response tokens
([B, T]) with a 0/1 `mask` of the real tokens for PPO. Log-probs are of the sampled
tokens; `log_ratio` = logp_policy - logp_reference.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

KLKind = Literal["k1", "k2", "k3"]


# ---------------------------------------------------------------- rewards and KL


def reward_stats(rewards: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of a dataset's rewards, computed once before training (the paper
    normalises every reward by these, not by running batch statistics)."""
    if rewards.numel() < 2:
        raise ValueError("reward statistics need at least 2 rewards")
    flat = rewards.detach().double().flatten()
    return float(flat.mean()), float(flat.std(unbiased=True))


def normalize_rewards(
    rewards: torch.Tensor, mean: float, std: float, eps: float = 1e-8
) -> torch.Tensor:
    """(rewards - mean) / (std + eps) with the dataset's fixed statistics."""
    return (rewards - mean) / (std + eps)


def kl_estimate(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, kind: KLKind = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's estimators):
    k1 = log r, k2 = (log r)^2 / 2, k3 = (exp(-log r) - 1) + log r, with log r =
    logp_pi - logp_ref. k1 is unbiased but can be negative; k3 is unbiased and >= 0."""
    log_ratio = policy_logps - ref_logps
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"KL estimator must be k1, k2 or k3, got {kind!r}")


def kl_penalized(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Sequence rewards [B]: score - kl_coef * sum over real tokens of the per-token KL."""
    return scores - kl_coef * (kl * mask).sum(dim=-1)


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """PPO's per-token rewards [B, T]: -kl_coef * KL_t on every real token, plus the
    sequence's score on its last real token. A sequence with no real token is an error."""
    lengths = mask.sum(dim=-1).long()
    if bool((lengths == 0).any()):
        raise ValueError("every sequence needs at least one response token")
    out = -kl_coef * kl * mask
    last = lengths - 1  # response tokens are left-aligned: real tokens first
    out[torch.arange(out.shape[0]), last] += scores
    return out


# ---------------------------------------------------------------- RLOO


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[P, k] rewards of k samples per prompt -> advantage r_i - mean_{j != i} r_j
    (RLOO's baseline: the other samples of the same prompt; k >= 2)."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs >= 2 samples per prompt, got k = {k}")
    total = rewards.sum(dim=-1, keepdim=True)
    return rewards - (total - rewards) / (k - 1)


def rloo_loss(seq_logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Per-sample REINFORCE loss -A * logp(y|x) (the advantage is a constant: detached)."""
    if seq_logps.shape != advantages.shape:
        raise ValueError(f"shapes differ: {tuple(seq_logps.shape)} vs {tuple(advantages.shape)}")
    return -advantages.detach() * seq_logps


# ---------------------------------------------------------------- PPO


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, T] left-aligned response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last real token is 0: the episode
    ends there), A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V. Padding positions
    get 0 advantage and return. Returns (advantages, returns), both detached."""
    rewards, values, mask = rewards.detach(), values.detach(), mask.to(values.dtype)
    steps = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(steps)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # a padding position passes nothing back: the next real step's value/adv is 0
        next_value = values[:, t] * m
        next_adv = adv * m
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1."""
    count = mask.sum()
    if float(count) == 0:
        raise ValueError("masked_mean over an empty mask")
    return (x * mask).sum() / count


def whiten(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantages shifted and scaled to mean 0 / std 1 over the real tokens (padding 0)."""
    mean = masked_mean(advantages, mask)
    var = masked_mean((advantages - mean).square(), mask)
    return (advantages - mean) * torch.rsqrt(var + eps) * mask


class PPOPolicyLoss(NamedTuple):
    """loss: scalar (masked token mean); clip_fraction: share of tokens clipped; ratio_mean."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> PPOPolicyLoss:
    """The clipped surrogate: mean over real tokens of
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = exp(logp - logp_old)."""
    ratio = torch.exp(logps - old_logps.detach())
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(logps.dtype), mask)
    return PPOPolicyLoss(loss, clip_fraction.detach(), masked_mean(ratio, mask).detach())


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_value: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss: 0.5 * mean over real tokens of
    max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    old, ret = old_values.detach(), returns.detach()
    clipped = old + torch.clamp(values - old, -clip_value, clip_value)
    worst = torch.maximum((values - ret).square(), (clipped - ret).square())
    return 0.5 * masked_mean(worst, mask)
