"""The ELBO terms against torch.distributions, scipy and closed forms; the training losses against the exact bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from hf_ddpm import VDMScheduler, losses

pytestmark = pytest.mark.usefixtures("one_thread")

LN2 = math.log(2.0)
GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # the 8-bit pixel values in [-1, 1]


def on_grid(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random float64 images on the 8-bit grid, with both extreme values present."""
    pixels = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    pixels.view(-1)[:2] = torch.tensor([0, 255])
    return pixels.double() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- densities
def test_normal_kl_equals_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    m1, m2, l1, l2 = (torch.randn(200, generator=generator, dtype=torch.float64) * 3 for _ in range(4))
    p, q = torch.distributions.Normal(m1, (0.5 * l1).exp()), torch.distributions.Normal(m2, (0.5 * l2).exp())
    expected = torch.distributions.kl_divergence(p, q)
    torch.testing.assert_close(losses.normal_kl(m1, l1, m2, l2), expected, rtol=1e-12, atol=1e-14)
    assert losses.normal_kl(m1, l1, m1, l1).abs().max().item() < 1e-15


@pytest.mark.parametrize(
    "mean, log_scale",
    [
        (0.0, -14.0),  # sigma ~ 1e-6 on the edge between two bins: 1/2 each
        (50 / 127.5 - 1, -14.0),  # sigma ~ 1e-6 on a pixel value: probability 1 there
        (0.3, -2.0),
        (-0.95, 0.0),
        (0.999, -9.0),
        (2.5, -1.0),  # outside [-1, 1]
        (-50.0, -5.0),  # far outside, narrow: all mass in the edge bin
        (-3.0, 3.0),  # sigma ~ 20
        (1e-3, 10.0),  # sigma ~ 2e4: nearly all mass in the two open edge bins
    ],
)
def test_discretized_gaussian_is_a_distribution_over_the_256_bins_and_matches_scipy(mean, log_scale):
    means, log_scales = torch.full_like(GRID, mean), torch.full_like(GRID, log_scale)
    log_p = losses.discretized_gaussian_log_likelihood(GRID, means, log_scales)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    # 1e-10: a bin edge x_k + 1/255 and the next one's x_{k+1} - 1/255 agree to ~1e-16, which a sigma of 1e-6
    # centred on that edge turns into ~1e-11 of probability
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-10)
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


def test_discretized_gaussian_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        losses.discretized_gaussian_log_likelihood(GRID, GRID[:3], GRID)


# ---------------------------------------------------------------------------------------------- ELBO terms
def test_prior_term_equals_its_closed_form():
    """KL(N(sqrt(a) x, 1 - a) || N(0, 1)) = (a x^2 - a - log(1 - a)) / 2 per pixel, a = alphas_cumprod[T-1]."""
    scheduler = VDMScheduler()
    a = float(np.prod(1.0 - np.linspace(1e-4, 0.02, 1000)))
    assert a == pytest.approx(4.04e-5, rel=2e-3)
    shape = (3, 1, 4, 5)
    images = {1.0: torch.ones(shape, dtype=torch.float64), 0.0: torch.zeros(shape, dtype=torch.float64)}
    images[-1.0] = -images[1.0]
    bpd = {x: losses.nats_to_bits_per_dim(losses.prior_term(scheduler, image), 20) for x, image in images.items()}
    for x, value in bpd.items():
        closed = 0.5 * (a * x * x - a - math.log1p(-a)) / LN2
        torch.testing.assert_close(value, torch.full((3,), closed, dtype=torch.float64), rtol=1e-6, atol=0)
    assert bpd[1.0][0].item() == pytest.approx(2.91e-5, rel=2e-3)
    assert bpd[0.0][0].item() == pytest.approx(5.9e-10, rel=1e-2)  # ~ a^2 / (4 ln 2): q(x_T) ~= N(0, I)


