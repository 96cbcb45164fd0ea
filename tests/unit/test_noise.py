"""POVID noise schedule against numbers computed by hand (ALGORITHMS.md section 3)."""

import math

import pytest
import torch

from mmalign.noise import alpha_bar, beta_schedule, noisy_image


def _beta(k: int) -> float:
    return 1.0 / (1.0 + math.exp(6.0 - 12.0 * k / 1000)) * (5e-3 - 1e-5) + 1e-5


def test_beta_schedule_endpoints_on_cpu() -> None:
    betas = beta_schedule()
    assert betas.shape == (1000,)
    # sigmoid(-6) = 1 / (1 + e^6) = 0.00247262; * 0.00499 + 1e-5 = 2.23384e-5
    assert betas[0].item() == pytest.approx(2.23384e-5, rel=1e-5)
    # sigmoid(0) = 0.5 -> 0.5 * 0.00499 + 1e-5 = 0.002505 exactly
    assert betas[500].item() == pytest.approx(0.002505, rel=1e-12)
    assert betas[999].item() == pytest.approx(_beta(999), rel=1e-12)
    assert bool((betas[1:] > betas[:-1]).all())


def test_alpha_bar_indexing_on_cpu() -> None:
    assert alpha_bar(0) == 1.0  # 0 disables noise
    # step 1 multiplies the factors k = 0 and k = 1 (POVID indexes the cumprod)
    assert alpha_bar(1) == pytest.approx((1 - _beta(0)) * (1 - _beta(1)), rel=1e-12)
    assert math.sqrt(alpha_bar(500)) == pytest.approx(0.863, abs=5e-4)
    with pytest.raises(ValueError):
        alpha_bar(1000)


def test_noisy_image_formula_on_cpu() -> None:
    x = torch.full((3, 8, 8), 0.25, dtype=torch.float64)
    out = noisy_image(x, 500, torch.Generator().manual_seed(7), clamp=False)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ab = alpha_bar(500)
    torch.testing.assert_close(out, math.sqrt(ab) * 0.25 + math.sqrt(1 - ab) * eps)


def test_noisy_image_statistics_and_clamp_on_cpu() -> None:
    x = torch.full((3, 256, 256), 0.5)
    raw = noisy_image(x, 500, torch.Generator().manual_seed(0), clamp=False)
    # mean 0.5 * 0.8634 = 0.4317, std sqrt(1 - 0.7455) = 0.5045
    assert raw.mean().item() == pytest.approx(0.4317, abs=5e-3)
    assert raw.std().item() == pytest.approx(0.5045, abs=5e-3)
    assert raw.min().item() < 0.0 < 1.0 < raw.max().item()
    clamped = noisy_image(x, 500, torch.Generator().manual_seed(0))
    assert clamped.min().item() >= 0.0 and clamped.max().item() <= 1.0
    torch.testing.assert_close(clamped, raw.clamp(0, 1))
    torch.testing.assert_close(noisy_image(x, 0), x)
