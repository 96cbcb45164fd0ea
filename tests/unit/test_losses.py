"""Preference losses against numbers computed by hand (ALGORITHMS.md section 1)."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.losses import (
    chosen_nll,
    dpo_loss,
    ipo_loss,
    mdpo_loss,
    pairwise_accuracy,
    preference_loss,
    slic_loss,
    two_rejected_loss,
)

# Shared pair batch, B = 2:
#   r_chosen   = policy_chosen - ref_chosen     = [-1 - -1.5, -3 - -2] = [0.5, -1.0]
#   r_rejected = policy_rejected - ref_rejected = [-2 - -1.5, -1 - -1] = [-0.5, 0.0]
#   delta      = r_chosen - r_rejected          = [1.0, -1.0]
PC = [-1.0, -3.0]
PR = [-2.0, -1.0]
RC = [-1.5, -2.0]
RR = [-1.5, -1.0]


def _inputs(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    pc = torch.tensor(PC, dtype=torch.float64, requires_grad=requires_grad)
    pr = torch.tensor(PR, dtype=torch.float64, requires_grad=requires_grad)
    return (
        pc,
        pr,
        torch.tensor(RC, dtype=torch.float64),
        torch.tensor(RR, dtype=torch.float64),
    )


def test_dpo_hand_numbers_on_cpu() -> None:
    pc, pr, rc, rr = _inputs(requires_grad=True)
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # beta * delta = [0.5, -0.5]; -log sigmoid(x) = log(1 + e^-x)
    #   log(1 + e^-0.5) = log(1.6065307) = 0.4740770
    #   log(1 + e^+0.5) = log(2.6487213) = 0.9740770
    assert out.losses.tolist() == pytest.approx([0.4740770, 0.9740770], abs=1e-6)
    # rewards = beta * r = 0.5 * [0.5, -1.0] and 0.5 * [-0.5, 0.0]
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.0])
    assert not out.chosen_rewards.requires_grad
    # d/d pc_b of mean_b(-logsig(beta*delta_b)) = -(beta / B) * sigmoid(-beta*delta_b)
    #   b=0: -(0.25) * sigmoid(-0.5) = -0.25 * 0.3775407 = -0.0943852
    #   b=1: -(0.25) * sigmoid(+0.5) = -0.25 * 0.6224593 = -0.1556148
    # and d/d pr = -d/d pc.
    out.losses.mean().backward()
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.tolist() == pytest.approx([-0.0943852, -0.1556148], abs=1e-6)
    assert pr.grad.tolist() == pytest.approx([0.0943852, 0.1556148], abs=1e-6)


def test_ipo_hand_numbers_on_cpu() -> None:
    pc, pr, rc, rr = _inputs(requires_grad=True)
    out = ipo_loss(pc, pr, rc, rr, beta=1.0)
    # 1/(2*beta) = 0.5; (delta - 0.5)^2 = (0.5)^2, (-1.5)^2 = [0.25, 2.25]
    assert out.losses.tolist() == pytest.approx([0.25, 2.25])
    # d/d pc of sum = 2 * (delta - 0.5) = [1.0, -3.0]
    out.losses.sum().backward()
    assert pc.grad is not None
    assert pc.grad.tolist() == pytest.approx([1.0, -3.0])


def test_slic_hand_numbers_and_hinge_on_cpu() -> None:
    pc, pr, rc, rr = _inputs(requires_grad=True)
    # beta = 2: 1 - 2 * delta = [-1, 3] -> hinge -> [0, 3]
    out = slic_loss(pc, pr, rc, rr, beta=2.0)
    assert out.losses.tolist() == pytest.approx([0.0, 3.0])
    # gradient only where the hinge is active: d/d pc = -beta = [0, -2]
    out.losses.sum().backward()
    assert pc.grad is not None
    assert pc.grad.tolist() == pytest.approx([0.0, -2.0])
    # beta = 0.5: 1 - 0.5 * delta = [0.5, 1.5], both active
    assert slic_loss(*_inputs(), beta=0.5).losses.tolist() == pytest.approx([0.5, 1.5])


def test_dispatcher_matches_and_rejects_on_cpu() -> None:
    args = _inputs()
    for name, fn in (("dpo", dpo_loss), ("ipo", ipo_loss), ("slic", slic_loss)):
        torch.testing.assert_close(
            preference_loss(name, *args, beta=0.3).losses, fn(*args, beta=0.3).losses
        )
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss("kto", *args, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        preference_loss("dpo", *args, beta=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=0.1)


def test_two_rejected_gamma_on_cpu() -> None:
    pc = torch.tensor([0.0], requires_grad=True)
    zero = torch.tensor([0.0])
    # pair a: r_c = 0, r_a = -1 - 0 = -1 -> delta_a = 1 -> log(1 + e^-1) = 0.3132617
    # pair b: r_c = 0, r_b = 0           -> delta_b = 0 -> log 2          = 0.6931472
    # gamma = 0.25: 0.25 * 0.3132617 + 0.75 * 0.6931472 = 0.0783154 + 0.5198604 = 0.5981758
    out = two_rejected_loss(
        "dpo", pc, torch.tensor([-1.0]), zero, zero, zero, zero, beta=1.0, gamma=0.25
    )
    assert out.losses.item() == pytest.approx(0.5981758, abs=1e-6)
    # rejected reward = 0.25 * (1 * -1) + 0.75 * 0 = -0.25
    assert out.rejected_rewards.item() == pytest.approx(-0.25)
    # d/d pc = -0.25 * sigmoid(-1) - 0.75 * sigmoid(0) = -0.25*0.2689414 - 0.375 = -0.4422354
    out.losses.sum().backward()
    assert pc.grad is not None
    assert pc.grad.item() == pytest.approx(-0.4422354, abs=1e-6)
    # default gamma 0.5 is the plain average
    half = two_rejected_loss("dpo", pc, torch.tensor([-1.0]), zero, zero, zero, zero, beta=1.0)
    assert half.losses.item() == pytest.approx(0.5 * (0.3132617 + 0.6931472), abs=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        two_rejected_loss("dpo", pc, zero, zero, zero, zero, zero, beta=1.0, gamma=1.5)


def test_mdpo_hand_numbers_with_penalty_on_cpu() -> None:
    # B = 1, K = 3, beta = 1. r = policy - ref = [-1 - -2, -2 - -2, -4 - -2] = [1, 0, -2]
    policy = torch.tensor([[-1.0, -2.0, -4.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0, -2.0]], dtype=torch.float64)
    out = mdpo_loss(policy, ref, beta=1.0)
    # pairs (i, j), l_ij = log(1 + e^-(r_i - r_j)), plus -r_0 = -1 when i = 0:
    #   (0,1): log(1 + e^-1) = 0.3132617 - 1 = -0.6867383
    #   (0,2): log(1 + e^-3) = 0.0485874 - 1 = -0.9514126
    #   (1,2): log(1 + e^-2) = 0.1269280
    #   mean over P = 3 pairs: (-0.6867383 - 0.9514126 + 0.1269280) / 3 = -0.5037410
    assert out.losses.tolist() == pytest.approx([-0.5037410], abs=1e-6)
    assert out.rewards[0].tolist() == pytest.approx([1.0, 0.0, -2.0])
    # gradient wrt policy_0: each pair (0,j) gives -sigmoid(-(r_0 - r_j)) - 1 (penalty):
    #   (0,1): -0.2689414 - 1;  (0,2): -0.0474259 - 1;  sum / 3 = -2.3163673 / 3 = -0.7721224
    # wrt policy_2: pairs (0,2), (1,2) give +sigmoid(-3) + sigmoid(-2) = 0.0474259 + 0.1192029
    #   / 3 = 0.0555429
    out.losses.sum().backward()
    assert policy.grad is not None
    assert policy.grad[0, 0].item() == pytest.approx(-0.7721224, abs=1e-6)
    assert policy.grad[0, 2].item() == pytest.approx(0.0555429, abs=1e-6)


def test_mdpo_k2_is_dpo_plus_penalty_and_beta_on_cpu() -> None:
    # K = 2: one pair containing y_0, so loss = DPO + (-r_0) exactly; the penalty is not
    # multiplied by beta (beta = 0.1 here would shrink it to -0.05 if it were).
    pc, pr, rc, rr = _inputs()
    out = mdpo_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta=0.1)
    dpo = dpo_loss(pc, pr, rc, rr, beta=0.1)
    r0 = pc - rc  # [0.5, -1.0]
    torch.testing.assert_close(out.losses, dpo.losses - r0)
    with pytest.raises(ValueError, match="K >= 2"):
        mdpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), beta=0.1)


def test_mdpo_batch_mean_equals_global_pair_mean_on_cpu() -> None:
    # AMP's code concatenates all B*P pair losses and takes one mean; with fixed K that is
    # the mean of our per-example losses.
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    r = pol - ref
    terms = []
    for i in range(4):
        for j in range(i + 1, 4):
            t = -torch.nn.functional.logsigmoid(0.2 * (r[:, i] - r[:, j]))
            terms.append(t - r[:, 0] if i == 0 else t)
    expected = torch.cat(terms).mean()
    torch.testing.assert_close(mdpo_loss(pol, ref, beta=0.2).losses.mean(), expected)


def test_pairwise_accuracy_on_cpu() -> None:
    # row 0 perfectly ordered -> 1; row 1: pairs (0,1) 1>3 no, (0,2) 1>2 no, (1,2) 3>2 yes -> 1/3
    acc = pairwise_accuracy(torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]]))
    assert acc.tolist() == pytest.approx([1.0, 1.0 / 3.0])
    assert math.isclose(pairwise_accuracy(torch.tensor([[0.2, 0.1]])).item(), 1.0)


def test_chosen_nll_is_per_token_on_cpu() -> None:
    logps = torch.tensor([-6.0, -1.5], dtype=torch.float64)
    tokens = torch.tensor([3, 1])
    assert chosen_nll(logps, tokens).tolist() == [2.0, 1.5]  # 6 / 3, 1.5 / 1
    assert chosen_nll(logps[:1], torch.tensor([0])).tolist() == [6.0]  # no division by 0
