"""The probability-flow ODE's log-likelihood against answers known in closed form.

With Gaussian data N(mu, s^2 I) the forward marginal is p_t = N(alpha_t mu, v_t I), v_t = alpha_t^2 s^2 + sigma_t^2,
its score is -(x_t - alpha_t mu) / v_t, so the optimal eps-model (eps = -sigma_t score) is

    eps*(x_t, t) = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2),

the ODE is linear, its flow keeps (x_t - alpha_t mu) / sqrt(v_t) constant, and the log-likelihood it gives x (taken at
t_min, with the exact marginal p_1 as the prior) is log N(x; alpha_{t_min} mu, v_{t_min} I) -> log N(x; mu, s^2 I).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from helpers import REPO, bound_of, on_grid, randomized, tiny_ddpm_pipeline, tiny_vae_pipeline, tiny_vdm_pipeline
from hf_ddpm import (
    DenoisingUNet,
    HFDDPMPipeline,
    HFDDPMScheduler,
    NLLResult,
    NoiseSchedule,
    TrainingReport,
    VDMContinuousScheduler,
    VDMPipeline,
    render_model_card,
)
from hf_ddpm.cli import main
from hf_ddpm.data import ImageTensorDataset, load_images
from hf_ddpm.ddpm.chain import DiffusionChain
from hf_ddpm.distributions import gaussian_log_density, sum_over_pixels
from hf_ddpm.evaluation import BoundOptions, evaluate_bound
from hf_ddpm.probability_flow import (
    EIGHT_BIT_BIN_WIDTH,
    InterpolatedGamma,
    bin_truncation,
    dequantized_bits_per_dim,
    dormand_prince,
    epsilon_from_prediction,
    exact_divergence,
    fixed_step_dormand_prince,
    gamma_rate_by_autograd,
    hutchinson_divergence,
    ode_log_likelihood,
    sample_probes,
    standard_normal_log_density,
    truncated_normal_dequantize,
    truncated_normal_dequantized_bits_per_dim,
    truncated_normal_entropy,
    truncated_normal_log_normalizer,
    uniform_dequantize,
)
from olah_server import run_python

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 2, 3)  # D = 6
MU = torch.linspace(-0.6, 0.5, 6, dtype=torch.float64).reshape(SHAPE)
S = 0.3


def alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def marginal(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of p_t for data N(MU, S^2 I): (alpha_t MU, alpha_t^2 S^2 + sigma_t^2)."""
    alpha, sigma = alpha_sigma(gamma)
    return alpha * MU, alpha**2 * S**2 + sigma**2


def gaussian_oracle(gamma_fn):
    """The optimal eps-model of Gaussian data under the schedule gamma_fn."""

    def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gamma = gamma_fn(t).reshape(-1, 1, 1, 1)
        alpha, sigma = alpha_sigma(gamma)
        return sigma * (x_t - alpha * MU) / (alpha**2 * S**2 + sigma**2)

    return eps_model


def marginal_log_density(gamma: torch.Tensor):
    """x -> log N(x; alpha_t MU, v_t I) per image, at the gamma of one time."""
    mean, variance = marginal(gamma)
    return lambda x: sum_over_pixels(gaussian_log_density(x, mean.expand_as(x), variance.log().expand_as(x)))


def points(n: int = 3, seed: int = 0) -> torch.Tensor:
    return MU + S * torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def vdm_gamma(schedule_type: str):
    schedule = NoiseSchedule(schedule_type, gamma_min=-13.3, gamma_max=5.0)
    return schedule.gamma, lambda t: schedule.gamma_and_derivative(t)[1]


def ddpm_gamma() -> InterpolatedGamma:
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    return InterpolatedGamma.from_alphas_cumprod(DiffusionChain.from_config(config).train_alphas_cumprod)


