"""The ELBO of the variational diffusion model, term by term, its estimates, and the training losses built from it.

    -log p(x_0) <= -ELBO = L_prior + sum_{t=2}^{T} L_{t-1} + L_0      (in nats per image), with

    L_prior = KL(q(x_T | x_0) || N(0, I))                          prior matching   :func:`prior_term`
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))  denoising match  :func:`denoising_matching_term`
    L_0     = -log p_theta(x_0 | x_1), discretized Gaussian        reconstruction   :func:`reconstruction_term`

Every term here is a per-image tensor of shape (B,) in nats (summed over pixels);
:func:`hf_ddpm.distributions.nats_to_bits_per_dim` converts. Terms are reported as their (non-negative)
contribution to the negative ELBO, so ``bits_per_dim = prior_term + denoising_terms + reconstruction_term``.

Nothing here imports a model or a scheduler: every function takes the frozen constants of the chain
(:class:`hf_ddpm.ddpm.chain.DiffusionChain`) and a callable ``model_fn(x_t, timesteps) -> model_output``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..distributions import (
    discretized_gaussian_log_likelihood,
    kl_to_standard_normal,
    nats_to_bits_per_dim,
    normal_kl,
    sum_over_pixels,
)
from .chain import DiffusionChain, check_choice

LOSS_TYPES = ("simple", "vlb", "hybrid", "hybrid_decoder")
#: Weight of the variational term in the hybrid loss, L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal, 2021).
HYBRID_VLB_WEIGHT = 0.001

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[Iterable], Iterable]


# ---------------------------------------------------------------------------------------------- ELBO terms
def prior_term(chain: DiffusionChain, x_start: torch.Tensor) -> torch.Tensor:
    """L_prior = KL(q(x_T | x_0) || N(0, I)) per image, nats; q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I).

    x_T is the top of ``chain``: timestep T-1 for the full chain, the largest kept timestep for a respaced one
    (whose top may be below T-1, e.g. with ``leading`` spacing). No parameter enters it: it measures how well the
    third restriction, q(x_T) ~= N(0, I), holds.
    """
    last = torch.full((x_start.shape[0],), int(chain.timesteps[-1]), dtype=torch.long, device=x_start.device)
    mean, _, log_variance = chain.q_mean_variance(x_start, last)
    return kl_to_standard_normal(mean, log_variance)


def denoising_matching_term(
    posterior_mean: torch.Tensor,
    posterior_log_variance: torch.Tensor,
    model_mean: torch.Tensor,
    model_log_variance: torch.Tensor,
) -> torch.Tensor:
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) per image, nats (both Gaussians diagonal)."""
    return sum_over_pixels(normal_kl(posterior_mean, posterior_log_variance, model_mean, model_log_variance))


def reconstruction_term(
    x_start: torch.Tensor, model_mean: torch.Tensor, model_log_variance: torch.Tensor
) -> torch.Tensor:
    """L_0 = -log p_theta(x_0 | x_1) per image, nats, with p_theta(x_0 | x_1) the discretized Gaussian decoder
    of mean mu_theta(x_1, 1) and standard deviation e^(log_variance / 2)."""
    return -sum_over_pixels(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance))


def variational_terms(
    chain: DiffusionChain,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    detach_mean: bool = False,
    clip_denoised: bool = False,
    decoder_mean_trained: bool = False,
) -> torch.Tensor:
    """The bound's term at each image's timestep, per image, nats: L_0 where the timestep is the chain's first
    (the decoder), else L_{t-1}. ``detach_mean`` stops the gradient through the model's mean (hybrid loss: the
    variational term then trains the variance only); with ``decoder_mean_trained`` too, everywhere but in L_0.

    ``clip_denoised``: in the denoising-matching terms, the model's x_0 estimate is clipped to the data's range
    [-1, 1] before it enters the posterior mean mu~_t(x_t, x0_hat) = c1_t x0_hat + c2_t x_t, as the sampler with
    ``clip_sample`` does. It is the bound of that model, and never larger term by term: for x_0 in [-1, 1],
    |clip(x0_hat) - x_0| <= |x0_hat - x_0| in every pixel, and the KL's mean part is c1_t^2 ||x0_hat - x_0||^2 /
    (2 sigma_t^2) at the same variance. L_0 keeps the unclipped mean (its edge bins reach to +-infinity, so
    clipping the decoder's mean to [-1, 1] could lower their probability).
    """
    model_mean, model_log_variance, x0_hat = chain.p_mean_variance(model_output, x_t, timesteps)
    decoder_mean = model_mean.detach() if detach_mean and not decoder_mean_trained else model_mean
    if detach_mean:  # the mean and x0_hat depend on the prediction only, the log variance on the variance output
        model_mean, x0_hat = model_mean.detach(), x0_hat.detach()
    posterior_mean, _, posterior_log_variance = chain.q_posterior_mean_variance(x_start, x_t, timesteps)
    matching_mean = model_mean
    if clip_denoised:  # the mean p_mean_variance(clip_denoised=True) gives, from the one x0_hat computed above
        matching_mean, _, _ = chain.q_posterior_mean_variance(x0_hat.clamp(-1.0, 1.0), x_t, timesteps)
    kl = denoising_matching_term(posterior_mean, posterior_log_variance, matching_mean, model_log_variance)
    nll = reconstruction_term(x_start, decoder_mean, model_log_variance)
    is_first = (chain.chain_position(timesteps) == 0).to(device=kl.device)
    return torch.where(is_first, nll, kl)


