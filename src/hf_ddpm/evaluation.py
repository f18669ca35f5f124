"""The negative ELBO of a data set in bits/dim: exact (all T terms) or an unbiased stratified estimate of it.

The exact bound costs T network evaluations per image (1,000 x 10,000 test digits is hours on 2 CPU cores).
:func:`estimate_bound` estimates the same sum from K stratified timesteps per image plus the reconstruction term,
with its standard error, in K + 1 evaluations per image. Both return a :class:`BoundEstimate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .losses import ModelFn, full_elbo, nats_to_bits_per_dim, prior_term, variational_terms
from .scheduling_vdm import VDMScheduler


@dataclass
class BoundEstimate:
    """The mean negative ELBO of a set of images in bits/dim, its parts and their standard errors.

    ``standard_error`` is the standard deviation of the per-image values over sqrt(N): it covers both the spread
    of the images and the randomness of the estimator, so it is the error of ``bits_per_dim`` as an estimate of the
    data set's mean bound.
    """

    bits_per_dim: float
    standard_error: float
    prior_term: float
    denoising_terms: float
    reconstruction_term: float
    denoising_standard_error: float
    per_image: torch.Tensor
    num_images: int
    timesteps_per_image: int | None  # None when every term was computed (exact)


def _mean_and_standard_error(values: torch.Tensor) -> tuple[float, float]:
    mean = values.mean().item()
    spread = values.std().item() if len(values) > 1 else float("nan")
    return mean, spread / math.sqrt(len(values))


def _summarise(prior: torch.Tensor, denoising: torch.Tensor, reconstruction: torch.Tensor, timesteps_per_image: int | None) -> BoundEstimate:
    total = prior + denoising + reconstruction
    mean, error = _mean_and_standard_error(total)
    return BoundEstimate(
        bits_per_dim=mean, standard_error=error, prior_term=prior.mean().item(), denoising_terms=denoising.mean().item(),
        reconstruction_term=reconstruction.mean().item(), denoising_standard_error=_mean_and_standard_error(denoising)[1],
        per_image=total, num_images=len(total), timesteps_per_image=timesteps_per_image,
    )


def strata(num_timesteps: int, num_strata: int) -> list[torch.Tensor]:
    """The denoising timesteps 1..T-1 cut into ``num_strata`` contiguous strata of (nearly) equal size."""
    if not 1 <= num_strata <= num_timesteps - 1:
        raise ValueError(f"timesteps_per_image must be between 1 and T-1 = {num_timesteps - 1}, got {num_strata}.")
    return list(torch.arange(1, num_timesteps).tensor_split(num_strata))


@torch.no_grad()
def estimate_bound(
    scheduler: VDMScheduler,
    model_fn: ModelFn,
    images: torch.Tensor,
    *,
    timesteps_per_image: int = 8,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: Callable | None = None,
) -> BoundEstimate:
    """Unbiased estimate of the full negative ELBO of each image, from K = ``timesteps_per_image`` timesteps.

    The T-1 denoising terms are split into K strata S_k; one t_k is drawn uniformly in each, and
    sum_{t=1}^{T-1} L_t is estimated by sum_k |S_k| L_{t_k} (unbiased: E[|S_k| L_{t_k}] = sum_{t in S_k} L_t).
    The reconstruction term L_0 (the largest and most variable) and the prior term are computed exactly, so each
    image costs K + 1 network evaluations. Works on the scheduler's full chain; float64 throughout.

    Args:
        scheduler: a :class:`VDMScheduler` with the full chain (not respaced).
        model_fn: ``model_fn(x_t, timesteps) -> model_output``; receives float64 x_t.
        images: (N, C, H, W) in [-1, 1] on the 8-bit grid.
        progress: wraps the iterable of batches (e.g. tqdm).
    """
    T = scheduler.config.num_train_timesteps
    if len(scheduler.chain.timesteps) != T:
        raise ValueError("estimate_bound needs the full chain: call scheduler.set_timesteps(num_train_timesteps) first.")
    groups = strata(T, timesteps_per_image)
    num_dims = images[0].numel()
    priors, denoisings, reconstructions = [], [], []
    batches = images.split(batch_size)
    for batch in progress(batches) if progress is not None else batches:
        x0 = batch.to(torch.float64)
        n = len(x0)

        def term_at(t: torch.Tensor) -> torch.Tensor:
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32).to(torch.float64)
            x_t = scheduler.add_noise(x0, noise, t)
            return variational_terms(scheduler, model_fn(x_t, t).to(torch.float64), x0, x_t, t)

        denoising = torch.zeros(n, dtype=torch.float64, device=x0.device)
        for group in groups:
            pick = torch.randint(len(group), (n,), generator=generator, device=generator.device if generator is not None else "cpu")
            denoising += len(group) * term_at(group[pick.cpu()].to(x0.device))
        reconstruction = term_at(torch.zeros(n, dtype=torch.long, device=x0.device))
        priors.append(nats_to_bits_per_dim(prior_term(scheduler, x0), num_dims).cpu())
        denoisings.append(nats_to_bits_per_dim(denoising, num_dims).cpu())
        reconstructions.append(nats_to_bits_per_dim(reconstruction, num_dims).cpu())
    return _summarise(torch.cat(priors), torch.cat(denoisings), torch.cat(reconstructions), timesteps_per_image)


@torch.no_grad()
def exact_bound(
    scheduler: VDMScheduler,
    model_fn: ModelFn,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: Callable | None = None,
) -> BoundEstimate:
    """The full negative ELBO of each image, every one of the T terms computed (:func:`hf_ddpm.losses.full_elbo`),
    summarised like :func:`estimate_bound`. T network evaluations per image."""
    parts = [full_elbo(scheduler, model_fn, batch, generator=generator) for batch in (progress(images.split(batch_size)) if progress else images.split(batch_size))]
    cat = lambda name: torch.cat([getattr(p, name).cpu() for p in parts])  # noqa: E731
    return _summarise(cat("prior_term"), cat("denoising_terms"), cat("reconstruction_term"), None)