SCHEDULES = {
    "vdm-linear": lambda: (*vdm_gamma("linear"), 0.0),
    "vdm-cosine": lambda: (*vdm_gamma("cosine"), 0.0),
    "ddpm-linear": lambda: (ddpm_gamma(), ddpm_gamma().derivative, 1e-3),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_exact_trace_log_likelihood_of_gaussian_data_is_the_gaussian_log_density(name):
    gamma, rate, t_min = SCHEDULES[name]()
    x = points()
    ends = gamma(torch.tensor([t_min, 1.0], dtype=torch.float64))
    out = ode_log_likelihood(
        x,
        gaussian_oracle(gamma),
        gamma,
        rate,
        t_min=t_min,
        divergence="exact",
        rtol=1e-8,
        atol=1e-8,
        prior_log_density=marginal_log_density(ends[1]),
    )
    expected = marginal_log_density(ends[0])(x)
    torch.testing.assert_close(out.log_likelihood, expected, rtol=0, atol=1e-5)
    # the flow keeps the standardized point fixed: x_1 = alpha_1 mu + sqrt(v_1 / v_min) (x - alpha_min mu)
    (m0, v0), (m1, v1) = marginal(ends[0]), marginal(ends[1])
    torch.testing.assert_close(out.latent, m1 + (v1 / v0).sqrt() * (x - m0), rtol=0, atol=1e-5)
    # at t_min, p_t is within sigma_{t_min} of the data distribution N(mu, s^2 I)
    data_log_density = sum_over_pixels(gaussian_log_density(x, MU.expand_as(x), torch.full_like(x, 2 * math.log(S))))
    assert (out.log_likelihood - data_log_density).abs().max() < 0.05


def test_the_standard_normal_prior_differs_from_the_exact_marginal_by_their_log_ratio_at_the_end_point():
    gamma, rate = vdm_gamma("linear")
    x = points()
    out = ode_log_likelihood(x, gaussian_oracle(gamma), gamma, rate, divergence="exact", rtol=1e-8, atol=1e-8)
    exact_prior = marginal_log_density(gamma(torch.tensor(1.0, dtype=torch.float64)))(out.latent)
    torch.testing.assert_close(out.prior_log_density, standard_normal_log_density(out.latent))
    expected = marginal_log_density(gamma(torch.tensor(0.0, dtype=torch.float64)))(x)
    torch.testing.assert_close(out.log_likelihood - out.prior_log_density + exact_prior, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["vdm-cosine", "ddpm-linear"])
def test_hutchinson_log_likelihood_of_gaussian_data_is_within_its_standard_error(name):
    gamma, rate, t_min = SCHEDULES[name]()
    x = points(2)
    ends = gamma(torch.tensor([t_min, 1.0], dtype=torch.float64))
    common = dict(t_min=t_min, rtol=1e-6, atol=1e-6, prior_log_density=marginal_log_density(ends[1]))
    generator = torch.Generator().manual_seed(0)
    gaussian = ode_log_likelihood(
        x, gaussian_oracle(gamma), gamma, rate, probes=64, probe_kind="gaussian", generator=generator, **common
    )
    expected = marginal_log_density(ends[0])(x)
    error = (gaussian.log_likelihood - expected).abs()
    assert (gaussian.probe_standard_error > 0.05).all()  # Gaussian probes do vary: the test is not vacuous
    assert (error < 4 * gaussian.probe_standard_error).all(), (error, gaussian.probe_standard_error)
    # a Rademacher probe has v^T v = D: on the oracle's isotropic Jacobian every probe gives the exact trace, so
    # the solver takes the exact-trace solve's steps and lands on its numbers
    rademacher = ode_log_likelihood(x, gaussian_oracle(gamma), gamma, rate, probes=2, generator=generator, **common)
    exact = ode_log_likelihood(x, gaussian_oracle(gamma), gamma, rate, divergence="exact", **common)
    torch.testing.assert_close(rademacher.divergence_integral, exact.divergence_integral.expand(-1, 2))
    torch.testing.assert_close(rademacher.log_likelihood, expected, rtol=0, atol=5e-4)


def small_network(dim: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, dim)).double()