def test_prior_term_sits_at_the_top_of_a_respaced_chain():
    scheduler = VDMScheduler(timestep_spacing="leading")
    scheduler.set_timesteps(50)  # leading: 0, 20, ..., 980
    top = int(scheduler.chain.timesteps[-1])
    assert top == 980
    a = scheduler.alphas_cumprod[top].item()
    nats = losses.prior_term(scheduler, torch.ones(2, 1, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(nats, torch.full((2,), 4 * 0.5 * -math.log1p(-a), dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [None, 10])
def test_oracle_model_makes_every_denoising_term_zero(steps):
    """A model that outputs the true x_0 with fixed_small variance: every KL(q || p) is 0, the bound is prior +
    reconstruction, and the decoder is N(x_0, beta~_1) discretized, whose bin masses scipy gives independently."""
    scheduler = VDMScheduler(num_train_timesteps=100, beta_end=0.1, prediction_type="sample")
    if steps:
        scheduler.set_timesteps(steps)
    x0 = on_grid(3, 1, 4, 4)
    oracle = lambda x_t, t: x0  # noqa: E731
    result = losses.full_elbo(scheduler, oracle, x0, generator=torch.Generator().manual_seed(0), keep_per_timestep=True)
    assert result.per_timestep.shape == (3, steps or 100)
    assert result.per_timestep[:, 1:].abs().max().item() < 1e-12
    assert result.denoising_terms.abs().max().item() < 1e-10
    torch.testing.assert_close(result.bits_per_dim, result.prior_term + result.reconstruction_term, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.reconstruction_term, result.per_timestep[:, 0], rtol=0, atol=0)
    sigma = math.sqrt(scheduler.chain.posterior_variance[1])  # the clipped decoder variance
    inner = 2 * norm.cdf(1 / 255 / sigma) - 1
    edge = norm.cdf(1 / 255 / sigma)
    masses = np.where(np.abs(x0.numpy()) == 1.0, edge, inner).reshape(3, -1)
    expected_bpd = -np.log(masses).sum(axis=1) / (16 * LN2)
    np.testing.assert_allclose(result.reconstruction_term.numpy(), expected_bpd, rtol=1e-10)
    top = scheduler.alphas_cumprod[int(scheduler.chain.timesteps[-1])].item()
    closed_prior = 0.5 * (top * x0**2 - top - math.log1p(-top)).reshape(3, -1).sum(dim=1) / (16 * LN2)
    torch.testing.assert_close(result.prior_term, closed_prior, rtol=1e-9, atol=0)


def test_denoising_term_is_ho_et_al_weighted_noise_error():
    """With epsilon prediction and fixed_small variance, L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))
    ||eps - eps_theta||^2 (Ho et al., 2020, eq. 12)."""
    scheduler = VDMScheduler(num_train_timesteps=50, beta_end=0.2, clip_sample=False)
    generator = torch.Generator().manual_seed(1)
    x0 = on_grid(2, 1, 3, 3)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    error = 0.3 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    betas, abar = scheduler.betas.numpy(), scheduler.alphas_cumprod.numpy()
    for step in (1, 2, 25, 49):
        t = torch.full((2,), step)
        x_t = scheduler.add_noise(x0, noise, t)
        kl = losses.variational_terms(scheduler, noise + error, x0, x_t, t)
        sigma2 = betas[step] * (1 - abar[step - 1]) / (1 - abar[step])
        weight = betas[step] ** 2 / (2 * sigma2 * (1 - betas[step]) * (1 - abar[step]))
        torch.testing.assert_close(kl, weight * (error**2).reshape(2, -1).sum(dim=1), rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------- training losses
def linear_model(T: int, learned: bool) -> losses.ModelFn:
    """A fixed, deterministic model: a per-timestep affine map of x_t (and tanh(x_t) as the variance channel)."""
    generator = torch.Generator().manual_seed(7)
    scale = 0.5 + 0.3 * torch.rand(T, generator=generator, dtype=torch.float64)
    shift = 0.1 * torch.randn(T, generator=generator, dtype=torch.float64)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t = x_t.double()
        prediction = scale[t].view(-1, 1, 1, 1) * x_t + shift[t].view(-1, 1, 1, 1)
        return torch.cat([prediction, torch.tanh(x_t)], dim=1) if learned else prediction

    return model_fn


@pytest.mark.parametrize("variance_type", ["fixed_large", "learned_range"])
def test_vlb_loss_is_an_unbiased_estimate_of_the_exact_bound(variance_type):
    """full_elbo draws one x_t per timestep; the vlb loss at every t with those same x_t, averaged over uniform t
    (or weighted by 1 / (T p(t)) and averaged over p(t)), is that exact bound."""
    T = 20
    scheduler = VDMScheduler(num_train_timesteps=T, beta_end=0.3, variance_type=variance_type)
    model_fn = linear_model(T, variance_type == "learned_range")
    x0 = on_grid(3, 1, 4, 4)
    seen = {}

    def recording_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen[int(t[0])] = x_t.clone()
        return model_fn(x_t, t)

    exact = losses.full_elbo(scheduler, recording_model, x0, generator=torch.Generator().manual_seed(5))
    abar = scheduler.alphas_cumprod

    def vlb_at(t: int, weight: float = 1.0) -> losses.TrainingLoss:
        noise = (seen[t] - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()  # the noise full_elbo drew at t
        weights = torch.full((3,), weight)
        return losses.training_loss("vlb", scheduler, model_fn, x0, torch.full((3,), t), noise=noise, timestep_weights=weights)

    uniform = [vlb_at(t) for t in range(T)]
    vlb = torch.stack([out.vlb_bits_per_dim.double() for out in uniform])  # (T, B)
    loss = torch.stack([out.loss.double() for out in uniform])
    # the training path computes in float32 (here ~5e-6 off), the bound in float64; a wrong scale would be >= 1/T
    torch.testing.assert_close(vlb.mean(dim=0), exact.bits_per_dim, rtol=3e-5, atol=0)
    torch.testing.assert_close(loss.mean(dim=0), exact.bits_per_dim - exact.prior_term, rtol=3e-5, atol=0)
    p = torch.rand(T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    p /= p.sum()
    weighted = torch.stack([vlb_at(t, 1.0 / (T * p[t].item())).vlb_bits_per_dim.double() for t in range(T)])
    torch.testing.assert_close((p[:, None] * weighted).sum(dim=0), exact.bits_per_dim, rtol=3e-5, atol=0)


def test_hybrid_gradient_trains_the_mean_like_simple_and_the_variance_like_vlb():
    T = 20
    scheduler = VDMScheduler(num_train_timesteps=T, variance_type="learned_range")
    generator = torch.Generator().manual_seed(0)
    x0 = on_grid(4, 1, 4, 4).float()
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 1, 9, 19])  # the reconstruction term and three KL terms
    raw = torch.cat([torch.randn(x0.shape, generator=generator), torch.rand(x0.shape, generator=generator) * 2 - 1], dim=1)
    grads = {}
    for kind in ("simple", "vlb", "hybrid"):
        output = raw.clone().requires_grad_(True)
        losses.training_loss(kind, scheduler, lambda x_t, _: output, x0, t, noise=noise).loss.sum().backward()
        grads[kind] = output.grad
    mean, var = slice(0, 1), slice(1, 2)
    torch.testing.assert_close(grads["hybrid"][:, mean], grads["simple"][:, mean], rtol=1e-6, atol=0)
    # float32 rounding, amplified where a gradient nearly cancels: relative to the gradient's scale
    expected = losses.HYBRID_VLB_WEIGHT * grads["vlb"][:, var]
    torch.testing.assert_close(grads["hybrid"][:, var], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert grads["simple"][:, var].abs().max() == 0  # the squared error does not see the variance
    assert grads["vlb"][:, mean].abs().min() > 0  # ... and the bound does see the mean: hybrid detaches it
    assert grads["hybrid"][:, var].abs().min() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_simple_loss_is_zero_for_the_true_target_and_positive_otherwise(prediction_type):
    scheduler = VDMScheduler(num_train_timesteps=20, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0 = on_grid(3, 1, 4, 4).float()
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 7, 19])
    target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction_type]
    oracle = losses.training_loss("hybrid", scheduler, lambda x_t, _: target, x0, t, noise=noise)
    assert oracle.mse.abs().max().item() == 0.0
    assert oracle.vlb_term_bits_per_dim[1:].abs().max().item() < 1e-5  # KL terms vanish (float32)
    off = losses.training_loss("simple", scheduler, lambda x_t, _: target + 0.5, x0, t, noise=noise)
    torch.testing.assert_close(off.loss, torch.full((3,), 0.25), rtol=1e-6, atol=0)


def test_unknown_loss_type_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="'l2'.*simple, vlb, hybrid"):
        losses.training_loss("l2", VDMScheduler(num_train_timesteps=20), lambda x, t: x, -torch.ones(1, 1, 2, 2), torch.tensor([3]))