# ---------------------------------------------------------------------------------------------- training losses
def training_target(
    chain: DiffusionChain, x_start: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model's first C channels regress on: the noise (epsilon), x_0 (sample) or v (v_prediction)."""
    if chain.prediction_type == "epsilon":
        return noise
    if chain.prediction_type == "sample":
        return x_start
    return chain.get_velocity(x_start, noise, timesteps)


def min_snr_weight(chain: DiffusionChain, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight of the squared error, (B,): min(SNR_t, gamma) / SNR_t for epsilon prediction,
    min(SNR_t, gamma) / (SNR_t + 1) for v prediction and min(SNR_t, gamma) for x_0 prediction,
    SNR_t = abar_t / (1 - abar_t); all three weight the x_0-space error by min(SNR_t, gamma)."""
    abar = torch.from_numpy(chain.train_alphas_cumprod)[timesteps.detach().cpu().long()]
    snr = abar / (1.0 - abar)
    clipped = snr.clamp(max=gamma)
    kind = chain.prediction_type
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
    chain: DiffusionChain,
    model_fn: ModelFn,
    x_start: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor | None = None,
    timestep_weights: torch.Tensor | None = None,
    snr_gamma: float | None = None,
) -> TrainingLoss:
    """The training loss of a batch of clean images ``x_start`` (B, C, H, W) at ``timesteps`` (B,) of the full
    training ``chain``.

    * ``simple``: || target - prediction ||^2 averaged over pixels (Ho et al.'s L_simple).
    * ``vlb``: an unbiased estimate of the whole negative ELBO in bits/dim, L_prior + T w_t L_t (the constant
      L_prior carries no gradient; it makes the value comparable to the bound).
    * ``hybrid``: L_simple + 0.001 * L_vlb with the model's mean detached in L_vlb, so the bound trains only the
      learned variance (Nichol & Dhariwal, 2021).
    * ``hybrid_decoder``: ``hybrid`` with the mean detached in every term but the decoder's, L_0 = -log
      p_theta(x_0 | x_1): the reconstruction term trains the mean at timestep 0 as the bound does. Its discretized
      Gaussian is nearly as wide as a bin there, so a mean the squared error puts exactly on a saturated pixel
      (-1 or 1, most of a digit) leaves much of the bin's probability outside it; the bound moves it beyond.

    ``timestep_weights`` (B,) are the importance weights w_t = 1 / (T p(t)) of timesteps drawn from p(t) (ones,
    the default, for uniform sampling); they multiply every per-image term, so each loss stays an unbiased
    estimate of its expectation under uniform t (as improved-diffusion weights its losses).

    ``snr_gamma`` applies Min-SNR-gamma weighting to the squared error (Hang et al., 2023; diffusers' flag of the same
    name): the x_0-space error is weighted by min(SNR_t, gamma), SNR_t = abar_t / (1 - abar_t), which is
    :func:`min_snr_weight` in the chosen parameterisation. It changes which timesteps the network spends its capacity
    on, not the bound: the vlb part is never reweighted.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if noise is None:
        noise = torch.randn_like(x_start)
    x_t = chain.add_noise(x_start, noise, timesteps)
    model_output = model_fn(x_t, timesteps)
    num_dims = x_start[0].numel()
    mse = vlb = term_bpd = None
    if loss_type in ("simple", "hybrid", "hybrid_decoder"):
        prediction, _ = chain.split_model_output(model_output, x_t)
        target = training_target(chain, x_start, noise, timesteps)
        mse = ((prediction.float() - target.float()) ** 2).reshape(x_start.shape[0], -1).mean(dim=1)
        if snr_gamma is not None:
            mse = mse * min_snr_weight(chain, timesteps, snr_gamma).to(mse)
    T = chain.num_train_timesteps
    if loss_type in ("vlb", "hybrid", "hybrid_decoder"):
        terms = variational_terms(
            chain,
            model_output.float(),
            x_start.float(),
            x_t.float(),
            timesteps,
            detach_mean=loss_type != "vlb",
            decoder_mean_trained=loss_type == "hybrid_decoder",
        )
        term_bpd = nats_to_bits_per_dim(terms, num_dims)
        prior_bpd = nats_to_bits_per_dim(prior_term(chain, x_start.float()), num_dims)
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
    return TrainingLoss(
        loss=loss, per_timestep_loss=per_timestep, mse=mse, vlb_bits_per_dim=vlb, vlb_term_bits_per_dim=term_bpd
    )


# ---------------------------------------------------------------------------------------------- the whole bound
@dataclass
class ELBOOutput(BaseOutput):
    """The negative ELBO of each image in bits/dim, with its parts; each a float64 tensor of shape (N,).

    ``bits_per_dim = prior_term + denoising_terms + reconstruction_term``.

    Args:
        bits_per_dim: the whole negative ELBO, an upper bound on -log2 p(x) / D.
        prior_term: KL(q(x_T | x_0) || N(0, I)).
        denoising_terms: the sum over t of KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) (exact, or its
            unbiased stratified estimate).
        reconstruction_term: -log p_theta(x_0 | x_1) (discretized Gaussian decoder).
        per_timestep: (N, K), when kept: each term of the chain, ordered like the chain's increasing timesteps
            (column 0 is the reconstruction term).
    """

    bits_per_dim: torch.Tensor
    prior_term: torch.Tensor | None = None
    denoising_terms: torch.Tensor | None = None
    reconstruction_term: torch.Tensor | None = None
    per_timestep: torch.Tensor | None = None

    @classmethod
    def from_nats(
        cls,
        prior: torch.Tensor,
        denoising: torch.Tensor,
        reconstruction: torch.Tensor,
        num_dims: int,
        per_timestep: torch.Tensor | None = None,
    ) -> ELBOOutput:
        """The output of per-image terms in nats, converted to bits/dim for images of ``num_dims`` dimensions."""
        return cls(
            bits_per_dim=nats_to_bits_per_dim(prior + denoising + reconstruction, num_dims),
            prior_term=nats_to_bits_per_dim(prior, num_dims),
            denoising_terms=nats_to_bits_per_dim(denoising, num_dims),
            reconstruction_term=nats_to_bits_per_dim(reconstruction, num_dims),
            per_timestep=None if per_timestep is None else nats_to_bits_per_dim(per_timestep, num_dims),
        )


def term_at(
    chain: DiffusionChain,
    model_fn: ModelFn,
    x_start: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-sample value of the bound's term at each image's timestep, nats (B,): draw x_t ~ q(x_t | x_0) (noise
    drawn in float32 as diffusers draws it, or the ``noise`` given), evaluate the model once, and take
    :func:`variational_terms` (with ``clip_denoised``) in the dtype of ``x_start``."""
    if noise is None:
        noise = randn_tensor(x_start.shape, generator=generator, device=x_start.device, dtype=torch.float32)
    x_t = chain.add_noise(x_start, noise.to(x_start.dtype), timesteps)
    output = model_fn(x_t, timesteps).to(x_start.dtype)
    return variational_terms(chain, output, x_start, x_t, timesteps, clip_denoised=clip_denoised)


@torch.no_grad()
def full_elbo(
    chain: DiffusionChain,
    model_fn: ModelFn,
    x_start: torch.Tensor,
    generator: torch.Generator | None = None,
    keep_per_timestep: bool = False,
    progress: Progress | None = None,
    clip_denoised: bool = False,
    timesteps_per_forward: int = 1,
) -> ELBOOutput:
    """The negative ELBO of a batch, every term of ``chain`` summed exactly (not sampled).

    For each timestep t of the chain one x_t ~ q(x_t | x_0) is drawn (the single-sample estimate of the
    expectation over q that every term carries) and the model is evaluated once: K network evaluations per image
    for a K-step chain (K = T for the full chain). The terms are computed in float64 from float64 constants;
    ``model_fn`` receives float64 x_t and casts to its own dtype. ``progress`` wraps the iterable of chain positions
    (e.g. a tqdm bar). ``clip_denoised``: see :func:`variational_terms`. ``timesteps_per_forward``: m timesteps of
    the chain evaluated in one network call on m x B images (a GPU's width; the noise is drawn in the same order).
    """
    x0 = x_start.to(torch.float64)
    batch = x0.shape[0]
    terms = torch.zeros(batch, len(chain.timesteps), dtype=torch.float64, device=x0.device)
    starts = range(0, len(chain.timesteps), timesteps_per_forward)
    for start in progress(starts) if progress is not None else starts:
        positions = list(range(start, min(start + timesteps_per_forward, len(chain.timesteps))))
        t = torch.as_tensor(chain.timesteps[positions], device=x0.device).repeat_interleave(batch)
        values = term_at(chain, model_fn, x0.repeat(len(positions), 1, 1, 1), t, generator, clip_denoised)
        terms[:, positions] = values.view(len(positions), batch).T
    prior = prior_term(chain, x0)
    out = ELBOOutput.from_nats(
        prior, terms[:, 1:].sum(dim=1), terms[:, 0], x0[0].numel(), per_timestep=terms if keep_per_timestep else None
    )
    # the total as prior + the sum of all K terms at once, in that order: the bound, bitwise, of before the refactor
    out.bits_per_dim = nats_to_bits_per_dim(prior + terms.sum(dim=1), x0[0].numel())
    return out


def strata(num_timesteps: int, num_strata: int) -> list[torch.Tensor]:
    """The denoising timesteps 1..T-1 cut into K = ``num_strata`` contiguous strata whose edges are spaced
    geometrically, e_k = round(T^(k/K)) (each at least one past the last, leaving one timestep for every stratum
    after it): strata of a few timesteps where t is small, where the terms L_t are largest and change fastest, and
    wide ones where t is large and L_t small and smooth. Equal strata weighed a rare large L_t at small t by about
    T/K: on a trained MNIST model the stratified estimate's standard error was 5.4 times this one's."""
    if not 1 <= num_strata <= num_timesteps - 1:
        raise ValueError(f"timesteps_per_image must be between 1 and T-1 = {num_timesteps - 1}, got {num_strata}.")
    edges = [1]
    for k in range(1, num_strata):
        edges.append(min(max(round(num_timesteps ** (k / num_strata)), edges[-1] + 1), num_timesteps - num_strata + k))
    edges.append(num_timesteps)
    return [torch.arange(start, stop) for start, stop in zip(edges, edges[1:])]


@torch.no_grad()
def stratified_elbo(
    chain: DiffusionChain,
    model_fn: ModelFn,
    x_start: torch.Tensor,
    timesteps_per_image: int = 8,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    timesteps_per_forward: int = 1,
) -> ELBOOutput:
    """Unbiased estimate of the full negative ELBO of each image, from K = ``timesteps_per_image`` timesteps.

    The T-1 denoising terms are split into K strata S_k; one t_k is drawn uniformly in each, and
    sum_{t=1}^{T-1} L_t is estimated by sum_k |S_k| L_{t_k} (unbiased: E[|S_k| L_{t_k}] = sum_{t in S_k} L_t).
    The reconstruction term L_0 (the largest and most variable) and the prior term are computed exactly, so each
    image costs K + 1 network evaluations. Needs the full chain; float64 throughout. ``clip_denoised``: see
    :func:`variational_terms`. ``timesteps_per_forward``: m strata evaluated in one network call on m x B images (a
    GPU's width); every stratum's timesteps and noise are drawn first, in the order of one call per stratum, so the
    estimate is that of one call per stratum.
    """
    if not chain.is_full:
        raise ValueError("stratified_elbo needs the full chain (DiffusionChain.from_config), not a respaced one.")
    x0 = x_start.to(torch.float64)
    n = len(x0)
    draw_device = generator.device if generator is not None else "cpu"
    draws = []  # (stratum size, each image's timestep in it, the noise of its x_t)
    for group in strata(chain.num_train_timesteps, timesteps_per_image):
        pick = torch.randint(len(group), (n,), generator=generator, device=draw_device)
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        draws.append((len(group), group[pick.cpu()].to(x0.device), noise))
    denoising = torch.zeros(n, dtype=torch.float64, device=x0.device)
    for start in range(0, len(draws), timesteps_per_forward):
        sizes, timesteps, noises = zip(*draws[start : start + timesteps_per_forward])
        x_many = x0.repeat(len(sizes), 1, 1, 1)
        values = term_at(chain, model_fn, x_many, torch.cat(timesteps), None, clip_denoised, torch.cat(noises))
        for size, value in zip(sizes, values.view(len(sizes), n)):
            denoising += size * value
    reconstruction = term_at(chain, model_fn, x0, torch.zeros(n, dtype=torch.long, device=x0.device), generator)
    return ELBOOutput.from_nats(prior_term(chain, x0), denoising, reconstruction, x0[0].numel())