def test_hutchinson_mean_converges_to_the_exact_trace_of_a_small_network():
    network = small_network()
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    output = network(x)
    jacobians = torch.stack([torch.autograd.functional.jacobian(network, row) for row in x.detach()])
    trace = jacobians.diagonal(dim1=1, dim2=2).sum(dim=1)
    torch.testing.assert_close(exact_divergence(output, x), trace)
    generator = torch.Generator().manual_seed(0)
    for kind in ("rademacher", "gaussian"):
        estimates = torch.stack(
            [
                hutchinson_divergence(network(x), x, sample_probes(tuple(x.shape), kind, generator=generator))
                for _ in range(4000)
            ]
        )
        mean, error = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
        assert ((mean - trace).abs() < 4 * error).all(), (kind, mean, trace, error)
        # and its spread is the closed form's: Var = 1/2 sum_{i != j} (J_ij + J_ji)^2 (Rademacher; the diagonal too
        # for Gaussian probes)
        symmetric = jacobians + jacobians.transpose(1, 2)
        if kind == "rademacher":
            symmetric = symmetric - torch.diag_embed(symmetric.diagonal(dim1=1, dim2=2))
        variance = 0.5 * symmetric.pow(2).sum(dim=(1, 2))
        torch.testing.assert_close(estimates.var(0), variance, rtol=0.15, atol=0)


def test_hutchinson_ode_likelihood_of_a_small_network_agrees_with_the_exact_trace():
    network = small_network(6)
    gamma, rate = vdm_gamma("linear")

    def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return network(x_t.reshape(len(x_t), -1)).reshape(x_t.shape)

    x = points(2)
    common = dict(t_min=0.0, rtol=1e-5, atol=1e-5)
    exact = ode_log_likelihood(x, eps_model, gamma, rate, divergence="exact", **common)
    estimate = ode_log_likelihood(
        x, eps_model, gamma, rate, probes=256, generator=torch.Generator().manual_seed(0), **common
    )
    assert ((estimate.log_likelihood - exact.log_likelihood).abs() < 4 * estimate.probe_standard_error).all()
    assert (estimate.probe_standard_error > 0).all()


def test_dequantization_constant_gives_8_bits_per_dim_for_the_uniform_model():
    # the uniform density on the union of the 256 bins, [-1 - 1/255, 1 + 1/255]^D, of side 2 * 256 / 255
    num_dims = 6
    pixels = torch.arange(256, dtype=torch.float64)[torch.randint(0, 256, (4, num_dims))]
    x = pixels / 127.5 - 1.0
    y = uniform_dequantize(x, torch.Generator().manual_seed(0))
    assert ((y - x).abs() <= EIGHT_BIT_BIN_WIDTH / 2).all() and (y != x).all()
    assert (((y + 1.0) * 127.5).round() == pixels).all()  # each y lies in its own pixel's bin
    log_density = torch.full((4,), num_dims * math.log(255.0 / 512.0), dtype=torch.float64)
    torch.testing.assert_close(dequantized_bits_per_dim(log_density, num_dims), torch.full((4,), 8.0).double())


@pytest.mark.parametrize("tau", [0.5, 2.48, 6.0])
def test_truncated_normal_normalizer_and_entropy_match_numerical_integration(tau):
    e = torch.linspace(-tau, tau, 200_001, dtype=torch.float64)
    density = torch.exp(-0.5 * e**2) / math.sqrt(2 * math.pi)
    mass = torch.trapezoid(density, e).item()
    q = density / mass
    entropy = torch.trapezoid(-q * q.log(), e).item()
    assert truncated_normal_log_normalizer(tau) == pytest.approx(math.log(mass), abs=1e-9)
    assert truncated_normal_entropy(tau) == pytest.approx(entropy, abs=1e-8)


