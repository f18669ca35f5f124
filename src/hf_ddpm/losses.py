"""The ELBO of the variational diffusion model, term by term, and the training losses built from it.

    -log p(x_0) <= -ELBO = L_prior + sum_{t=2}^{T} L_{t-1} + L_0      (in nats per image), with

    L_prior = KL(q(x_T | x_0) || N(0, I))                                  prior-matching term   :func:`prior_term`
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))          denoising matching    :func:`denoising_matching_term`
    L_0     = -log p_theta(x_0 | x_1), discretized Gaussian decoder        reconstruction term   :func:`reconstruction_term`

Every term here is a per-image tensor of shape (B,) in nats (summed over pixels); :func:`nats_to_bits_per_dim`
converts. Terms are reported as their (non-negative) contribution to the negative ELBO, so
``bits_per_dim = prior_term + denoising_terms + reconstruction_term``.

Nothing here imports a model: the full bound takes a callable ``model_fn(x_t, timesteps) -> model_output``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .scheduling_vdm import VDMScheduler

LOSS_TYPES = ("simple", "vlb", "hybrid")
#: Weight of the variational term in the hybrid loss, L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal, 2021).
HYBRID_VLB_WEIGHT = 0.001

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- units
def sum_over_pixels(values: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the batch: (B, ...) -> (B,)."""
    return values.reshape(values.shape[0], -1).sum(dim=1)


def nats_to_bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """bits/dim = nats / (D ln 2), with D = C * H * W the number of dimensions of one image."""
    return nats / (num_dims * math.log(2.0))


# ---------------------------------------------------------------------------------------------- densities
def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats:

    KL = 1/2 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2)).
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, e^logvar) in nats: -1/2 (log 2 pi + logvar + (x - mean)^2 e^-logvar)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _log_gaussian_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for standardised bounds lower < upper, accurate in both tails.

    Intervals entirely above 0 are reflected (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)) so the subtraction always
    happens in the lower tail, where log_ndtr is exact: log(Phi(hi) - Phi(lo)) = log Phi(hi) + log(1 - e^(log Phi(lo) - log Phi(hi))).
    """
    reflect = lower > 0
    lo = torch.where(reflect, -upper, lower)
    hi = torch.where(reflect, -lower, upper)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
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
    return _log_gaussian_mass(lower, upper)


# ---------------------------------------------------------------------------------------------- ELBO terms
def prior_term(scheduler: VDMScheduler, x_start: torch.Tensor) -> torch.Tensor:
    """L_prior = KL(q(x_T | x_0) || N(0, I)) per image, nats; q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I).

    x_T is the top of the scheduler's current chain: timestep T-1 for the full chain, the largest kept timestep for
    a respaced one (whose top may be below T-1, e.g. with ``leading`` spacing). No parameter enters it: it measures
    how well the third restriction, q(x_T) ~= N(0, I), holds.
    """
    last = torch.full((x_start.shape[0],), int(scheduler.chain.timesteps[-1]), dtype=torch.long)
    mean, _, log_variance = scheduler.q_mean_variance(x_start, last)
    zeros = torch.zeros_like(mean)
    return sum_over_pixels(normal_kl(mean, log_variance, zeros, zeros))


def denoising_matching_term(
    posterior_mean: torch.Tensor, posterior_log_variance: torch.Tensor, model_mean: torch.Tensor, model_log_variance: torch.Tensor
) -> torch.Tensor:
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) per image, nats (both Gaussians diagonal)."""
    return sum_over_pixels(normal_kl(posterior_mean, posterior_log_variance, model_mean, model_log_variance))


def reconstruction_term(x_start: torch.Tensor, model_mean: torch.Tensor, model_log_variance: torch.Tensor) -> torch.Tensor:
    """L_0 = -log p_theta(x_0 | x_1) per image, nats, with p_theta(x_0 | x_1) the discretized Gaussian decoder
    of mean mu_theta(x_1, 1) and standard deviation e^(log_variance / 2)."""
    return -sum_over_pixels(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance))


