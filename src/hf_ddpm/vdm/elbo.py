"""The variational bound of a variational diffusion model (Kingma et al. 2021), one function per equation.

With q(z_t | x) = N(alpha_t x, sigma_t^2 I) on t in [0, 1] (see :mod:`hf_ddpm.vdm.noise_schedule`), the negative
ELBO of one image x with D = C * H * W dimensions is, in nats,

    -log p(x) <= L_prior + L_diffusion + L_reconstruction,

    L_prior          = KL(q(z_1 | x) || N(0, I))                               (:func:`prior_loss`)
    L_reconstruction = E_{q(z_0 | x)}[-log p(x | z_0)]                          (:func:`reconstruction_loss`)
    L_inf            = 1/2 E_{t ~ U(0,1), eps}[gamma'(t) ||eps - eps_hat(z_t, t)||^2]
                                                                                (:func:`continuous_diffusion_loss`)
    L_T              = T/2 E_{i ~ U{1..T}, eps}[expm1(gamma(t) - gamma(s)) ||eps - eps_hat(z_t, t)||^2],
                       t = i / T, s = (i - 1) / T                               (:func:`discrete_diffusion_loss`)

with z_t = alpha_t x + sigma_t eps and eps ~ N(0, I). L_inf is the T -> inf limit of L_T, and L_T >= L_2T >= L_inf
for a fixed network whose error shrinks as the SNR grows (VDM, section 4). Every function takes explicit inputs:
a :class:`~hf_ddpm.vdm.noise_schedule.NoiseSchedule` and the network as a callable ``model_fn(z_t, t) -> eps_hat``
with continuous t of shape (B,). Per-image results have shape (B,) and are in nats.

Data x lie on the 8-bit grid v_k = k / 127.5 - 1, k = 0..255, in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..distributions import kl_to_standard_normal, nats_to_bits_per_dim, sum_over_pixels
from .noise_schedule import (
    DeferredGradientScale,
    NoiseSchedule,
    alpha_sigma_from_gamma,
    epsilon_of_clipped_estimate,
)

#: The network: eps_hat = model_fn(z_t, t), z_t of shape (B, C, H, W) and continuous t in [0, 1] of shape (B,).
VDMEpsilonModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Number of values of one 8-bit pixel; value k sits at k / 127.5 - 1.
VDM_VOCAB_SIZE = 256


@dataclass(frozen=True)
class VDMLossTerms:
    """The three terms of the VDM bound, per image (B,), in nats unless built by :meth:`in_bits_per_dim`.

    Args:
        prior (`torch.Tensor`): KL(q(z_1 | x) || N(0, I)).
        diffusion (`torch.Tensor`): L_inf or L_T.
        reconstruction (`torch.Tensor`): -log p(x | z_0).
    """

    prior: torch.Tensor
    diffusion: torch.Tensor
    reconstruction: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """The bound on -log p(x): prior + diffusion + reconstruction."""
        return self.prior + self.diffusion + self.reconstruction

    def in_bits_per_dim(self, num_dims: int) -> VDMLossTerms:
        """The same terms in bits/dim: nats / (D ln 2), with D = ``num_dims`` = C * H * W."""
        return VDMLossTerms(
            prior=nats_to_bits_per_dim(self.prior, num_dims),
            diffusion=nats_to_bits_per_dim(self.diffusion, num_dims),
            reconstruction=nats_to_bits_per_dim(self.reconstruction, num_dims),
        )


@dataclass(frozen=True)
class VDMBoundEstimate:
    """A Monte-Carlo estimate of the VDM bound per image.

    Args:
        terms (`VDMLossTerms`): the per-image means of the terms over the draws.
        standard_error (`torch.Tensor`): (B,) standard error of ``terms.total``, s / sqrt(K) from the K draws.
    """

    terms: VDMLossTerms
    standard_error: torch.Tensor


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped (B, 1, ..., 1) to broadcast against ``like`` of shape (B, ...)."""
    return values.reshape([-1] + [1] * (like.dim() - 1))


def _vdm_uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None, dtype: torch.dtype
) -> torch.Tensor:
    """U(0, 1) draws made on the generator's device (CPU without one), then moved to ``device``."""
    source = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=source, dtype=dtype).to(device)