def test_truncated_normal_dequantization_keeps_each_point_in_its_bin_with_the_truncated_moments():
    gamma = -12.9  # a trained VDM's gamma(0): sigma_0 = 0.0016, tau = 2.48
    tau = bin_truncation(gamma)
    assert tau == pytest.approx((1 / 255) / math.exp(gamma / 2))
    pixels = torch.randint(0, 256, (2000, 1, 2, 3), generator=torch.Generator().manual_seed(0)).double()
    x = pixels / 127.5 - 1.0
    z = truncated_normal_dequantize(x, gamma, torch.Generator().manual_seed(1))
    alpha, sigma = alpha_sigma(torch.tensor(gamma, dtype=torch.float64))
    assert ((z / alpha + 1.0) * 127.5).round().eq(pixels).all()  # v = z / alpha lies in x's own bin
    e = ((z - alpha * x) / sigma).flatten()
    assert e.abs().max() <= tau + 1e-9
    z_tau = math.exp(truncated_normal_log_normalizer(tau))
    second_moment = 1 - 2 * tau * math.exp(-0.5 * tau**2) / math.sqrt(2 * math.pi) / z_tau
    standard_error = (e**2).std().item() / math.sqrt(e.numel())
    assert abs((e**2).mean().item() - second_moment) < 4 * standard_error
    assert abs(e.mean().item()) < 4 / math.sqrt(e.numel())


def test_truncated_normal_bound_is_the_bins_mass_for_the_point_mass_model():
    # data: one 8-bit image x; its marginal p_t = N(alpha_t x, sigma_t^2 I), eps* = (z - alpha_t x) / sigma_t
    gamma_fn, rate = vdm_gamma("linear")  # gamma(0) = -13.3: tau = 3.0
    x = (torch.tensor([0, 17, 128, 200, 254, 255], dtype=torch.float64) / 127.5 - 1.0).reshape(1, *SHAPE)
    num_dims = x.numel()

    def point_mass_eps(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(gamma_fn(t).reshape(-1, 1, 1, 1))
        return (z_t - alpha * x) / sigma

    def marginal_at(gamma: torch.Tensor):
        alpha, sigma = alpha_sigma(gamma)
        return lambda z: sum_over_pixels(
            gaussian_log_density(z, (alpha * x).expand_as(z), (2 * sigma.log()).expand_as(z))
        )

    ends = gamma_fn(torch.tensor([0.0, 1.0], dtype=torch.float64))
    gamma_0, tau = ends[0].item(), bin_truncation(ends[0].item())
    z = truncated_normal_dequantize(x.expand(4, *SHAPE), gamma_0, torch.Generator().manual_seed(0))
    out = ode_log_likelihood(
        z,
        point_mass_eps,
        gamma_fn,
        rate,
        divergence="exact",
        rtol=1e-9,
        atol=1e-9,
        prior_log_density=marginal_at(ends[1]),
    )
    torch.testing.assert_close(out.log_likelihood, marginal_at(ends[0])(z), rtol=0, atol=1e-5)
    # over many draws the bound is -log2 Z(tau), the exact NLL: the model puts Z(tau)^D of its mass on x's bin
    many = truncated_normal_dequantize(x.expand(50_000, *SHAPE), gamma_0, torch.Generator().manual_seed(1))
    bits = truncated_normal_dequantized_bits_per_dim(marginal_at(ends[0])(many), gamma_0, num_dims)
    exact = -truncated_normal_log_normalizer(tau) / math.log(2)
    assert abs(bits.mean().item() - exact) < 4 * bits.std().item() / math.sqrt(len(bits))
    # the same model under the uniform dequantization: the bin's mass spread evenly, far from where p_0 put it
    y = uniform_dequantize(x.expand(50_000, *SHAPE), torch.Generator().manual_seed(2))
    uniform_bits = dequantized_bits_per_dim(marginal_at(ends[0])(y), num_dims)
    assert uniform_bits.mean().item() > exact + 0.5


def test_dormand_prince_solves_a_known_ode_to_its_tolerance_and_counts_its_evaluations():
    calls = []
    rates = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)

    def fn(t: float, y: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return rates * y + math.cos(t)  # y' = r y + cos t

    def solution(t: float, y0: float, r: torch.Tensor) -> torch.Tensor:
        particular = (r * math.cos(t) - math.sin(t)) / -(r**2 + 1)  # a cos t + b sin t with a = -r/(r^2+1)
        constant = y0 - (-r / (r**2 + 1))
        return constant * torch.exp(r * t) + particular

    y0 = torch.ones(3, 1, dtype=torch.float64)
    result = dormand_prince(fn, y0, 0.0, 2.0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.y, solution(2.0, 1.0, rates), rtol=1e-7, atol=1e-7)
    assert result.nfe == len(calls) == 2 + 6 * (result.accepted + result.rejected)
    loose = dormand_prince(fn, y0, 0.0, 2.0, rtol=1e-4, atol=1e-4)
    assert loose.nfe < result.nfe
    errors = [
        (fixed_step_dormand_prince(fn, y0, 0.0, 2.0, n).y - solution(2.0, 1.0, rates)).abs().max().item()
        for n in (8, 16)
    ]
    assert 20 < errors[0] / errors[1] < 45  # order 5: halving h divides the error by ~2^5 = 32


def test_interpolated_gamma_of_a_chain_hits_its_knots_and_its_rate_matches_autograd():
    config = {"num_train_timesteps": 10, "beta_schedule": "linear", "beta_start": 1e-2, "beta_end": 0.2}
    abar = DiffusionChain.from_config(config).train_alphas_cumprod
    gamma = InterpolatedGamma.from_alphas_cumprod(abar)
    knots = torch.arange(1, 11, dtype=torch.float64) / 10
    torch.testing.assert_close(torch.sigmoid(-gamma(knots)), torch.from_numpy(abar))
    t = torch.tensor([0.1, 0.13, 0.55, 0.999], dtype=torch.float64)
    torch.testing.assert_close(gamma_rate_by_autograd(gamma)(t), gamma.derivative(t))
    with pytest.raises(ValueError, match=r"t must lie in \[0.1, 1.0\]"):
        gamma(torch.tensor([0.05], dtype=torch.float64))
    schedule_gamma, schedule_rate = vdm_gamma("cosine")
    torch.testing.assert_close(gamma_rate_by_autograd(schedule_gamma)(t), schedule_rate(t))


def test_ode_log_likelihood_refuses_bad_options_before_solving():
    gamma, rate = vdm_gamma("linear")
    x = points(1)
    model = gaussian_oracle(gamma)
    for kwargs, message in [
        ({"divergence": "approx"}, "Unknown divergence"),
        ({"method": "euler"}, "Unknown ODE method"),
        ({"t_min": 1.0}, "t_min must lie in"),
        ({"probes": 0}, "probes must be at least 1"),
        ({"probe_kind": "uniform"}, "Unknown probe kind"),
    ]:
        with pytest.raises(ValueError, match=message):
            ode_log_likelihood(x, model, gamma, rate, **kwargs)
    with pytest.raises(
        ValueError, match=r"eps_model returned shape \(1, 2, 2, 3\) for points of shape \(1, 1, 2, 3\)"
    ):
        ode_log_likelihood(x, lambda x_t, t: torch.cat([x_t, x_t], dim=1), gamma, rate)


# ---------------------------------------------------------------------------------------------- the pipelines
def test_epsilon_from_prediction_inverts_each_target():
    gamma = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in alpha_sigma(gamma))
    generator = torch.Generator().manual_seed(0)
    x, eps = (torch.randn((3, *SHAPE), generator=generator, dtype=torch.float64) for _ in range(2))
    x_t = alpha * x + sigma * eps
    for prediction_type, target in [("epsilon", eps), ("sample", x), ("v_prediction", alpha * eps - sigma * x)]:
        torch.testing.assert_close(epsilon_from_prediction(target, x_t, gamma, prediction_type), eps)


