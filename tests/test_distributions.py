"""The densities and divergences every bound is built from, against torch.distributions, scipy and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from hf_ddpm.distributions import (
    discretized_gaussian_log_likelihood,
    gaussian_log_density,
    kl_to_standard_normal,
    log_gaussian_mass,
    nats_to_bits_per_dim,
    normal_kl,
    sum_over_pixels,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # the 8-bit pixel values in [-1, 1]


def test_normal_kl_equals_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    m1, m2, l1, l2 = (torch.randn(200, generator=generator, dtype=torch.float64) * 3 for _ in range(4))
    p, q = torch.distributions.Normal(m1, (0.5 * l1).exp()), torch.distributions.Normal(m2, (0.5 * l2).exp())
    expected = torch.distributions.kl_divergence(p, q)
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), expected, rtol=1e-12, atol=1e-14)
    assert normal_kl(m1, l1, m1, l1).abs().max().item() < 1e-15


def test_kl_to_standard_normal_and_gaussian_log_density_equal_torch_distributions():
    generator = torch.Generator().manual_seed(1)
    mean, logvar, x = (torch.randn(4, 3, 5, generator=generator, dtype=torch.float64) for _ in range(3))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    standard = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected_kl = torch.distributions.kl_divergence(q, standard).reshape(4, -1).sum(dim=1)
    assert kl_to_standard_normal(mean, logvar).shape == (4,)
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), expected_kl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gaussian_log_density(x, mean, logvar), q.log_prob(x), rtol=1e-12, atol=1e-14)


def test_sum_over_pixels_and_bits_per_dim():
    values = torch.arange(24, dtype=torch.float64).reshape(2, 3, 2, 2)
    torch.testing.assert_close(
        sum_over_pixels(values), torch.tensor([66.0, 210.0], dtype=torch.float64), rtol=0, atol=0
    )
    assert nats_to_bits_per_dim(torch.tensor(12 * math.log(2.0)), 12).item() == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize(
    "lower, upper",
    [(-40.0, -38.0), (-1.0, 0.5), (38.0, 40.0), (5.0, 5.0 + 1e-9), (-math.inf, -30.0), (30.0, math.inf)],
)
def test_log_gaussian_mass_is_accurate_in_both_tails(lower, upper):
    """log(Phi(b) - Phi(a)) where Phi(b) - Phi(a) underflows or cancels in the naive difference."""
    got = log_gaussian_mass(
        torch.tensor([lower], dtype=torch.float64), torch.tensor([upper], dtype=torch.float64)
    ).item()
    # the reference from whichever tail the interval lies in, in log space
    if lower > 0:
        expected = norm.logsf(lower) + math.log(-math.expm1(norm.logsf(upper) - norm.logsf(lower)))
    else:
        expected = norm.logcdf(upper) + math.log(-math.expm1(norm.logcdf(lower) - norm.logcdf(upper)))
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "mean, log_scale, sum_tolerance, tail_rtol",
    [
        # sigma ~ 1e-6 on the edge between two bins: 1/2 each. A bin edge x_k + 1/255 and the next one's
        # x_{k+1} - 1/255 agree to ~1e-16, which a sigma of 1e-6 centred on that edge turns into ~1e-11 of probability
        (0.0, -14.0, 1e-10, 1e-9),
        (50 / 127.5 - 1, -14.0, 1e-12, 1e-9),  # sigma ~ 1e-6 on a pixel value: probability 1 there
        (0.0, -6.0, 1e-12, 1e-9),
        (0.3, -2.0, 1e-12, 1e-9),
        (-0.95, 0.0, 1e-12, 1e-9),
        (0.999, -9.0, 1e-12, 1e-9),
        (2.5, -1.0, 1e-12, 1e-9),  # outside [-1, 1]
        (-50.0, -5.0, 1e-12, 1e-9),  # far outside, narrow: all mass in the edge bin
        (-3.0, 3.0, 1e-12, 1e-9),  # sigma ~ 20
        # sigma ~ 2e4: nearly all mass in the two open edge bins; scipy's reference for the ~1e-7 interior bins is a
        # difference of two CDFs near 1/2, good to ~1e-16 / 1e-7 = 1e-9 relative, so it is compared above 1e-5 only
        (1e-3, 10.0, 1e-12, None),
    ],
)
def test_discretized_gaussian_is_a_distribution_over_the_256_bins_and_matches_scipy(
    mean, log_scale, sum_tolerance, tail_rtol
):
    means, log_scales = torch.full_like(GRID, mean), torch.full_like(GRID, log_scale)
    log_p = discretized_gaussian_log_likelihood(GRID, means, log_scales)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=sum_tolerance)
    # independently: differences of scipy's normal CDF, the edge bins open to -inf and +inf
    sigma, x = math.exp(log_scale), GRID.numpy()
    upper = np.append((x[:-1] + 1 / 255 - mean) / sigma, np.inf)
    lower = np.append(-np.inf, (x[1:] - 1 / 255 - mean) / sigma)
    # above the mean take the difference of survival functions, which does not cancel in the upper tail
    mass = np.where(lower > 0, norm.sf(lower) - norm.sf(upper), norm.cdf(upper) - norm.cdf(lower))
    assert mass.sum() == pytest.approx(1.0, abs=1e-10)
    kept = mass > 1e-5  # float64 CDF differences are good to ~1e-16 absolute: 1e-10 relative above 1e-6
    assert kept.any()
    np.testing.assert_allclose(log_p.exp().numpy()[kept], mass[kept], rtol=1e-10)
    if tail_rtol is not None:  # and every bin that float64 represents, deep into the tails
        big = mass > 1e-200
        np.testing.assert_allclose(log_p.exp().numpy()[big], mass[big], rtol=tail_rtol)


def test_discretized_gaussian_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"x and means must have the same shape, got \(256,\) and \(3,\)"):
        discretized_gaussian_log_likelihood(GRID, GRID[:3], GRID)