def _vdm_noised(gamma: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = alpha_t x + sigma_t eps for per-image gamma(t) of shape (B,)."""
    alpha, sigma = alpha_sigma_from_gamma(_per_image(gamma, x))
    return alpha * x + sigma * noise


def clipped_estimate_model(schedule: NoiseSchedule, model_fn: VDMEpsilonModel) -> VDMEpsilonModel:
    """The model whose data estimate is clipped to [-1, 1]: (z_t, t) -> eps~ of
    :func:`~hf_ddpm.vdm.noise_schedule.epsilon_of_clipped_estimate` at gamma(t),

        x~(z_t, t) = clip((z_t - sigma_t eps_hat(z_t, t)) / alpha_t, -1, 1).

    Its reverse steps p(z_s | z_t) = q(z_s | z_t, x = x~) are what ``VDMContinuousScheduler(clip_sample=True)``
    samples, so the bound of this model is the bound of the clipping sampler; per image and time it is at most the
    bound of ``model_fn`` (data lie in [-1, 1]). For evaluation: its gradient in a learned schedule is not meant.
    """

    def clipped_model_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gamma = _per_image(schedule(t.to(z_t.dtype)).expand(z_t.shape[0]), z_t)
        return epsilon_of_clipped_estimate(z_t, model_fn(z_t, t), gamma)

    return clipped_model_fn


def low_discrepancy_times(
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """VDM's antithetic times: u_0 ~ U(0, 1) once, t_i = (u_0 + i / B) mod 1 for i = 0..B-1, shape (B,).

    Each t_i is marginally U(0, 1) and together they cover [0, 1) evenly, which lowers the variance of the batch
    mean of the diffusion loss.
    """
    u_0 = _vdm_uniform((1,), generator, device, dtype)
    return torch.remainder(u_0 + torch.arange(batch_size, device=device, dtype=dtype) / batch_size, 1.0)


def continuous_diffusion_loss(
    schedule: NoiseSchedule,
    model_fn: VDMEpsilonModel,
    x: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    interior_gradient: DeferredGradientScale | None = None,
) -> torch.Tensor:
    """One-sample estimate of L_inf per image: 1/2 gamma'(t) ||eps - eps_hat(z_t, t)||^2, (B,) nats.

    z_t = alpha_t x + sigma_t eps with eps = ``noise``, each image at its own time t (B,). For t ~ U(0, 1) its
    expectation is L_inf = 1/2 int_0^1 gamma'(t) E||eps - eps_hat(z_t, t)||^2 dt. ``interior_gradient`` is passed
    to :meth:`~hf_ddpm.NoiseSchedule.gamma_and_derivative`.
    """
    gamma, derivative = schedule.gamma_and_derivative(t.to(x.dtype), interior_gradient)
    z_t = _vdm_noised(gamma, x, noise)
    return 0.5 * derivative * sum_over_pixels((noise - model_fn(z_t, t)) ** 2)


def discrete_diffusion_loss(
    schedule: NoiseSchedule,
    model_fn: VDMEpsilonModel,
    x: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    num_steps: int,
) -> torch.Tensor:
    """One-sample estimate of L_T per image, t on the grid i / T (i = 1..T), s = t - 1/T, (B,) nats:

        T/2 (SNR(s) - SNR(t)) ||x - x_hat(z_t, t)||^2 = T/2 expm1(gamma(t) - gamma(s)) ||eps - eps_hat(z_t, t)||^2,

    with x_hat = (z_t - sigma_t eps_hat) / alpha_t (so ||x - x_hat||^2 = e^gamma(t) ||eps - eps_hat||^2); the expm1
    form is the stable one. For i ~ U{1..T} its expectation is L_T. Raises ``ValueError`` if t is off the grid.
    """
    index = torch.round(t.to(torch.float64) * num_steps)
    off_grid = (index < 1) | (index > num_steps) | ((t.to(torch.float64) - index / num_steps).abs() > 1e-3 / num_steps)
    if off_grid.any():
        raise ValueError(f"discrete_diffusion_loss needs t on the grid i / {num_steps}, i = 1..{num_steps}; got {t}.")
    t = (index / num_steps).to(x.dtype)
    gamma_t = schedule(t)
    gamma_s = schedule(t - 1.0 / num_steps)
    z_t = _vdm_noised(gamma_t, x, noise)
    return 0.5 * num_steps * torch.expm1(gamma_t - gamma_s) * sum_over_pixels((noise - model_fn(z_t, t)) ** 2)


def prior_loss(schedule: NoiseSchedule, x: torch.Tensor) -> torch.Tensor:
    """L_prior = KL(N(alpha_1 x, sigma_1^2 I) || N(0, I)), (B,) nats:

    1/2 sum_i (alpha_1^2 x_i^2 + sigma_1^2 - 1 - log sigma_1^2),  log sigma_1^2 = log sigmoid(gamma(1)).
    """
    gamma_1 = schedule(torch.ones(1, dtype=x.dtype, device=x.device))
    alpha_1, _ = alpha_sigma_from_gamma(gamma_1)
    return kl_to_standard_normal(alpha_1 * x, torch.nn.functional.logsigmoid(gamma_1).expand_as(x))


def decoder_log_probs(z_0: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
    """VDM's decoder log p(x_i = v_k | z_0) for every pixel i and value k: (...) -> (..., 256), in nats.

        logits_k = -1/2 (z_0 / alpha_0 - v_k)^2 / (sigma_0 / alpha_0)^2 = -1/2 (z_0 / alpha_0 - v_k)^2 e^(-gamma_0),
        log p(x_i = v_k | z_0) = logits_k - logsumexp_j logits_j,

    with v_k = k / 127.5 - 1: each pixel is a categorical over the 256 values whose logits are the Gaussian
    log-density of the rescaled latent z_0 / alpha_0 = x + e^(gamma_0 / 2) eps around each value. ``gamma_0`` is
    gamma(0), a tensor broadcastable against ``z_0`` (a scalar, or (B, 1, 1, 1) per image).
    """
    alpha_0, _ = alpha_sigma_from_gamma(gamma_0)
    values = torch.arange(VDM_VOCAB_SIZE, dtype=z_0.dtype, device=z_0.device) / 127.5 - 1.0
    rescaled = (z_0 / alpha_0).unsqueeze(-1)
    logits = -0.5 * (rescaled - values) ** 2 * torch.exp(-gamma_0).unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1)


def _vdm_pixel_index(x: torch.Tensor) -> torch.Tensor:
    """k = 127.5 (x + 1) for x on the 8-bit grid, as int64; raises ``ValueError`` if x is off the grid."""
    index = torch.round((x + 1.0) * 127.5)
    if ((index < 0) | (index > VDM_VOCAB_SIZE - 1) | ((index / 127.5 - 1.0 - x).abs() > 1e-3)).any():
        raise ValueError("x must lie on the 8-bit grid k / 127.5 - 1, k = 0..255.")
    return index.long()


def reconstruction_loss(schedule: NoiseSchedule, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One-sample estimate of L_reconstruction = -log p(x | z_0) = -sum_i log p(x_i | z_0), (B,) nats, with
    z_0 = alpha_0 x + sigma_0 eps (eps = ``noise``) and p(x_i | z_0) the categorical of :func:`decoder_log_probs`."""
    gamma_0 = schedule(torch.zeros(1, dtype=x.dtype, device=x.device))
    alpha_0, sigma_0 = alpha_sigma_from_gamma(gamma_0)
    log_probs = decoder_log_probs(alpha_0 * x + sigma_0 * noise, gamma_0)
    return -sum_over_pixels(log_probs.gather(-1, _vdm_pixel_index(x).unsqueeze(-1)).squeeze(-1))


def vdm_loss_terms(
    schedule: NoiseSchedule,
    model_fn: VDMEpsilonModel,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    num_steps: int = 0,
    interior_gradient: DeferredGradientScale | None = None,
) -> VDMLossTerms:
    """VDM's one-sample training objective per image: the exact prior term, plus one-sample reconstruction and
    diffusion terms at low-discrepancy times (:func:`low_discrepancy_times`).

    ``num_steps`` = 0 gives the continuous-time L_inf; T > 0 the discrete-time L_T, with times rounded up onto the
    grid, t = max(ceil(T t), 1) / T, as VDM does. ``total.mean()`` is the loss to minimise. ``interior_gradient``
    (continuous time only, where the bound does not depend on a learned schedule's interior) rescales the
    gradients that reach that interior through the diffusion term (:func:`continuous_diffusion_loss`).
    """
    if num_steps and interior_gradient is not None:
        raise ValueError("interior_gradient needs the continuous-time loss (num_steps=0): L_T depends on it.")
    t = low_discrepancy_times(x.shape[0], generator, x.device, x.dtype)
    noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if num_steps:
        diffusion = discrete_diffusion_loss(
            schedule, model_fn, x, torch.ceil(t * num_steps).clamp(min=1) / num_steps, noise, num_steps
        )
    else:
        diffusion = continuous_diffusion_loss(schedule, model_fn, x, t, noise, interior_gradient)
    return _vdm_terms_around(schedule, x, diffusion, generator)


def _vdm_terms_around(
    schedule: NoiseSchedule, x: torch.Tensor, diffusion: torch.Tensor, generator: torch.Generator | None
) -> VDMLossTerms:
    """The three terms around a diffusion term: the exact prior term and a one-sample reconstruction term (its
    z_0 noise drawn from ``generator`` after the diffusion term's draws)."""
    reconstruction_noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return VDMLossTerms(
        prior=prior_loss(schedule, x),
        diffusion=diffusion,
        reconstruction=reconstruction_loss(schedule, x, reconstruction_noise),
    )


def discrete_time_bound(
    schedule: NoiseSchedule,
    model_fn: VDMEpsilonModel,
    x: torch.Tensor,
    num_steps: int,
    generator: torch.Generator | None = None,
    steps_per_forward: int = 1,
) -> VDMLossTerms:
    """The T-step bound per image with every step summed, one z_t per step (no sampling of the step):

        L_T = sum_{i=1}^T 1/2 expm1(gamma(i/T) - gamma((i-1)/T)) ||eps_i - eps_hat(z_{i/T}, i/T)||^2,

    with the exact prior term and a one-sample reconstruction term. ``steps_per_forward``: m steps evaluated in one
    network call on m x B images (a GPU's width; the noise drawn in the same order). Wrap it in ``torch.no_grad()``
    to evaluate.
    """
    batch = x.shape[0]
    diffusion = torch.zeros(batch, dtype=x.dtype, device=x.device)
    for first in range(1, num_steps + 1, steps_per_forward):
        steps = range(first, min(first + steps_per_forward, num_steps + 1))
        t = torch.cat([torch.full((batch,), step / num_steps, dtype=x.dtype, device=x.device) for step in steps])
        noise = torch.cat([randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype) for _ in steps])
        losses = discrete_diffusion_loss(schedule, model_fn, _repeated(x, len(steps)), t, noise, num_steps)
        for loss in losses.view(len(steps), batch):
            diffusion = diffusion + loss / num_steps
    return _vdm_terms_around(schedule, x, diffusion, generator)