def test_the_ddpm_pipelines_flow_is_its_training_chain_at_the_knots():
    pipeline = tiny_ddpm_pipeline()
    flow = pipeline.probability_flow()
    abar = torch.from_numpy(pipeline.train_chain.train_alphas_cumprod)
    steps = len(abar)
    knots = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    torch.testing.assert_close(flow.gamma(knots), torch.log((1 - abar) / abar))
    assert flow.earliest_time == 1 / steps
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in (0, 4, steps - 1):
            times = torch.full((2,), (i + 1) / steps, dtype=torch.float64)
            expected = pipeline.unet(x, torch.full((2,), i)).sample[:, :1]
            torch.testing.assert_close(flow.eps_model(x.double(), times).float(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_ddpm_pipeline, tiny_vdm_pipeline], ids=["ddpm", "vdm"])
def test_evaluate_bound_with_the_ode_estimator_is_the_dequantized_ode_likelihood(make):
    pipeline = make()
    images = on_grid(2, 1, 8, 8)
    options = BoundOptions(estimator="ode", ode_rtol=1e-3, ode_atol=1e-3, hutchinson_probes=2)
    result = evaluate_bound(pipeline, images, options, generator=torch.Generator().manual_seed(5))
    # the same draws, by hand: one dequantization per image, then the probes
    generator = torch.Generator().manual_seed(5)
    flow = pipeline.probability_flow()
    y = uniform_dequantize(images, generator)
    out = ode_log_likelihood(
        y,
        flow.eps_model,
        flow.gamma,
        flow.gamma_rate,
        t_min=flow.earliest_time,
        probes=2,
        rtol=1e-3,
        atol=1e-3,
        generator=generator,
    )
    torch.testing.assert_close(result.per_image, dequantized_bits_per_dim(out.log_likelihood, 64))
    torch.testing.assert_close(result.per_image_terms["dequantization"], torch.full((2,), math.log2(127.5)).double())
    summary = result.to_dict()
    assert summary["ode_nfe"] == out.nfe and "probability-flow ODE" in summary["estimator"]


