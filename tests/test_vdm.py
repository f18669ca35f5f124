"""The continuous-time VDM (noise schedule, bound, scheduler) against closed forms, quadrature and scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import expit, log_softmax

from hf_ddpm.models.unet import DenoisingUNet, base2_fourier_features
from hf_ddpm.vdm.elbo import (
    VDMLossTerms,
    clipped_estimate_model,
    continuous_diffusion_loss,
    continuous_time_bound_estimate,
    decoder_log_probs,
    discrete_diffusion_loss,
    discrete_time_bound,
    low_discrepancy_times,
    prior_loss,
    reconstruction_loss,
    vdm_loss_terms,
)
from hf_ddpm.vdm.noise_schedule import NoiseSchedule, epsilon_of_clipped_estimate
from hf_ddpm.vdm.scheduler import VDMContinuousScheduler

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
GRID = np.arange(256) / 127.5 - 1.0  # the 8-bit pixel values


def f32(value: float) -> float:
    """``value`` rounded to float32, as the schedule stores its parameters."""
    return float(np.float32(value))


def on_grid(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random float64 images on the 8-bit grid k / 127.5 - 1."""
    pixels = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    return pixels.double() / 127.5 - 1.0


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def random_learned_schedule(gamma_min: float = -13.3, gamma_max: float = 5.0, seed: int = 0) -> NoiseSchedule:
    """A learned schedule with large random weights, so that it is far from linear."""
    schedule = NoiseSchedule(schedule_type="learned", gamma_min=gamma_min, gamma_max=gamma_max, n_features=8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        schedule.l1_weight.fill_(0.1)
        schedule.l2.weight.copy_(3.0 * torch.randn(8, 1, generator=generator))
        schedule.l2.bias.copy_(2.0 * torch.randn(8, generator=generator))
        schedule.l3.weight.copy_(30.0 * torch.randn(1, 8, generator=generator))
    return schedule


def oracle_model(schedule: NoiseSchedule, x: torch.Tensor, scale: float = 1.0, grid: int | None = None):
    """eps_hat(z_t, t) = scale (z_t - alpha_t x) / sigma_t: the true noise (times ``scale``) for images x; with
    ``grid``, t is first rounded to the nearest i / grid (the scheduler's float32 timesteps are not exact)."""

    def model_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(F64) if grid is None else torch.round(t.to(F64) * grid) / grid
        alpha, sigma = schedule.alpha_sigma(t.expand(x.shape[0]))
        return scale * (z_t - alpha.reshape(-1, 1, 1, 1) * x) / sigma.reshape(-1, 1, 1, 1)

    return model_fn


def zero_model(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(z_t)


# ----------------------------------------------------------------------------------------- noise schedule
def test_learned_schedule_is_monotone_with_exact_endpoints_and_not_linear():
    schedule = random_learned_schedule()
    t = torch.linspace(0, 1, 2001, dtype=F64)
    gamma = schedule(t).detach()
    assert (gamma.diff() > 0).all()
    assert gamma[0].item() == pytest.approx(f32(-13.3), abs=1e-12)
    assert gamma[-1].item() == pytest.approx(5.0, abs=1e-12)
    assert (gamma - (-13.3 + 18.3 * t)).abs().max() > 1.0  # the random network bends it
    with torch.no_grad():  # the endpoints are the learned scalars gamma_0, gamma_1
        schedule.gamma_0.fill_(-7.0)
        schedule.gamma_1.fill_(2.0)
    ends = schedule(torch.tensor([0.0, 1.0], dtype=F64)).detach()
    torch.testing.assert_close(ends, torch.tensor([-7.0, 2.0], dtype=F64), rtol=0, atol=1e-12)
    assert {name for name, _ in schedule.named_parameters()} >= {"gamma_0", "gamma_1", "l1_weight", "l2.weight"}


def test_default_learned_schedule_starts_linear_as_vdm():
    schedule = NoiseSchedule()
    t = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(schedule(t).detach(), -13.3 + 18.3 * t, rtol=0, atol=0.05)
    assert schedule.l2.weight.dtype == torch.float32


@pytest.mark.parametrize("schedule_type", ["learned", "linear", "cosine"])
def test_gamma_derivative_matches_finite_differences_with_and_without_grad(schedule_type):
    schedule = random_learned_schedule() if schedule_type == "learned" else NoiseSchedule(schedule_type=schedule_type)
    t = torch.linspace(0.01, 0.99, 13, dtype=F64)
    h = 1e-6
    finite = (schedule(t + h) - schedule(t - h)).detach() / (2 * h)
    gamma, derivative = schedule.gamma_and_derivative(t)
    torch.testing.assert_close(derivative.detach(), finite, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(gamma.detach(), schedule(t).detach(), rtol=0, atol=1e-12)
    with torch.no_grad():
        gamma_ng, derivative_ng = schedule.gamma_and_derivative(t)
    assert not derivative_ng.requires_grad and not gamma_ng.requires_grad
    torch.testing.assert_close(derivative_ng, finite, rtol=1e-7, atol=1e-7)
    assert gamma.dtype == derivative.dtype == F64
    assert schedule(t.float()).dtype == torch.float32


def test_learned_derivative_is_differentiable_in_the_parameters():
    schedule = random_learned_schedule()
    _, derivative = schedule.gamma_and_derivative(torch.tensor([0.3, 0.7], dtype=F64))
    derivative.sum().backward()
    assert schedule.l2.weight.grad.abs().sum() > 0 and schedule.gamma_1.grad.abs() > 0


def test_cosine_schedule_is_the_truncated_cosine_alpha():
    gamma_min, gamma_max = -10.0, 6.0
    schedule = NoiseSchedule(schedule_type="cosine", gamma_min=gamma_min, gamma_max=gamma_max)
    t = np.linspace(0, 1, 9)
    t_0, t_1 = (2 / np.pi * np.arctan(np.exp(g / 2)) for g in (gamma_min, gamma_max))
    stretched = t_0 + (t_1 - t_0) * t  # the cosine schedule's own time
    alpha, sigma = schedule.alpha_sigma(torch.from_numpy(t))
    np.testing.assert_allclose(alpha.numpy(), np.cos(np.pi * stretched / 2), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.sin(np.pi * stretched / 2), rtol=1e-12)
    gamma = schedule(torch.from_numpy(t)).numpy()
    assert gamma[0] == pytest.approx(gamma_min, abs=1e-12) and gamma[-1] == pytest.approx(gamma_max, abs=1e-12)
    np.testing.assert_allclose(schedule.snr(torch.from_numpy(t)).numpy(), np.exp(-gamma), rtol=1e-12)
    assert list(schedule.parameters()) == []  # fixed


def test_linear_schedule_endpoints_fixed_or_learned():
    fixed = NoiseSchedule(schedule_type="linear", gamma_min=-5.0, gamma_max=3.0)
    assert list(fixed.parameters()) == []
    torch.testing.assert_close(fixed(torch.tensor([0.25], dtype=F64)), torch.tensor([-3.0], dtype=F64))
    learned = NoiseSchedule(schedule_type="linear", learn_endpoints=True)
    assert sorted(name for name, _ in learned.named_parameters()) == ["gamma_0", "gamma_1"]
    with pytest.raises(ValueError, match="schedule_type"):
        NoiseSchedule(schedule_type="sigmoid")
    with pytest.raises(ValueError, match="below"):
        NoiseSchedule(gamma_min=1.0, gamma_max=0.0)


@pytest.mark.parametrize("schedule_type", ["learned", "linear", "cosine"])
def test_noise_schedule_save_pretrained_round_trip(schedule_type, tmp_path):
    schedule = (
        random_learned_schedule(seed=3)
        if schedule_type == "learned"
        else NoiseSchedule(schedule_type=schedule_type, gamma_min=-9.0, gamma_max=4.0)
    )
    schedule.save_pretrained(tmp_path)
    loaded = NoiseSchedule.from_pretrained(tmp_path)
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(schedule.config)
    t = torch.linspace(0, 1, 17, dtype=F64)
    torch.testing.assert_close(loaded(t).detach(), schedule(t).detach(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ bound
def test_zero_model_diffusion_term_is_d_times_gamma_range_over_two():
    gamma_min, gamma_max = f32(-13.3), 5.0
    schedule = NoiseSchedule(schedule_type="linear", gamma_min=gamma_min, gamma_max=gamma_max)
    x, noise = on_grid(4000, 1, 2, 2), randn(4000, 1, 2, 2, seed=1)
    t = low_discrepancy_times(4000, torch.Generator().manual_seed(2), dtype=F64)
    loss = continuous_diffusion_loss(schedule, zero_model, x, t, noise)
    # exactly, sample by sample: 1/2 gamma' ||eps||^2, whose expectation is D (gamma_max - gamma_min) / 2
    torch.testing.assert_close(loss, 0.5 * (gamma_max - gamma_min) * noise.pow(2).sum((1, 2, 3)), rtol=1e-13, atol=0)
    expected = 4 * (gamma_max - gamma_min) / 2
    standard_error = loss.std().item() / math.sqrt(4000)
    assert abs(loss.mean().item() - expected) < 4 * standard_error
    assert standard_error < 0.02 * expected


def test_oracle_has_zero_diffusion_term_and_the_prior_is_the_gaussian_kl():
    schedule = random_learned_schedule(gamma_max=2.0)
    x, noise = on_grid(3, 1, 3, 3), randn(3, 1, 3, 3, seed=4)
    t = torch.tensor([0.0, 0.4, 0.97], dtype=F64)
    assert continuous_diffusion_loss(schedule, oracle_model(schedule, x), x, t, noise).abs().max() < 1e-12
    grid_t = torch.tensor([0.1, 0.5, 1.0], dtype=F64)
    discrete = discrete_diffusion_loss(schedule, oracle_model(schedule, x), x, grid_t, noise, 10)
    assert discrete.abs().max() < 1e-12
    # KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) by hand, gamma(1) = 2
    alpha2, sigma2 = expit(-2.0), expit(2.0)
    kl = 0.5 * (alpha2 * x.numpy() ** 2 + sigma2 - 1 - np.log(sigma2)).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(prior_loss(schedule, x).detach().numpy(), kl, rtol=1e-12)


def test_discrete_loss_is_the_snr_form_and_needs_the_grid():
    schedule = NoiseSchedule(schedule_type="cosine")
    x, noise = on_grid(2, 1, 2, 2), randn(2, 1, 2, 2, seed=5)
    t = torch.tensor([0.25, 1.0], dtype=F64)
    model_fn = lambda z, t: 0.3 * z  # noqa: E731
    loss = discrete_diffusion_loss(schedule, model_fn, x, t, noise, 4)
    # T/2 (SNR(s) - SNR(t)) ||x - x_hat||^2 with x_hat = (z_t - sigma_t eps_hat) / alpha_t
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
    z_t = alpha * x + sigma * noise
    x_hat = (z_t - sigma * model_fn(z_t, t)) / alpha
    snr_gap = schedule.snr(t - 0.25) - schedule.snr(t)
    torch.testing.assert_close(loss, 2.0 * snr_gap * (x - x_hat).pow(2).sum((1, 2, 3)), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="grid"):
        discrete_diffusion_loss(schedule, model_fn, x, torch.tensor([0.3, 1.0]), noise, 4)
    with pytest.raises(ValueError, match="grid"):
        discrete_diffusion_loss(schedule, model_fn, x, torch.tensor([0.0, 1.0]), noise, 4)


def test_discrete_loss_decreases_to_the_continuous_one_for_a_half_oracle():
    """eps_hat = eps / 2: ||eps - eps_hat||^2 = ||eps||^2 / 4 at every t, so L_inf = (gamma_1 - gamma_0) ||eps||^2 / 8
    for any schedule, and L_T = 1/8 sum_i expm1(gamma(i/T) - gamma((i-1)/T)) ||eps||^2 >= L_inf."""
    schedule = random_learned_schedule()
    x, noise = on_grid(1, 1, 2, 2), randn(1, 1, 2, 2, seed=6)
    continuous = 18.3 / 8 * noise.pow(2).sum().item()
    gaps = []
    for num_steps in (1, 2, 4, 8, 16, 64, 256, 1024):
        t = torch.arange(1, num_steps + 1, dtype=F64) / num_steps
        xs, noises = x.expand(num_steps, -1, -1, -1), noise.expand(num_steps, -1, -1, -1)
        discrete = discrete_diffusion_loss(schedule, oracle_model(schedule, xs, 0.5), xs, t, noises, num_steps)
        gaps.append(discrete.mean().item() - continuous)
        gamma = schedule(torch.arange(num_steps + 1, dtype=F64) / num_steps).detach()
        expected = torch.expm1(gamma.diff()).sum().item() / 8 * noise.pow(2).sum().item()
        assert discrete.mean().item() == pytest.approx(expected, rel=1e-10)
    assert all(gap > 0 for gap in gaps) and all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] * 1024 < gaps[-2] * 256 and gaps[-1] < 0.02 * continuous  # first order in 1/T


def exact_moment_noise(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Noise with ||eps||^2 = D and <eps, x> = 0 for each image: for eps_hat = c z_t,
    ||eps - eps_hat||^2 = (1 - c sigma_t)^2 ||eps||^2 - 2 c alpha_t (1 - c sigma_t) <eps, x> + c^2 alpha_t^2 ||x||^2
    then equals its expectation D (1 - c sigma_t)^2 + c^2 alpha_t^2 ||x||^2."""
    flat_x, eps = x.reshape(x.shape[0], -1), randn(*x.shape, seed=seed).reshape(x.shape[0], -1)
    eps = eps - (eps * flat_x).sum(1, keepdim=True) / flat_x.pow(2).sum(1, keepdim=True) * flat_x
    return (eps * math.sqrt(eps.shape[1]) / eps.norm(dim=1, keepdim=True)).reshape(x.shape)


def test_discrete_bound_of_a_linear_model_decreases_in_t_to_the_continuous_integral():
    gamma_min, gamma_max, c = -10.0, 6.0, 0.5
    schedule = NoiseSchedule(schedule_type="cosine", gamma_min=gamma_min, gamma_max=gamma_max)
    x = on_grid(1, 1, 2, 2, seed=7)
    noise = exact_moment_noise(x, seed=8)
    model_fn = lambda z, t: c * z  # noqa: E731
    dims, x_norm2 = 4, x.pow(2).sum().item()

    def integrand(time: float) -> float:
        t = torch.tensor([time], dtype=F64)
        return continuous_diffusion_loss(schedule, model_fn, x, t, noise).item()

    by_code = integrate.quad(integrand, 0, 1, limit=200, epsabs=1e-11, epsrel=1e-11)[0]
    # independently, in gamma: L_inf = int 1/2 E||eps - eps_hat||^2 d gamma, sigma^2 = sigmoid(gamma)
    by_hand = integrate.quad(
        lambda g: 0.5 * (dims * (1 - c * math.sqrt(expit(g))) ** 2 + c**2 * expit(-g) * x_norm2), gamma_min, gamma_max
    )[0]
    assert by_code == pytest.approx(by_hand, rel=1e-9)
    bounds = []
    for num_steps in (1, 2, 4, 8, 32, 128, 512, 2048):
        t = torch.arange(1, num_steps + 1, dtype=F64) / num_steps
        xs, noises = x.expand(num_steps, -1, -1, -1), noise.expand(num_steps, -1, -1, -1)
        bounds.append(discrete_diffusion_loss(schedule, model_fn, xs, t, noises, num_steps).mean().item())
    gaps = [bound - by_hand for bound in bounds]
    assert all(gap > 0 for gap in gaps) and all(a > b for a, b in zip(gaps, gaps[1:]))  # L_T > L_2T > L_inf
    assert gaps[-1] * 2048 < gaps[-2] * 512 and gaps[-1] < 0.03 * by_hand  # first order in 1/T


def test_decoder_is_a_distribution_over_256_values_and_matches_vdm_by_hand():
    z_0 = 1.2 * randn(2, 1, 3, 3, seed=9)
    for gamma_0 in (-13.3, -5.0, 0.0, 3.0):
        log_probs = decoder_log_probs(z_0, torch.tensor(gamma_0, dtype=F64))
        assert log_probs.shape == (2, 1, 3, 3, 256)
        torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 1, 3, 3, dtype=F64), rtol=0, atol=1e-12)
        alpha_0, sigma_0 = math.sqrt(expit(-gamma_0)), math.sqrt(expit(gamma_0))
        logits = -0.5 * ((z_0.numpy()[..., None] / alpha_0 - GRID) / (sigma_0 / alpha_0)) ** 2
        np.testing.assert_allclose(log_probs.numpy(), log_softmax(logits, axis=-1), rtol=1e-10, atol=1e-10)


def test_reconstruction_loss_reads_the_decoder_at_the_pixel_values():
    schedule = NoiseSchedule(schedule_type="linear", gamma_min=-6.0, gamma_max=5.0)
    x, noise = on_grid(2, 1, 3, 3, seed=10), randn(2, 1, 3, 3, seed=11)
    alpha_0, sigma_0 = math.sqrt(expit(6.0)), math.sqrt(expit(-6.0))
    z_0 = alpha_0 * x.numpy() + sigma_0 * noise.numpy()
    log_p = log_softmax(-0.5 * ((z_0[..., None] / alpha_0 - GRID) * alpha_0 / sigma_0) ** 2, axis=-1)
    index = np.rint((x.numpy() + 1) * 127.5).astype(int)
    expected = -np.take_along_axis(log_p, index[..., None], axis=-1).sum(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(reconstruction_loss(schedule, x, noise).numpy(), expected, rtol=1e-10)
    assert expected.min() > 0.1  # gamma_0 = -6 leaves real uncertainty between neighbouring values
    sharp = NoiseSchedule(schedule_type="linear")  # gamma_0 = -13.3: the decoder is almost exact
    assert reconstruction_loss(sharp, x, noise).max() < 0.05
    with pytest.raises(ValueError, match="grid"):
        reconstruction_loss(schedule, x + 1e-2, noise)


def test_low_discrepancy_times_are_evenly_spread_and_reproducible():
    t = low_discrepancy_times(8, torch.Generator().manual_seed(0), dtype=F64)
    assert t.shape == (8,) and (t >= 0).all() and (t < 1).all()
    torch.testing.assert_close(t.sort().values.diff(), torch.full((7,), 1 / 8, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(t, low_discrepancy_times(8, torch.Generator().manual_seed(0), dtype=F64))


def test_loss_terms_units_and_training_objective():
    schedule = random_learned_schedule()
    x = on_grid(512, 1, 2, 2, seed=12)
    terms = vdm_loss_terms(schedule, zero_model, x, torch.Generator().manual_seed(13))
    torch.testing.assert_close(terms.total, terms.prior + terms.diffusion + terms.reconstruction)
    # eps_hat = 0: E[1/2 gamma'(t) ||eps||^2] = D (gamma_1 - gamma_0) / 2 for any schedule
    standard_error = terms.diffusion.std().item() / math.sqrt(512)
    assert abs(terms.diffusion.mean().item() - 2 * 18.3) < 4 * standard_error
    terms.total.mean().backward()
    assert schedule.gamma_0.grad.abs() > 0 and schedule.l2.weight.grad.abs().sum() > 0
    bits = terms.in_bits_per_dim(4)
    assert isinstance(bits, VDMLossTerms)
    torch.testing.assert_close(bits.total, terms.total / (4 * math.log(2.0)))
    linear = NoiseSchedule(schedule_type="linear")
    with torch.no_grad():
        discrete = vdm_loss_terms(linear, zero_model, x, torch.Generator().manual_seed(14), num_steps=3)
    expected = 2 * 3 * math.expm1(18.3 / 3)  # T/2 expm1(gamma range / T) E||eps||^2
    assert abs(discrete.diffusion.mean().item() - expected) < 4 * discrete.diffusion.std().item() / math.sqrt(512)


def test_continuous_estimate_matches_a_fine_exact_discrete_sum():
    schedule = random_learned_schedule(seed=1)
    x = on_grid(3, 1, 2, 2, seed=15)
    weights = torch.eye(4, dtype=F64) * 0.6 + 0.2 * randn(4, 4, seed=16)
    model_fn = lambda z, t: (z.reshape(-1, 4) @ weights).reshape(z.shape) * (1 - 0.3 * t.reshape(-1, 1, 1, 1))  # noqa
    with torch.no_grad():
        estimate = continuous_time_bound_estimate(schedule, model_fn, x, 400, torch.Generator().manual_seed(17))
        exact = discrete_time_bound(schedule, model_fn, x, 2000, torch.Generator().manual_seed(18))
    torch.testing.assert_close(estimate.terms.prior, exact.prior, rtol=1e-12, atol=0)
    assert (estimate.standard_error > 0).all() and (estimate.standard_error < 0.1 * estimate.terms.total).all()
    difference = (estimate.terms.total - exact.total).abs()
    assert (difference < 4 * estimate.standard_error).all(), (difference, estimate.standard_error)


@pytest.mark.parametrize("width", [2, 3, 7])
def test_both_bounds_are_the_same_with_draws_evaluated_together(width):
    """discrete_time_bound and continuous_time_bound_estimate with m steps or draws per network call (a GPU's
    width) give the terms of one call per step or draw: the same noise in the same order, m x B images a call."""
    schedule = random_learned_schedule(seed=2)
    x = on_grid(3, 1, 2, 2, seed=19)
    weights = torch.eye(4, dtype=F64) * 0.6 + 0.2 * randn(4, 4, seed=20)
    widths = []

    def model_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # each image alone: no batch effect
        widths.append(len(z))
        return (z.reshape(-1, 4) @ weights).reshape(z.shape) * (1 - 0.3 * t.reshape(-1, 1, 1, 1))

    with torch.no_grad():
        one = discrete_time_bound(schedule, model_fn, x, 10, torch.Generator().manual_seed(21))
        one_estimate = continuous_time_bound_estimate(schedule, model_fn, x, 5, torch.Generator().manual_seed(22))
        widths.clear()
        many = discrete_time_bound(schedule, model_fn, x, 10, torch.Generator().manual_seed(21), width)
        many_estimate = continuous_time_bound_estimate(
            schedule, model_fn, x, 5, torch.Generator().manual_seed(22), width
        )
    calls = [3 * min(width, 10 - start) for start in range(0, 10, width)]
    assert widths == calls + [3 * min(width, 5 - start) for start in range(0, 5, width)]
    for part in ("prior", "diffusion", "reconstruction"):
        torch.testing.assert_close(getattr(many, part), getattr(one, part), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            getattr(many_estimate.terms, part), getattr(one_estimate.terms, part), rtol=1e-12, atol=0
        )
    torch.testing.assert_close(many_estimate.standard_error, one_estimate.standard_error, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------- clipped data estimate
def test_the_clipped_estimate_is_clip_of_x_hat_and_keeps_eps_hat_inside_the_range():
    gamma = torch.tensor([-8.0, -1.0, 0.5, 4.0], dtype=F64).reshape(4, 1, 1, 1)
    z_t, eps_hat = randn(4, 1, 5, 5, seed=40), 3.0 * randn(4, 1, 5, 5, seed=41)
    alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
    x_hat = (z_t - sigma * eps_hat) / alpha
    inside = x_hat.abs() <= 1
    assert inside.any() and (~inside).any()
    eps_tilde = epsilon_of_clipped_estimate(z_t, eps_hat, gamma)
    torch.testing.assert_close((z_t - sigma * eps_tilde) / alpha, x_hat.clamp(-1, 1), rtol=0, atol=1e-12)
    assert torch.equal(eps_tilde[inside], eps_hat[inside])


@pytest.mark.parametrize("schedule_type", ["linear", "learned"])
def test_the_clipped_diffusion_loss_is_the_x_space_formula_with_the_clipped_estimate(schedule_type):
    # an independent form: 1/2 gamma'(t) ||eps - eps~||^2 = 1/2 gamma'(t) e^(-gamma(t)) ||x - clip(x_hat)||^2
    schedule = NoiseSchedule(schedule_type="linear") if schedule_type == "linear" else random_learned_schedule()
    x, noise = on_grid(5, 1, 4, 4, seed=42), randn(5, 1, 4, 4, seed=43)
    t = torch.tensor([0.02, 0.2, 0.5, 0.8, 0.97], dtype=F64)
    model_fn = oracle_model(schedule, x, scale=2.5)  # eps_hat far from eps: x_hat leaves [-1, 1]
    with torch.no_grad():
        clipped = continuous_diffusion_loss(schedule, clipped_estimate_model(schedule, model_fn), x, t, noise)
        unclipped = continuous_diffusion_loss(schedule, model_fn, x, t, noise)
        oracle = clipped_estimate_model(schedule, oracle_model(schedule, x))
        assert continuous_diffusion_loss(schedule, oracle, x, t, noise).abs().max() < 1e-18
        gamma, derivative = schedule.gamma_and_derivative(t)
    alpha, sigma = (value.reshape(-1, 1, 1, 1) for value in schedule.alpha_sigma(t))
    z_t = alpha * x + sigma * noise
    x_hat = (z_t - sigma * model_fn(z_t, t)) / alpha
    by_hand = 0.5 * derivative * torch.exp(-gamma) * ((x - x_hat.clamp(-1, 1)) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(clipped, by_hand, rtol=1e-9, atol=1e-12)
    assert (clipped <= unclipped).all() and (clipped < unclipped).any()


# -------------------------------------------------------------------------------------------- scheduler
def posterior(schedule: NoiseSchedule, x: torch.Tensor, z_t: torch.Tensor, t: float, s: float):
    """Mean and variance of q(z_s | z_t, x) in closed form."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = (schedule.alpha_sigma(torch.tensor([v], dtype=F64)) for v in (t, s))
    alpha_ts = alpha_t / alpha_s
    sigma2_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    mean = alpha_ts * sigma_s**2 / sigma_t**2 * z_t + alpha_s * sigma2_ts / sigma_t**2 * x
    return mean, (sigma2_ts * sigma_s**2 / sigma_t**2).item()


@pytest.mark.parametrize("num_steps", [1, 2, 7, 50])
def test_set_timesteps_gives_n_descending_continuous_times(num_steps):
    schedule = random_learned_schedule()
    scheduler = VDMContinuousScheduler()
    scheduler.set_timesteps(num_steps, noise_schedule=schedule)
    assert len(scheduler.timesteps) == num_steps and scheduler.timesteps.dtype == torch.float32
    expected = torch.arange(num_steps, 0, -1, dtype=F64) / num_steps
    torch.testing.assert_close(scheduler.timesteps.double(), expected, rtol=1e-7, atol=0)
    grid = torch.arange(num_steps + 1, dtype=F64) / num_steps
    torch.testing.assert_close(scheduler.gammas, schedule(grid).detach(), rtol=0, atol=0)


def test_ancestral_step_is_the_posterior_at_the_oracle_and_uses_the_generator():
    schedule = random_learned_schedule(gamma_max=4.0)
    scheduler = VDMContinuousScheduler(step_type="ancestral")
    scheduler.set_timesteps(5, noise_schedule=schedule)
    x, eps = on_grid(2, 1, 2, 2, seed=19), randn(2, 1, 2, 2, seed=20)
    for t in scheduler.timesteps[:-1]:
        z_t = scheduler.add_noise(x, eps, t)
        alpha, sigma = schedule.alpha_sigma(torch.tensor([round(5 * t.item()) / 5], dtype=F64))
        torch.testing.assert_close(z_t, alpha * x + sigma * eps, rtol=1e-12, atol=1e-12)
        eps_hat = oracle_model(schedule, x, grid=5)(z_t, t)
        mean, variance = scheduler.p_mean_variance(eps_hat, t, z_t)
        i = round(5 * t.item())
        expected_mean, expected_variance = posterior(schedule, x, z_t, i / 5, (i - 1) / 5)
        torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
        assert variance == pytest.approx(expected_variance, rel=1e-10)
        step = scheduler.step(eps_hat, t, z_t, generator=torch.Generator().manual_seed(21))
        noise = torch.randn(z_t.shape, generator=torch.Generator().manual_seed(21), dtype=F64)
        torch.testing.assert_close(step.prev_sample, mean + math.sqrt(variance) * noise, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(step.pred_original_sample, x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("step_type", ["ancestral", "ddim"])
def test_clip_sample_steps_from_the_clipped_estimate(step_type):
    schedule = random_learned_schedule(gamma_max=4.0)
    clipping, plain = (VDMContinuousScheduler(step_type=step_type, clip_sample=clip) for clip in (True, False))
    for scheduler in (clipping, plain):
        scheduler.set_timesteps(5, noise_schedule=schedule)
    assert VDMContinuousScheduler().config.clip_sample  # the default, as diffusers' DDPMScheduler
    x, eps = on_grid(2, 1, 3, 3, seed=44), randn(2, 1, 3, 3, seed=45)
    t = clipping.timesteps[2]  # 3/5 -> 2/5
    z_t = clipping.add_noise(x, eps, t)
    eps_hat = oracle_model(schedule, x, scale=3.0, grid=5)(z_t, t)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([0.6], dtype=F64))
    x_hat = (z_t - sigma * eps_hat) / alpha
    assert (x_hat.abs() > 1).any()
    out = clipping.step(eps_hat, t, z_t, generator=torch.Generator().manual_seed(46))
    torch.testing.assert_close(out.pred_original_sample, x_hat.clamp(-1, 1), rtol=0, atol=1e-12)
    if step_type == "ancestral":  # q(z_s | z_t, x = clip(x_hat)) in closed form
        mean, variance = posterior(schedule, x_hat.clamp(-1, 1), z_t, 0.6, 0.4)
        noise = torch.randn(z_t.shape, generator=torch.Generator().manual_seed(46), dtype=F64)
        expected = mean + math.sqrt(variance) * noise
    else:  # z_s = alpha_s clip(x_hat) + sigma_s eps~, eps~ the noise that clip(x_hat) implies
        alpha_s, sigma_s = schedule.alpha_sigma(torch.tensor([0.4], dtype=F64))
        expected = alpha_s * x_hat.clamp(-1, 1) + sigma_s * (z_t - alpha * x_hat.clamp(-1, 1)) / sigma
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-10, atol=1e-12)
    unclipped = plain.step(eps_hat, t, z_t, generator=torch.Generator().manual_seed(46))
    torch.testing.assert_close(unclipped.pred_original_sample, x_hat, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(unclipped.prev_sample, out.prev_sample)


@pytest.mark.parametrize("step_type", ["ancestral", "ddim"])
def test_sampling_with_the_oracle_recovers_x(step_type):
    schedule = random_learned_schedule()
    scheduler = VDMContinuousScheduler(step_type=step_type)
    scheduler.set_timesteps(10, noise_schedule=schedule)
    x = on_grid(2, 1, 3, 3, seed=22)
    sample = randn(2, 1, 3, 3, seed=23) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(24)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        eps_hat = oracle_model(schedule, x, grid=10)(model_input, t)
        sample = scheduler.step(eps_hat, t, sample, generator=generator).prev_sample
    torch.testing.assert_close(sample, x, rtol=0, atol=1e-12)


def test_ddim_step_is_deterministic_and_keeps_the_oracle_noise():
    schedule = NoiseSchedule(schedule_type="cosine")
    scheduler = VDMContinuousScheduler(step_type="ddim")
    scheduler.set_timesteps(4, noise_schedule=schedule)
    x, eps = on_grid(2, 1, 2, 2, seed=25), randn(2, 1, 2, 2, seed=26)
    t = scheduler.timesteps[1]  # 3/4 -> 1/2
    z_t = scheduler.add_noise(x, eps, t)
    eps_hat = oracle_model(schedule, x, grid=4)(z_t, t)
    steps = [scheduler.step(eps_hat, t, z_t, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    torch.testing.assert_close(steps[0].prev_sample, steps[1].prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(steps[0].prev_sample, scheduler.add_noise(x, eps, 0.5), rtol=1e-12, atol=1e-12)


def test_last_step_returns_the_clipped_prediction():
    schedule = NoiseSchedule(schedule_type="linear")
    scheduler = VDMContinuousScheduler(clip_sample=False)  # the last step clips even so
    scheduler.set_timesteps(3, noise_schedule=schedule)
    z_t = torch.full((1, 1, 2, 2), 0.5, dtype=F64)
    eps_hat = torch.tensor([-400.0, 0.0, 1.0, 400.0], dtype=F64).reshape(1, 1, 2, 2)
    output = scheduler.step(eps_hat, scheduler.timesteps[-1], z_t, return_dict=False)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([1 / 3], dtype=F64))
    x_hat = (z_t - sigma * eps_hat) / alpha
    torch.testing.assert_close(output[1], x_hat, rtol=1e-12, atol=0)
    torch.testing.assert_close(output[0], x_hat.clamp(-1, 1), rtol=1e-12, atol=0)
    assert output[0].max() == 1.0 and output[0].min() == -1.0


def test_scheduler_config_round_trip_and_errors(tmp_path):
    scheduler = VDMContinuousScheduler(step_type="ddim")
    scheduler.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert config["step_type"] == "ddim" and config["_class_name"] == "VDMContinuousScheduler"
    loaded = VDMContinuousScheduler.from_pretrained(tmp_path)
    assert loaded.config.step_type == "ddim" and loaded.init_noise_sigma == 1.0
    with pytest.raises(ValueError, match="set_timesteps"):
        loaded.step(torch.zeros(1, 1, 2, 2), 1.0, torch.zeros(1, 1, 2, 2))
    loaded.set_timesteps(4, noise_schedule=NoiseSchedule(schedule_type="linear"))
    with pytest.raises(ValueError, match="grid"):
        loaded.step(torch.zeros(1, 1, 2, 2), 0.3, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="step_type"):
        VDMContinuousScheduler(step_type="euler")


# ------------------------------------------------------------------------------------------------ network
def test_fourier_features_mirror_vdm_and_the_unet_takes_continuous_times():
    x = on_grid(2, 2, 3, 3, seed=27)
    features = base2_fourier_features(x, (7, 8))
    assert features.shape == (2, 8, 3, 3)
    # VDM: w = 2^k 2 pi for k = 6, 7, inputs repeated channel by channel, sines then cosines
    angles = np.concatenate([x.numpy()[:, c : c + 1] * 2.0**k * 2 * np.pi for c in range(2) for k in (6, 7)], axis=1)
    np.testing.assert_allclose(features.numpy(), np.concatenate([np.sin(angles), np.cos(angles)], axis=1), atol=1e-9)
    tiny = dict(sample_size=4, in_channels=2, learn_variance=False, block_out_channels=(8, 8))
    torch.manual_seed(0)
    plain = DenoisingUNet(**tiny)
    torch.manual_seed(0)
    empty = DenoisingUNet(**tiny, fourier_features=())
    for (name, a), (_, b) in zip(plain.state_dict().items(), empty.state_dict().items()):
        assert torch.equal(a, b), name
    unet = DenoisingUNet(**tiny, fourier_features=(7, 8))
    assert unet.conv_in.in_channels == 10
    t = torch.tensor([0.25, 0.9])
    out = unet(torch.randn(2, 2, 4, 4), 1000 * t).sample
    assert out.shape == (2, 2, 4, 4)
