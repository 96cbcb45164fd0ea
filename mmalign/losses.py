"""Preference losses (ALGORITHMS.md section 1) as pure tensor functions.

Every function takes summed response log-probs (see `mmalign.logprobs`) of the policy and of
the frozen reference and returns *per-example* losses; the caller takes the batch mean. This
keeps the losses testable against hand-computed numbers and lets the learner weight or mask
examples (e.g. Mixed-DPO) without touching the algorithms.

Notation (ALGORITHMS.md): r(y) = logp_pi(y|x) - logp_ref(y|x), delta = r(y+) - r(y-).
The implicit reward reported for logging is beta * r(y), detached (it is a metric, not a
training signal; the losses themselves carry the gradient).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

LossName = Literal["dpo", "ipo", "slic"]
LOSS_NAMES: tuple[str, ...] = ("dpo", "ipo", "slic")


class PairLossOutput(NamedTuple):
    """Per-example losses and implicit rewards, all shape [B].

    losses: differentiable per-example loss (take `.mean()` for the batch loss).
    chosen_rewards / rejected_rewards: beta * r(y), detached, in nats scaled by beta.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class RankedLossOutput(NamedTuple):
    """MDPO output. losses: [B] differentiable; rewards: [B, K] = beta * r(y_k), detached."""

    losses: torch.Tensor
    rewards: torch.Tensor