def test_evaluate_bound_with_the_truncated_normal_dequantization_is_the_bound_by_hand():
    pipeline = tiny_vdm_pipeline()
    images = on_grid(2, 1, 8, 8)
    options = BoundOptions(estimator="ode", ode_rtol=1e-3, ode_atol=1e-3, ode_dequantization="truncated_normal")
    result = evaluate_bound(pipeline, images, options, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    flow = pipeline.probability_flow()
    gamma_0 = flow.gamma(torch.zeros(1, dtype=torch.float64)).item()
    z = truncated_normal_dequantize(images.double(), gamma_0, generator)
    out = ode_log_likelihood(z, flow.eps_model, flow.gamma, flow.gamma_rate, rtol=1e-3, atol=1e-3, generator=generator)
    torch.testing.assert_close(
        result.per_image, truncated_normal_dequantized_bits_per_dim(out.log_likelihood, gamma_0, 64)
    )
    zeros = torch.zeros(2, dtype=torch.float64)
    constant = truncated_normal_dequantized_bits_per_dim(zeros, gamma_0, 64)
    torch.testing.assert_close(result.per_image_terms["dequantization"], constant)
    assert "truncated-normal dequantized" in result.to_dict()["estimator"]


def test_the_ode_estimator_refuses_what_it_cannot_do_before_solving():
    images = on_grid(1, 1, 8, 8)
    with pytest.raises(ValueError, match="needs a diffusion pipeline .* got VAEPipeline"):
        evaluate_bound(tiny_vae_pipeline(), images, BoundOptions(estimator="ode"))
    with pytest.raises(ValueError, match=r"ode_t_min=0.0 is outside \[0.1, 1\)"):
        evaluate_bound(tiny_ddpm_pipeline(), images, BoundOptions(estimator="ode", ode_t_min=0.0))
    with pytest.raises(ValueError, match="estimator='flow' is not one of bound, ode"):
        evaluate_bound(tiny_vdm_pipeline(), images, BoundOptions(estimator="flow"))
    with pytest.raises(ValueError, match="hutchinson_probe='normal' is not one of rademacher, gaussian"):
        evaluate_bound(tiny_vdm_pipeline(), images, BoundOptions(estimator="ode", hutchinson_probe="normal"))
    with pytest.raises(ValueError, match="ode_dequantization='gaussian' is not one of uniform, truncated_normal"):
        evaluate_bound(tiny_vdm_pipeline(), images, BoundOptions(estimator="ode", ode_dequantization="gaussian"))


def saved_tiny_28x28(kind: str, folder):
    """A 28x28 DDPM (T = 20, a learned variance) or VDM (linear schedule) with a tiny random network, saved."""
    torch.manual_seed(0)
    network = DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=(), learn_variance=kind == "ddpm")
    unet = randomized(network, 0)
    if kind == "ddpm":
        pipeline = HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=20))
    else:
        schedule = NoiseSchedule("linear", gamma_min=-6.0, gamma_max=6.0)
        pipeline = VDMPipeline(unet=unet, noise_schedule=schedule, scheduler=VDMContinuousScheduler())
    pipeline.save_pretrained(folder)
    return type(pipeline)


