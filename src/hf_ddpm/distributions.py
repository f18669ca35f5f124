"""Densities and divergences of diagonal Gaussians, the discretized Gaussian of 8-bit data, and units.

Every bound of hf_ddpm is built from these: the VAE's closed-form KL and Monte-Carlo reconstruction, and the
diffusion model's prior-matching, denoising-matching and reconstruction terms. This module imports nothing of
hf_ddpm. Elementwise functions return nats; :func:`sum_over_pixels` makes them per-image and
:func:`nats_to_bits_per_dim` converts.
"""

from __future__ import annotations

import math

import torch


def sum_over_pixels(values: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the batch: (B, ...) -> (B,)."""
    return values.reshape(values.shape[0], -1).sum(dim=1)


def nats_to_bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """bits/dim = nats / (D ln 2), with D = C * H * W the number of dimensions of one image."""
    return nats / (num_dims * math.log(2.0))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats:

    KL = 1/2 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2)).
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag e^logvar) || N(0, I)) per example, 1/2 sum_i (mean_i^2 + e^logvar_i - 1 - logvar_i):
    (N, ...) -> (N,) nats. The VAE's KL to its prior and the diffusion model's prior-matching term."""
    zeros = torch.zeros_like(mean)
    return sum_over_pixels(normal_kl(mean, logvar, zeros, zeros))


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, e^logvar) in nats: -1/2 (log 2 pi + logvar + (x - mean)^2 e^-logvar)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def log_gaussian_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for standardised bounds lower < upper, accurate in both tails.

    Intervals entirely above 0 are reflected (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)) so the subtraction always
    happens in the lower tail, where log_ndtr is exact:
    log(Phi(hi) - Phi(lo)) = log Phi(hi) + log(1 - e^(log Phi(lo) - log Phi(hi))).
    """
    reflect = lower > 0
    lo = torch.where(reflect, -upper, lower)
    hi = torch.where(reflect, -lower, upper)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data under a Gaussian discretized to its 256 bins.

    ``x`` holds pixel values k/127.5 - 1 (k = 0..255) in [-1, 1]; the bin of x is [x - 1/255, x + 1/255], with
    the edge bins extended to -inf (x = -1) and +inf (x = 1), so the 256 probabilities sum to 1:

        P(x) = Phi((x + 1/255 - mean) / sigma) - Phi((x - 1/255 - mean) / sigma),  sigma = e^log_scales.

    Computed with the exact normal CDF in log space (not the tanh approximation), so it stays accurate for
    small and large sigma alike. Use float64 inputs for likelihoods reported to 1e-4 relative.
    """
    if x.shape != means.shape:
        raise ValueError(f"x and means must have the same shape, got {tuple(x.shape)} and {tuple(means.shape)}.")
    inv_sigma = torch.exp(-log_scales)
    half_bin = 1.0 / 255.0
    upper = torch.where(x > 0.999, torch.full_like(x, math.inf), (x - means + half_bin) * inv_sigma)
    lower = torch.where(x < -0.999, torch.full_like(x, -math.inf), (x - means - half_bin) * inv_sigma)
    return log_gaussian_mass(lower, upper)