def _delta(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (r_chosen, r_rejected, delta), each [B]; checks that all inputs share a shape."""
    shape = policy_chosen_logps.shape
    for t in (policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        if t.shape != shape:
            raise ValueError(f"log-prob shapes differ: {tuple(shape)} vs {tuple(t.shape)}")
    r_chosen = policy_chosen_logps - ref_chosen_logps
    r_rejected = policy_rejected_logps - ref_rejected_logps
    return r_chosen, r_rejected, r_chosen - r_rejected


def _output(r_chosen: torch.Tensor, r_rejected: torch.Tensor, losses: torch.Tensor, beta: float):
    return PairLossOutput(
        losses=losses,
        chosen_rewards=(beta * r_chosen).detach(),
        rejected_rewards=(beta * r_rejected).detach(),
    )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> PairLossOutput:
    """DPO: -log sigmoid(beta * delta). All inputs [B] (summed response log-probs)."""
    r_c, r_r, delta = _delta(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    # logsigmoid is the numerically stable form of log(sigmoid(x)) for large |x|.
    return _output(r_c, r_r, -F.logsigmoid(beta * delta), beta)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> PairLossOutput:
    """IPO: (delta - 1/(2*beta))^2. All inputs [B].

    As in the spec, delta uses *summed* log-probs (trl's IPO averages per token instead).
    """
    r_c, r_r, delta = _delta(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return _output(r_c, r_r, (delta - 1.0 / (2.0 * beta)) ** 2, beta)


def slic_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> PairLossOutput:
    """SLiC (hinge): max(0, 1 - beta * delta). All inputs [B]."""
    r_c, r_r, delta = _delta(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return _output(r_c, r_r, torch.relu(1.0 - beta * delta), beta)


_PAIR_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "slic": slic_loss}


def preference_loss(
    name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> PairLossOutput:
    """Dispatch to `dpo_loss` / `ipo_loss` / `slic_loss` by name. All inputs [B]."""
    try:
        fn = _PAIR_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown preference loss {name!r}; expected one of {LOSS_NAMES}"
        ) from None
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return fn(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
    )


def two_rejected_loss(
    name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_a_logps: torch.Tensor,
    policy_rejected_b_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_a_logps: torch.Tensor,
    ref_rejected_b_logps: torch.Tensor,
    beta: float,
    gamma: float = 0.5,
) -> PairLossOutput:
    """gamma * L(y+, y-_a) + (1 - gamma) * L(y+, y-_b)  ([ALIGN] Eq. 5, POVID code). Inputs [B].

    Used for POVID (dataset y- and noisy-image y-) and online BDHS (existing y- and fresh
    BDHS y-). rejected_rewards in the output is the same gamma-weighted mean of the two
    rejected rewards, so "margin" and "accuracy" computed from the output refer to that mix.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    a = preference_loss(
        name,
        policy_chosen_logps,
        policy_rejected_a_logps,
        ref_chosen_logps,
        ref_rejected_a_logps,
        beta,
    )
    b = preference_loss(
        name,
        policy_chosen_logps,
        policy_rejected_b_logps,
        ref_chosen_logps,
        ref_rejected_b_logps,
        beta,
    )
    return PairLossOutput(
        losses=gamma * a.losses + (1.0 - gamma) * b.losses,
        chosen_rewards=a.chosen_rewards,
        rejected_rewards=gamma * a.rejected_rewards + (1.0 - gamma) * b.rejected_rewards,
    )


def mdpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> RankedLossOutput:
    """MDPO ([AMP]) over K ranked responses per example.

    Args:
        policy_logps, ref_logps: [B, K] summed response log-probs, column 0 = best response,
            column K-1 = worst (y_0 > y_1 > ... > y_{K-1}). K >= 2.
        beta: DPO temperature.

    Returns:
        losses [B]: for each example, the mean over the P = K(K-1)/2 pairs i < j of
            l_ij = -log sigmoid(beta * (r(y_i) - r(y_j))) + [i == 0] * (-r(y_0)).
        rewards [B, K]: beta * r(y_k), detached.

    Reading (matches AMP's public trainer, which concatenates all pair losses and takes one
    mean): the penalty -r(y_0) is added once to *each* of the K-1 pairs that contain y_0, with
    weight 1 and not scaled by beta, and is then averaged with the pairs like the rest. So per
    example the penalty's net weight is (K-1)/P = 2/K; e.g. K = 4 -> 0.5 * (-r(y_0)). It keeps
    the best response's likelihood from falling while the margins grow. Since every example has
    the same K, the mean over pairs-then-batch equals the global mean over all pairs.
    """
    if policy_logps.shape != ref_logps.shape or policy_logps.dim() != 2:
        raise ValueError(
            f"expected policy/ref logps of equal shape [B, K], got "
            f"{tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}"
        )
    k = policy_logps.shape[1]
    if k < 2:
        raise ValueError(f"MDPO needs K >= 2 ranked responses, got K = {k}")
    r = policy_logps - ref_logps  # [B, K]
    i_idx, j_idx = torch.triu_indices(k, k, offset=1, device=r.device)  # each [P], i < j
    pair_losses = -F.logsigmoid(beta * (r[:, i_idx] - r[:, j_idx]))  # [B, P]
    is_best = (i_idx == 0).to(r.dtype)  # [P]; 1 on the K-1 pairs that contain y_0
    pair_losses = pair_losses + is_best * (-r[:, :1])  # penalty broadcast [B, 1] * [P]
    return RankedLossOutput(losses=pair_losses.mean(dim=1), rewards=(beta * r).detach())


def pairwise_accuracy(rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of ranked pairs i < j with reward_i > reward_j, per example.

    rewards: [B, K] (best first). Returns [B] in [0, 1]; with K = 2 it is the usual DPO
    reward accuracy (1 if chosen reward > rejected reward).
    """
    k = rewards.shape[1]
    i_idx, j_idx = torch.triu_indices(k, k, offset=1, device=rewards.device)
    return (rewards[:, i_idx] > rewards[:, j_idx]).to(rewards.dtype).mean(dim=1)


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen answer (RPO's anchor, TRL's
    `rpo_alpha` term): -logp(y+|x) / |y+|.

    chosen_logps: [B] summed log-probs; chosen_tokens: [B] response token counts (> 0).
    Returns [B]; added as `alpha * chosen_nll` it keeps the preference loss from lowering
    the chosen answer's likelihood together with the rejected one's.
    """
    return -chosen_logps / chosen_tokens.clamp(min=1).to(chosen_logps.dtype)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-example reward-model loss -log sigmoid(s(y+) - s(y-)) (Bradley-Terry: the
    probability that y+ is preferred is sigmoid of the score difference)."""
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(
            f"score shapes differ: {tuple(chosen_scores.shape)} vs {tuple(rejected_scores.shape)}"
        )
    return -F.logsigmoid(chosen_scores - rejected_scores)