@pytest.mark.parametrize("kind", ["ddpm", "vdm"])
def test_cli_evaluate_with_the_ode_estimator_writes_the_librarys_numbers(kind, tmp_path):
    pipeline_class = saved_tiny_28x28(kind, tmp_path / kind)
    out = tmp_path / "ode.json"
    ode_flags = ["--estimator", "ode", "--ode_rtol", "1e-3", "--ode_atol", "1e-3", "--hutchinson_probes", "2"]
    argv = ["evaluate", str(tmp_path / kind), "--data", "embedded", "--max_images", "2", "--seed", "3", "--json"]
    assert main([*argv, str(out), *ode_flags]) == 0
    result = json.loads(out.read_text())
    pipeline = pipeline_class.from_pretrained(tmp_path / kind)
    images = ImageTensorDataset(load_images(None, split="test", max_images=2).images)[:]
    options = BoundOptions(estimator="ode", ode_rtol=1e-3, ode_atol=1e-3, hutchinson_probes=2)
    expected = evaluate_bound(pipeline, images, options, generator=torch.Generator().manual_seed(3)).to_dict()
    assert set(result) - {"model", "data"} == set(expected) and result["estimator"] == expected["estimator"]
    for key in ("bits_per_dim", "standard_error", "ode_nfe"):
        assert result[key] == pytest.approx(expected[key], rel=1e-9), key
    assert set(result["terms"]) == {"dequantization", "prior", "flow"}


def test_the_card_of_an_ode_result_names_the_estimator_for_its_bits_per_dim():
    bound = bound_of(
        {"flow": -7.1, "prior": 1.2, "dequantization": math.log2(127.5)}, standard_error=0.01, estimator="ODE words"
    )
    bound.per_image_nfe = torch.tensor([98.0, 110.0], dtype=torch.float64)
    report = TrainingReport.for_pipeline(
        tiny_vdm_pipeline(), "org/vdm-mnist", nll=NLLResult(bound, "ylecun/mnist", "MNIST", "test")
    )
    card = render_model_card(report)
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", card.text, flags=re.M))
    assert float(rows["NLL, probability-flow ODE (bits/dim)"]) == pytest.approx(bound.bits_per_dim, abs=5e-5)
    assert rows["ODE function evaluations per batch"] == "104" and "NLL bound (bits/dim)" not in rows
    assert "ODE words" in card.text and "upper bound on the discrete -log2 P(x) / D" in card.text
    names = {result.metric_type: result.metric_name for result in card.data.eval_results}
    assert names["nll"] == "NLL (bits/dim, probability-flow ODE)"


def test_cli_evaluate_with_the_ode_estimator_by_hub_id(hub, pushed, tmp_path):
    flags = ["--estimator", "ode", "--ode_rtol", "1e-3", "--ode_atol", "1e-3", "--json", "ode.json"]
    argv = [
        "evaluate",
        REPO,
        "--revision",
        "main",
        "--data",
        "embedded",
        "--max_images",
        "2",
        "--device",
        "cpu",
        *flags,
    ]
    code = f"import sys\nfrom hf_ddpm.cli import main\nsys.exit(main({argv!r}))\n"
    run_python(code, {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(pushed.hf_home)}, cwd=tmp_path)
    result = json.loads((tmp_path / "ode.json").read_text())
    images = ImageTensorDataset(load_images(None, split="test", max_images=2, resolution=8, channels=1).images)[:]
    options = BoundOptions(estimator="ode", ode_rtol=1e-3, ode_atol=1e-3)
    expected = evaluate_bound(pushed.second, images, options, generator=torch.Generator().manual_seed(0))
    assert result["bits_per_dim"] == pytest.approx(expected.bits_per_dim, rel=1e-9)
    assert result["estimator"] == expected.estimator and result["model"] == REPO