def variational_terms(
    scheduler: VDMScheduler,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    detach_mean: bool = False,
) -> torch.Tensor:
    """The bound's term at each image's timestep, per image, nats: L_0 where the timestep is the chain's first
    (the decoder), else L_{t-1}. ``detach_mean`` stops the gradient through the model's mean (hybrid loss: the
    variational term then trains the variance only)."""
    prediction, variance_output = scheduler.split_model_output(model_output, x_t)
    if detach_mean:
        prediction = prediction.detach()
    frozen_output = prediction if variance_output is None else torch.cat([prediction, variance_output], dim=1)
    model_mean, model_log_variance, _ = scheduler.p_mean_variance(frozen_output, x_t, timesteps)
    posterior_mean, _, posterior_log_variance = scheduler.q_posterior_mean_variance(x_start, x_t, timesteps)
    kl = denoising_matching_term(posterior_mean, posterior_log_variance, model_mean, model_log_variance)
    nll = reconstruction_term(x_start, model_mean, model_log_variance)
    is_first = (scheduler.chain_position(timesteps) == 0).to(device=kl.device)
    return torch.where(is_first, nll, kl)


# ---------------------------------------------------------------------------------------------- training losses
def training_target(scheduler: VDMScheduler, x_start: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model's first C channels regress on: the noise (epsilon), x_0 (sample) or v (v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x_start
    return scheduler.get_velocity(x_start, noise, timesteps)


def min_snr_weight(scheduler: VDMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight of the squared error, (B,): min(SNR_t, gamma) / SNR_t for epsilon prediction,
    min(SNR_t, gamma) / (SNR_t + 1) for v prediction and min(SNR_t, gamma) for x_0 prediction,
    SNR_t = abar_t / (1 - abar_t); all three weight the x_0-space error by min(SNR_t, gamma)."""
    abar = torch.from_numpy(scheduler.alphas_cumprod64)[timesteps.detach().cpu().long()]
    snr = abar / (1.0 - abar)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    weight = clipped / snr if kind == "epsilon" else clipped / (snr + 1.0) if kind == "v_prediction" else clipped
    return weight.float().to(timesteps.device)


@dataclass
class TrainingLoss:
    """Per-image training loss and its parts, all of shape (B,).

    Attributes:
        loss: what to minimise (average it over the batch): ``timestep_weights * per_timestep_loss``.
        per_timestep_loss: the loss at each image's timestep before importance weighting (what a loss-aware
            timestep sampler tracks).
        mse: mean squared error of the prediction (the ``simple`` loss), or None when not computed.
        vlb_bits_per_dim: the estimate of the whole negative ELBO in bits/dim from this timestep, or None.
        vlb_term_bits_per_dim: the bound's term at this timestep alone, bits/dim (for per-t importance sampling).
    """

    loss: torch.Tensor
    per_timestep_loss: torch.Tensor
    mse: torch.Tensor | None
    vlb_bits_per_dim: torch.Tensor | None
    vlb_term_bits_per_dim: torch.Tensor | None


def training_loss(
    loss_type: str,
    scheduler: VDMScheduler,
    model_fn: ModelFn,
    x_start: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor | None = None,
    timestep_weights: torch.Tensor | None = None,
    snr_gamma: float | None = None,
) -> TrainingLoss:
    """The training loss of a batch of clean images ``x_start`` (B, C, H, W) at ``timesteps`` (B,).

    * ``simple``: || target - prediction ||^2 averaged over pixels (Ho et al.'s L_simple).
    * ``vlb``: an unbiased estimate of the whole negative ELBO in bits/dim, L_prior + T w_t L_t (the constant
      L_prior carries no gradient; it makes the value comparable to the bound).
    * ``hybrid``: L_simple + 0.001 * L_vlb with the model's mean detached in L_vlb, so the bound trains only the
      learned variance (Nichol & Dhariwal, 2021).

    ``timestep_weights`` (B,) are the importance weights w_t = 1 / (T p(t)) of timesteps drawn from p(t) (ones,
    the default, for uniform sampling); they multiply every per-image term, so each loss stays an unbiased
    estimate of its expectation under uniform t (as improved-diffusion weights its losses).

    ``snr_gamma`` applies Min-SNR-gamma weighting to the squared error (Hang et al., 2023; diffusers' flag of the same
    name): the x_0-space error is weighted by min(SNR_t, gamma), SNR_t = abar_t / (1 - abar_t), which is
    :func:`min_snr_weight` in the chosen parameterisation. It changes which timesteps the network spends its capacity
    on, not the bound: the vlb part is never reweighted.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}.")
    if noise is None:
        noise = torch.randn_like(x_start)
    x_t = scheduler.add_noise(x_start, noise, timesteps)
    model_output = model_fn(x_t, timesteps)
    num_dims = x_start[0].numel()
    mse = vlb = term_bpd = None
    if loss_type in ("simple", "hybrid"):
        prediction, _ = scheduler.split_model_output(model_output, x_t)
        target = training_target(scheduler, x_start, noise, timesteps)
        mse = ((prediction.float() - target.float()) ** 2).reshape(x_start.shape[0], -1).mean(dim=1)
        if snr_gamma is not None:
            mse = mse * min_snr_weight(scheduler, timesteps, snr_gamma).to(mse)
    T = scheduler.config.num_train_timesteps
    if loss_type in ("vlb", "hybrid"):
        terms = variational_terms(
            scheduler, model_output.float(), x_start.float(), x_t.float(), timesteps, detach_mean=loss_type == "hybrid"
        )
        term_bpd = nats_to_bits_per_dim(terms, num_dims)
        prior_bpd = nats_to_bits_per_dim(prior_term(scheduler, x_start.float()), num_dims)
    if loss_type == "simple":
        per_timestep = mse
    elif loss_type == "vlb":
        per_timestep = T * term_bpd
    else:
        per_timestep = mse + HYBRID_VLB_WEIGHT * T * term_bpd
    if timestep_weights is None:
        timestep_weights = torch.ones_like(per_timestep)
    weights = timestep_weights.to(per_timestep)
    if term_bpd is not None:
        vlb = prior_bpd + weights * T * term_bpd
    loss = weights * per_timestep
    return TrainingLoss(loss=loss, per_timestep_loss=per_timestep, mse=mse, vlb_bits_per_dim=vlb, vlb_term_bits_per_dim=term_bpd)


# ---------------------------------------------------------------------------------------------- the whole bound
@dataclass
class ELBOTerms:
    """The negative ELBO of each image, in bits/dim, and its breakdown; every field has shape (B,).

    ``bits_per_dim = prior_term + denoising_terms + reconstruction_term``; ``denoising_terms`` is the sum over t
    of the denoising-matching KLs. ``per_timestep`` (B, K), when kept, holds each term of the chain, ordered like
    the chain's increasing timesteps (column 0 is the reconstruction term).
    """

    bits_per_dim: torch.Tensor
    prior_term: torch.Tensor
    denoising_terms: torch.Tensor
    reconstruction_term: torch.Tensor
    per_timestep: torch.Tensor | None = None


@torch.no_grad()
def full_elbo(
    scheduler: VDMScheduler,
    model_fn: ModelFn,
    x_start: torch.Tensor,
    generator: torch.Generator | None = None,
    keep_per_timestep: bool = False,
    progress: Callable | None = None,
) -> ELBOTerms:
    """The negative ELBO of a batch, every term of the scheduler's current chain summed exactly (not sampled).

    For each timestep t of the chain one x_t ~ q(x_t | x_0) is drawn (the single-sample estimate of the
    expectation over q that every term carries) and the model is evaluated once: K network evaluations per image
    for a K-step chain (K = T for the full chain). The terms are computed in float64 from float64 schedule
    constants; ``model_fn`` receives float64 x_t and casts to its own dtype. ``progress`` wraps the iterable of timesteps (e.g. a tqdm bar).
    """
    x0 = x_start.to(torch.float64)
    num_dims = x0[0].numel()
    batch = x0.shape[0]
    chain_timesteps = scheduler.chain.timesteps
    terms = torch.zeros(batch, len(chain_timesteps), dtype=torch.float64, device=x0.device)
    iterator = range(len(chain_timesteps))
    for k in progress(iterator) if progress is not None else iterator:
        t = torch.full((batch,), int(chain_timesteps[k]), dtype=torch.long, device=x0.device)
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32).to(torch.float64)
        x_t = scheduler.add_noise(x0, noise, t)
        model_output = model_fn(x_t, t).to(torch.float64)
        terms[:, k] = variational_terms(scheduler, model_output, x0, x_t, t)
    prior = prior_term(scheduler, x0)
    to_bpd = lambda nats: nats_to_bits_per_dim(nats, num_dims)  # noqa: E731
    return ELBOTerms(
        bits_per_dim=to_bpd(prior + terms.sum(dim=1)),
        prior_term=to_bpd(prior),
        denoising_terms=to_bpd(terms[:, 1:].sum(dim=1)),
        reconstruction_term=to_bpd(terms[:, 0]),
        per_timestep=to_bpd(terms) if keep_per_timestep else None,
    )