def _repeated(x: torch.Tensor, times: int) -> torch.Tensor:
    """``times`` copies of the batch ``x`` one after another: (times * B, ...)."""
    return x.repeat(times, *([1] * (x.dim() - 1)))


def continuous_time_bound_estimate(
    schedule: NoiseSchedule,
    model_fn: VDMEpsilonModel,
    x: torch.Tensor,
    num_times: int,
    generator: torch.Generator | None = None,
    draws_per_forward: int = 1,
) -> VDMBoundEstimate:
    """The continuous-time bound per image averaged over K = ``num_times`` draws, with its standard error.

    Image b gets the low-discrepancy times t_bk = (u_b + k / K) mod 1, k = 0..K-1, u_b ~ U(0, 1), and draw k
    the value prior + 1/2 gamma'(t_bk) ||eps_bk - eps_hat(z_{t_bk}, t_bk)||^2 - log p(x | z_0^(bk)) (fresh noise
    for both). The result is the mean over k and s / sqrt(K), s the sample standard deviation over k; that is
    the i.i.d. formula, which ignores the stratification of the times and so usually overstates the error.
    ``draws_per_forward``: m draws evaluated in one network call on m x B images (a GPU's width; the noise drawn
    in the same order). Wrap it in ``torch.no_grad()`` to evaluate.
    """
    if num_times < 2:
        raise ValueError(f"num_times={num_times} must be at least 2 to estimate a standard error.")
    batch = x.shape[0]
    offsets = _vdm_uniform((batch,), generator, x.device, x.dtype)
    diffusion, reconstruction = [], []
    for first in range(0, num_times, draws_per_forward):
        draws = range(first, min(first + draws_per_forward, num_times))
        times, noises = [], []
        for draw in draws:
            times.append(torch.remainder(offsets + draw / num_times, 1.0))
            noises.append(randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype))
            reconstruction_noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            reconstruction.append(reconstruction_loss(schedule, x, reconstruction_noise))
        losses = continuous_diffusion_loss(
            schedule, model_fn, _repeated(x, len(draws)), torch.cat(times), torch.cat(noises)
        )
        diffusion.extend(losses.view(len(draws), batch))
    diffusion_draws, reconstruction_draws = torch.stack(diffusion), torch.stack(reconstruction)
    prior = prior_loss(schedule, x)
    totals = prior + diffusion_draws + reconstruction_draws
    terms = VDMLossTerms(prior=prior, diffusion=diffusion_draws.mean(0), reconstruction=reconstruction_draws.mean(0))
    return VDMBoundEstimate(terms=terms, standard_error=totals.std(dim=0) / math.sqrt(num_times))
