"""mmalign.rl against numbers computed by hand (the derivations are in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign import rl

D = torch.float64


def t(*rows: object) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def test_leave_one_out_baseline() -> None:
    # rewards 1, 2, 3, 6 (sum 12): A_i = r_i - (12 - r_i) / 3
    adv = rl.leave_one_out_advantages(t([1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]))
    assert torch.allclose(adv[0], t(-8 / 3, -4 / 3, 0.0, 4.0))
    assert torch.equal(adv[1], torch.zeros(4, dtype=D))  # equal rewards: no signal
    assert torch.allclose(adv.sum(-1), torch.zeros(2, dtype=D))
    with pytest.raises(ValueError, match="k = 1"):
        rl.leave_one_out_advantages(t([1.0]))


def test_rloo_loss_is_reinforce_with_a_constant_advantage() -> None:
    logps = t([-1.0, -2.0]).requires_grad_()
    adv = t([0.5, -1.5]).requires_grad_()
    loss = rl.rloo_loss(logps, adv)
    assert torch.allclose(loss, t(0.5, -3.0))  # -A * logp
    loss.sum().backward()
    assert torch.allclose(logps.grad, t(-0.5, 1.5)) and adv.grad is None


def test_reward_statistics_are_fixed_once() -> None:
    mean, std = rl.reward_stats(t(1.0, 2.0, 3.0, 4.0))
    assert mean == 2.5 and math.isclose(std, math.sqrt(5 / 3))  # unbiased: 5 / 3
    assert torch.allclose(rl.normalize_rewards(t(2.5, 4.0), mean, std), t(0.0, 1.5 / std))
    with pytest.raises(ValueError):
        rl.reward_stats(t(1.0))


def test_kl_estimators_by_hand_and_unbiased_on_samples() -> None:
    logp, ref = t(0.0, -1.0), t(-0.5, -0.5)  # log r = 0.5, -0.5
    assert torch.allclose(rl.kl_estimate(logp, ref, "k1"), t(0.5, -0.5))
    assert torch.allclose(rl.kl_estimate(logp, ref, "k2"), t(0.125, 0.125))
    k3 = t(math.exp(-0.5) - 1 + 0.5, math.exp(0.5) - 1 - 0.5)
    assert torch.allclose(rl.kl_estimate(logp, ref, "k3"), k3)
    assert bool((rl.kl_estimate(t(-3.0, 2.0, 0.0), t(1.0, -1.0, 0.0), "k3") >= 0).all())
    # samples of p: the means of k1 and k3 approach the exact KL(p || q)
    p, q = t(0.7, 0.2, 0.1), t(0.3, 0.3, 0.4)
    exact = float((p * (p / q).log()).sum())
    draws = torch.multinomial(
        p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    for kind in ("k1", "k3"):
        est = float(rl.kl_estimate(p.log()[draws], q.log()[draws], kind).mean())  # type: ignore[arg-type]
        assert abs(est - exact) < 0.01, (kind, est, exact)
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        rl.kl_estimate(logp, ref, "k4")  # type: ignore[arg-type]


def test_kl_penalty_on_sequences_and_tokens() -> None:
    kl, mask = t([0.1, 0.2, 0.3]), t([1.0, 1.0, 0.0])
    assert torch.allclose(rl.kl_penalized(t(1.0), kl, mask, 0.5), t(1.0 - 0.5 * 0.3))
    # -0.5 * KL_t on real tokens, the score added on the last real one (index 1)
    assert torch.allclose(rl.token_rewards(t(1.0), kl, mask, 0.5), t([-0.05, 0.9, 0.0]))
    with pytest.raises(ValueError, match="at least one response token"):
        rl.token_rewards(t(1.0), kl, t([0.0, 0.0, 0.0]), 0.5)


def test_gae_by_hand_with_padding() -> None:
    rewards = t([0.0, 0.0, 1.0], [0.0, 2.0, 0.0])
    values = t([0.5, 0.6, 0.7], [1.0, 1.0, 9.0])
    mask = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: d2 = 1 - .7 = .3; d1 = .7 - .6 = .1, A1 = .1 + .5 * .3 = .25;
    #        d0 = .6 - .5 = .1, A0 = .1 + .5 * .25 = .225
    # row 1 (last token padding, its value 9 ignored): d1 = 2 - 1 = 1, A1 = 1;
    #        d0 = 0 + 1 - 1 = 0, A0 = .5 * 1 = .5
    assert torch.allclose(adv, t([0.225, 0.25, 0.3], [0.5, 1.0, 0.0]))
    assert torch.allclose(ret, t([0.725, 0.85, 1.0], [1.5, 2.0, 0.0]))
    # gamma = lam = 1: A_t = sum of future rewards - V_t
    adv, _ = rl.gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t([0.5, 0.4, 0.3]))


def test_ppo_clipped_surrogate_by_hand() -> None:
    logps = t(math.log(1.5), math.log(0.5), 0.0).requires_grad_()
    old, adv, mask = t(0.0, 0.0, 0.0), t(1.0, 1.0, -2.0), t(1.0, 1.0, 1.0)
    out = rl.ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    # ratio 1.5, A 1: max(-1.5, -1.2) = -1.2 (clipped); ratio .5, A 1: max(-.5, -.8) = -.5;
    # ratio 1, A -2: 2 -> mean (-1.2 - .5 + 2) / 3 = .1
    assert math.isclose(float(out.loss.detach()), 0.1, abs_tol=1e-12)
    assert math.isclose(float(out.clip_fraction), 1 / 3) and math.isclose(
        float(out.ratio_mean), 1.0
    )
    out.loss.backward()
    # clipped token: no gradient; others d(-A r)/dlogp = -A r, over 3 tokens
    assert torch.allclose(logps.grad, t(0.0, -0.5 / 3, 2.0 / 3))


def test_ppo_value_loss_and_whitening() -> None:
    values, old, ret = t(1.0, 2.0), t(1.0, 1.0), t(0.0, 3.0)
    # (1 - 0)^2 = 1 both ways; (2 - 3)^2 = 1 vs clipped (1.2 - 3)^2 = 3.24 -> .5 * 4.24 / 2
    loss = rl.ppo_value_loss(values, old, ret, t(1.0, 1.0), clip_value=0.2)
    assert math.isclose(float(loss), 1.06)
    w = rl.whiten(t(1.0, 3.0, 100.0), t(1.0, 1.0, 0.0))
    assert torch.allclose(w, t(-1.0, 1.0, 0.0), atol=1e-6)  # padding left out and zeroed
