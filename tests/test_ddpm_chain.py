"""DiffusionChain, the frozen float64 constants of a chain and its closed-form equations, against diffusers'
DDPMScheduler, Monte Carlo, Gaussian conditioning and its own definitions."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import hf_ddpm
from helpers import diffusers_in_float64
from hf_ddpm import HFDDPMScheduler
from hf_ddpm.ddpm.chain import DECODER_MIN_STD, PREDICTION_TYPES, VARIANCE_TYPES, DiffusionChain
from hf_ddpm.ddpm.elbo import reconstruction_term

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULES = [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]
LINEAR_ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def chain_of(scheduler: HFDDPMScheduler, steps: int | None = None, spacing: str = "linspace") -> DiffusionChain:
    """The chain ``scheduler`` samples on after ``set_timesteps(steps)`` (the full chain for None)."""
    if steps:
        scheduler.set_timesteps(steps)
    return scheduler.chain


def timesteps_of(chain: DiffusionChain) -> torch.Tensor:
    """The increasing timesteps of a chain, as a tensor."""
    return torch.from_numpy(chain.timesteps)


# ---------------------------------------------------------------------------------------------- construction
def test_from_alphas_cumprod_builds_the_full_chain_from_its_definitions():
    chain = DiffusionChain.from_alphas_cumprod(
        LINEAR_ABAR, prediction_type="v_prediction", variance_type="learned_range"
    )
    assert chain.is_full and chain.num_train_timesteps == 1000
    assert (chain.prediction_type, chain.variance_type) == ("v_prediction", "learned_range")
    np.testing.assert_array_equal(chain.timesteps, np.arange(1000))
    np.testing.assert_array_equal(chain.positions, np.arange(1000))
    np.testing.assert_array_equal(chain.train_alphas_cumprod, LINEAR_ABAR)
    np.testing.assert_array_equal(chain.alphas_cumprod, LINEAR_ABAR)
    np.testing.assert_allclose(chain.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    abar_prev = np.append(1.0, LINEAR_ABAR[:-1])
    np.testing.assert_array_equal(chain.alphas_cumprod_prev, abar_prev)
    beta_tilde = chain.betas * (1 - abar_prev) / (1 - LINEAR_ABAR)
    np.testing.assert_allclose(chain.posterior_variance, beta_tilde, rtol=1e-15)
    np.testing.assert_allclose(
        chain.posterior_log_variance_clipped, np.log(np.append(beta_tilde[1], beta_tilde[1:])), rtol=1e-15
    )
    np.testing.assert_allclose(
        chain.posterior_mean_coef1, chain.betas * np.sqrt(abar_prev) / (1 - LINEAR_ABAR), rtol=1e-15
    )
    np.testing.assert_allclose(
        chain.posterior_mean_coef2, np.sqrt(1 - chain.betas) * (1 - abar_prev) / (1 - LINEAR_ABAR), rtol=1e-15
    )
    assert chain.train_alphas_cumprod.dtype == chain.betas.dtype == np.float64
    assert hf_ddpm.DiffusionChain is DiffusionChain


def test_respaced_keeps_the_marginals_and_maps_positions():
    full = DiffusionChain.from_alphas_cumprod(LINEAR_ABAR, variance_type="fixed_large")
    sub = full.respaced(np.array([3, 40, 90, 999]))
    assert not sub.is_full and sub.num_train_timesteps == 1000 and sub.variance_type == "fixed_large"
    np.testing.assert_array_equal(sub.train_alphas_cumprod, LINEAR_ABAR)
    np.testing.assert_array_equal(sub.alphas_cumprod, LINEAR_ABAR[[3, 40, 90, 999]])
    np.testing.assert_allclose(
        sub.betas, 1 - LINEAR_ABAR[[3, 40, 90, 999]] / np.array([1.0, *LINEAR_ABAR[[3, 40, 90]]]), rtol=1e-12
    )
    assert (
        sub.positions[[3, 40, 90, 999]].tolist() == [0, 1, 2, 3]
        and (np.delete(sub.positions, [3, 40, 90, 999]) == -1).all()
    )
    assert sub.chain_position(torch.tensor([999, 3, 40])).tolist() == [3, 0, 1]
    again = full.respaced(np.arange(1000))
    for field in dataclasses.fields(DiffusionChain):
        assert np.array_equal(getattr(again, field.name), getattr(full, field.name)), field.name


def test_from_config_is_the_training_chain_of_our_config_and_of_diffusers():
    ours = HFDDPMScheduler(
        num_train_timesteps=300, beta_schedule="cosine", prediction_type="sample", variance_type="learned_range"
    )
    ours.set_timesteps(7)  # the scheduler's sampling chain does not enter the config's chain
    chain = DiffusionChain.from_config(ours.config)
    for field in dataclasses.fields(DiffusionChain):
        assert np.array_equal(getattr(chain, field.name), getattr(ours.train_chain, field.name)), field.name
    theirs = DDPMScheduler(
        num_train_timesteps=300,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        variance_type="fixed_large",
    )
    from_diffusers = DiffusionChain.from_config(theirs.config)
    assert (from_diffusers.prediction_type, from_diffusers.variance_type) == ("sample", "fixed_large")
    np.testing.assert_array_equal(from_diffusers.train_alphas_cumprod, chain.train_alphas_cumprod)


def test_the_chain_is_frozen_and_set_timesteps_replaces_only_the_sampling_chain():
    scheduler = HFDDPMScheduler(num_train_timesteps=50)
    train_chain = scheduler.train_chain
    assert scheduler.chain is train_chain
    with pytest.raises(dataclasses.FrozenInstanceError):
        train_chain.prediction_type = "sample"
    scheduler.set_timesteps(5)
    assert scheduler.train_chain is train_chain and scheduler.chain is not train_chain
    assert len(scheduler.chain.timesteps) == 5 and train_chain.is_full


@pytest.mark.parametrize(
    "kwargs, choices",
    [
        ({"prediction_type": "noise"}, "Unknown prediction_type 'noise': choose one of epsilon, sample, v_prediction"),
        (
            {"variance_type": "fixed_medium"},
            "Unknown variance_type 'fixed_medium': choose one of fixed_small, fixed_large, learned_range",
        ),
    ],
)
def test_unknown_parameterisations_are_rejected_with_the_choices(kwargs, choices):
    assert PREDICTION_TYPES == ("epsilon", "sample", "v_prediction")
    assert VARIANCE_TYPES == ("fixed_small", "fixed_large", "learned_range")
    with pytest.raises(ValueError, match=choices):
        DiffusionChain.from_alphas_cumprod(LINEAR_ABAR, **kwargs)


# ---------------------------------------------------------------------------------------------- vs diffusers
@pytest.mark.parametrize("ours, theirs", SCHEDULES)
@pytest.mark.parametrize("steps, spacing", [(None, "leading"), (50, "leading"), (37, "linspace")])
def test_posterior_and_fixed_large_variances_match_diffusers(ours, theirs, steps, spacing):
    vdm_small = HFDDPMScheduler(beta_schedule=ours, timestep_spacing=spacing)
    vdm_large = HFDDPMScheduler(beta_schedule=ours, variance_type="fixed_large", timestep_spacing=spacing)
    ddpm = diffusers_in_float64(theirs, timestep_spacing=spacing)
    if steps:
        for scheduler in (vdm_small, vdm_large, ddpm):
            scheduler.set_timesteps(steps)
    small_chain, large_chain = vdm_small.chain, vdm_large.chain
    chain = timesteps_of(small_chain)
    x = torch.zeros(len(chain), 1, 1, 1, dtype=torch.float64)
    _, small, log_small = small_chain.q_posterior_mean_variance(x, x, chain)
    theirs_small = torch.stack([ddpm._get_variance(t, variance_type="fixed_small") for t in chain])
    # chain position 0 decodes x_0: the posterior is a point mass there (diffusers clamps it to 1e-20 for the log)
    assert small.flatten()[0].item() == 0.0 and theirs_small[0].item() == pytest.approx(1e-20)
    torch.testing.assert_close(small.flatten()[1:], theirs_small[1:], rtol=1e-10, atol=0)
    torch.testing.assert_close(small_chain.model_log_variance(None, x, chain), log_small, rtol=0, atol=0)
    theirs_large = torch.stack([ddpm._get_variance(t, variance_type="fixed_large") for t in chain])
    ours_large = large_chain.model_log_variance(None, x, chain).exp().flatten()
    torch.testing.assert_close(ours_large[1:], theirs_large[1:], rtol=1e-10, atol=0)
    if steps is None:
        # and against diffusers as shipped (float32 constants), absolutely: float32 loses ~5e-5 of the first
        # steps' relative precision
        stock = DDPMScheduler(beta_schedule=theirs)
        for step in (1, 2, 100, 999):
            _, variance, _ = small_chain.q_posterior_mean_variance(x[:1], x[:1], torch.tensor([step]))
            assert variance.item() == pytest.approx(stock._get_variance(step).item(), rel=0, abs=1e-7)


# ---------------------------------------------------------------------------------------------- the forward chain
@pytest.mark.parametrize("T, steps", [(30, None), (1000, 8)])
def test_composed_single_steps_match_the_marginal(T, steps):
    """x_{t_k} = sqrt(1 - beta_k) x_{t_{k-1}} + sqrt(beta_k) eps, composed from x_0, has the moments of q(x_t | x_0)
    at every step, and consecutive steps have the covariance sqrt(abar_t / abar_s) (1 - abar_s) of the joint.
    Tolerances are 5 standard errors of each estimate."""
    scheduler = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.1 if T == 30 else 0.02)
    chain = chain_of(scheduler, steps)
    n = 200_000
    x0 = torch.tensor([-1.0, 0.4, 1.0], dtype=torch.float64).reshape(3, 1, 1, 1).expand(3, 1, 1, n)
    generator = torch.Generator().manual_seed(0)
    abar = chain.train_alphas_cumprod
    x, previous_t = x0, None
    for t in chain.timesteps.tolist():
        x_next = chain.q_step(x, torch.randn(x.shape, generator=generator, dtype=torch.float64), torch.tensor(t))
        mean, variance, log_variance = chain.q_mean_variance(x0[..., :1], torch.tensor(t))
        v = 1 - abar[t]
        assert variance.flatten()[0].item() == pytest.approx(v, rel=1e-12)
        assert log_variance.flatten()[0].item() == pytest.approx(math.log(v), rel=1e-12)
        sample_mean, sample_var = x_next.mean(dim=-1).flatten(), x_next.var(dim=-1).flatten()
        assert (sample_mean - mean.flatten()).abs().max().item() < 5 * math.sqrt(v / n)
        assert (sample_var - v).abs().max().item() < 5 * v * math.sqrt(2 / (n - 1))
        if previous_t is not None:
            s = previous_t
            cov, var_s = math.sqrt(abar[t] / abar[s]) * (1 - abar[s]), 1 - abar[s]
            centred = (x - x.mean(dim=-1, keepdim=True)) * (x_next - x_next.mean(dim=-1, keepdim=True))
            sample_cov = centred.sum(dim=-1).flatten() / (n - 1)
            assert (sample_cov - cov).abs().max().item() < 5 * math.sqrt((var_s * v + cov**2) / n)
        x, previous_t = x_next, t
    assert previous_t == T - 1  # every chain ends at x_T


def test_add_noise_and_velocity_are_the_marginal_and_its_v_target():
    chain = DiffusionChain.from_alphas_cumprod(LINEAR_ABAR)
    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(4, 1, 2, 2, generator=generator, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 10, 500, 999])
    a = torch.from_numpy(LINEAR_ABAR[t.numpy()]).view(-1, 1, 1, 1)
    torch.testing.assert_close(
        chain.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-15, atol=0
    )
    torch.testing.assert_close(
        chain.get_velocity(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0, rtol=1e-15, atol=0
    )
    mean, _, _ = chain.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, a.sqrt() * x0, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------- the reverse posterior
@pytest.mark.parametrize(
    "schedule, T, steps, spacing",
    [
        ("cosine", 100, None, "linspace"),
        ("cosine", 100, 10, "linspace"),
        ("linear", 1000, 10, "linspace"),
        ("linear", 1000, 40, "leading"),
    ],
)
def test_posterior_equals_gaussian_conditioning_of_the_joint(schedule, T, steps, spacing):
    """q(x_s | x_t, x_0) for consecutive chain timesteps s < t, from the joint Gaussian of (x_s, x_t) given x_0:
    means sqrt(abar) x_0, variances 1 - abar, covariance sqrt(abar_t / abar_s) (1 - abar_s) (x_t is x_s scaled by
    sqrt(abar_t / abar_s) plus independent noise), conditioned with the standard formulas
    mu_1 + S_12 S_22^-1 (x_t - mu_2) and S_11 - S_12 S_22^-1 S_21."""
    chain = chain_of(HFDDPMScheduler(beta_schedule=schedule, num_train_timesteps=T, timestep_spacing=spacing), steps)
    timesteps = chain.timesteps.tolist()
    abar = chain.train_alphas_cumprod
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 1, 1, 1, generator=generator, dtype=torch.float64) * 2 - 1
    xt = torch.randn(5, 1, 1, 1, generator=generator, dtype=torch.float64) * 1.5
    for s, t in zip(timesteps[:-1], timesteps[1:]):
        joint_mean = np.stack([math.sqrt(abar[s]) * x0.flatten().numpy(), math.sqrt(abar[t]) * x0.flatten().numpy()])
        cov = math.sqrt(abar[t] / abar[s]) * (1 - abar[s])
        joint_cov = np.array([[1 - abar[s], cov], [cov, 1 - abar[t]]])
        gain = joint_cov[0, 1] / joint_cov[1, 1]
        expected_mean = joint_mean[0] + gain * (xt.flatten().numpy() - joint_mean[1])
        expected_var = joint_cov[0, 0] - gain * joint_cov[1, 0]
        mean, variance, log_variance = chain.q_posterior_mean_variance(x0, xt, torch.tensor(t))
        np.testing.assert_allclose(mean.flatten().numpy(), expected_mean, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(variance.flatten().numpy(), expected_var, rtol=1e-10)
        np.testing.assert_allclose(log_variance.flatten().numpy(), math.log(expected_var), rtol=1e-10)
    # the first step decodes x_0 itself: the posterior is the point mass at x_0, its log-variance clipped to the next
    mean, variance, log_variance = chain.q_posterior_mean_variance(x0, xt, torch.tensor(timesteps[0]))
    torch.testing.assert_close(mean, x0, rtol=1e-15, atol=0)
    assert variance.abs().max().item() == 0.0
    assert log_variance.flatten()[0].item() == pytest.approx(math.log(chain.posterior_variance[1]), rel=1e-15)


# ---------------------------------------------------------------------------------------------- the decoder
@pytest.mark.parametrize("steps, spacing", [(None, "linspace"), (25, "linspace"), (40, "leading")])
def test_learned_range_spans_log_beta_tilde_to_log_beta_on_every_chain(steps, spacing):
    chain = chain_of(HFDDPMScheduler(variance_type="learned_range", timestep_spacing=spacing), steps)
    timesteps = timesteps_of(chain)
    abar = chain.train_alphas_cumprod[chain.timesteps]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1 - abar / abar_prev
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    np.testing.assert_allclose(chain.betas, betas, rtol=1e-12)
    x = torch.zeros(len(timesteps), 1, 1, 1, dtype=torch.float64)
    low = chain.model_log_variance(-torch.ones_like(x), x, timesteps).flatten().numpy()
    high = chain.model_log_variance(torch.ones_like(x), x, timesteps).flatten().numpy()
    middle = chain.model_log_variance(torch.zeros_like(x), x, timesteps).flatten().numpy()
    np.testing.assert_allclose(low[1:], np.log(beta_tilde[1:]), rtol=1e-12)
    assert low[0] == pytest.approx(math.log(beta_tilde[1]), rel=1e-12)  # beta~ is 0 at the decoder: clipped
    np.testing.assert_allclose(high, np.log(betas), rtol=1e-12)  # including the decoder: its variance is learned
    np.testing.assert_allclose(middle, (low + high) / 2, rtol=1e-12)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_predict_original_sample_inverts_each_training_target(prediction_type, schedule):
    chain = HFDDPMScheduler(beta_schedule=schedule, prediction_type=prediction_type).train_chain
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(1000, 1, 2, 2, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(1000, 1, 2, 2, generator=generator, dtype=torch.float64)
    t = torch.arange(1000)
    x_t = chain.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0, "v_prediction": chain.get_velocity(x0, noise, t)}[prediction_type]
    torch.testing.assert_close(chain.predict_original_sample(target, x_t, t), x0, rtol=0, atol=1e-9)


def test_p_mean_variance_plugs_the_clipped_x0_estimate_into_the_posterior_mean():
    chain = DiffusionChain.from_alphas_cumprod(LINEAR_ABAR, prediction_type="sample", variance_type="learned_range")
    generator = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 1, 2, 2, generator=generator, dtype=torch.float64)
    prediction = 3 * torch.randn(3, 1, 2, 2, generator=generator, dtype=torch.float64)
    v = torch.rand(3, 1, 2, 2, generator=generator, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 500, 999])
    for clip, limit in ((False, 1.0), (True, 1.0), (True, 0.5)):
        mean, log_variance, x0 = chain.p_mean_variance(
            torch.cat([prediction, v], dim=1), x_t, t, clip_denoised=clip, clip_range=limit
        )
        expected_x0 = prediction.clamp(-limit, limit) if clip else prediction
        torch.testing.assert_close(x0, expected_x0, rtol=0, atol=0)
        torch.testing.assert_close(mean, chain.q_posterior_mean_variance(expected_x0, x_t, t)[0], rtol=0, atol=0)
        torch.testing.assert_close(log_variance, chain.model_log_variance(v, x_t, t), rtol=0, atol=0)


def test_decoder_min_std_moves_the_smallest_learned_log_variance_of_the_decoder_only():
    cosine = np.cumprod(1.0 - HFDDPMScheduler(beta_schedule="cosine").betas.numpy())
    clip = DiffusionChain.from_alphas_cumprod(cosine, variance_type="learned_range")
    floor = DiffusionChain.from_alphas_cumprod(cosine, variance_type="learned_range", decoder_min_std=1 / 1020)
    generator = torch.Generator().manual_seed(5)
    v = torch.rand(4, 1, 2, 2, generator=generator, dtype=torch.float64) * 2 - 1
    x = torch.zeros_like(v)
    first = torch.zeros(4, dtype=torch.long)
    expected = (v + 1) / 2 * math.log(1 - cosine[0]) + (1 - v) / 2 * 2 * math.log(1 / 1020)
    torch.testing.assert_close(floor.model_log_variance(v, x, first), expected, rtol=1e-14, atol=0)
    beta_tilde_2 = (1 - cosine[1] / cosine[0]) * (1 - cosine[0]) / (1 - cosine[1])
    expected_clip = (v + 1) / 2 * math.log(1 - cosine[0]) + (1 - v) / 2 * math.log(beta_tilde_2)
    torch.testing.assert_close(clip.model_log_variance(v, x, first), expected_clip, rtol=1e-14, atol=0)
    later = torch.tensor([1, 2, 500, 999])
    assert torch.equal(floor.model_log_variance(v, x, later), clip.model_log_variance(v, x, later))
    respaced = floor.respaced(np.array([0, 250, 999]))
    assert respaced.decoder_min_std == 1 / 1020
    assert respaced.learned_range_min_log_variance[0] == 2 * math.log(1 / 1020)


def test_a_decoder_at_the_floor_keeps_phi_4_of_an_edge_pixels_probability():
    """The closed form of DECODER_MIN_STD's docstring: a pixel at -1 decoded with mean -1 and standard deviation
    1/1020 keeps Phi((1/255) / (1/1020)) = Phi(4) of its probability, improved-diffusion's floor Phi(0.84)."""
    cosine = np.cumprod(1.0 - HFDDPMScheduler(beta_schedule="cosine").betas.numpy())
    x0 = -torch.ones(1, 1, 1, 1, dtype=torch.float64)
    for std, bits in ((DECODER_MIN_STD, 4.569e-5), (None, 0.32269)):
        chain = DiffusionChain.from_alphas_cumprod(cosine, variance_type="learned_range", decoder_min_std=std)
        log_variance = chain.model_log_variance(-torch.ones_like(x0), x0, torch.zeros(1, dtype=torch.long))
        nats = reconstruction_term(x0, x0, log_variance)
        phi = 0.5 * (1 + math.erf((1 / 255) / math.exp(float(log_variance) / 2) / math.sqrt(2)))
        assert float(nats) == pytest.approx(-math.log(phi), rel=1e-9)
        assert float(nats) / math.log(2) == pytest.approx(bits, rel=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variance_type": "fixed_small", "decoder_min_std": 1e-3}, "applies to variance_type='learned_range' only"),
        ({"variance_type": "learned_range", "decoder_min_std": 0.0}, r"must lie in \(0, sqrt\(beta_1\) = 0.01\)"),
        ({"variance_type": "learned_range", "decoder_min_std": 0.02}, r"must lie in \(0, sqrt\(beta_1\) = 0.01\)"),
    ],
)
def test_a_decoder_min_std_that_is_no_floor_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionChain.from_alphas_cumprod(LINEAR_ABAR, **kwargs)


# ---------------------------------------------------------------------------------------------- bad input
def test_timesteps_outside_the_chain_and_wrong_channel_counts_are_rejected():
    full = DiffusionChain.from_alphas_cumprod(LINEAR_ABAR)
    chain = full.respaced(np.array([0, 111, 222, 999]))
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"Timestep\(s\) \[5\] are not in the chain \[999, 222, 111, 0\]"):
        chain.q_posterior_mean_variance(x, x, torch.tensor([5]))
    with pytest.raises(ValueError, match=r"Timesteps must lie in \[0, 999\], got \[1000\]"):
        full.q_posterior_mean_variance(x, x, torch.tensor([1000]))
    with pytest.raises(ValueError, match=r"Timesteps must lie in \[0, 999\], got \[-1\]"):
        full.chain_position(-1)
    with pytest.raises(
        ValueError, match="variance_type='fixed_small' needs a model with C = 1 output channels, got 2"
    ):
        full.split_model_output(torch.zeros(1, 2, 2, 2), x)
    learned = DiffusionChain.from_alphas_cumprod(LINEAR_ABAR, variance_type="learned_range")
    with pytest.raises(ValueError, match=r"variance_type='learned_range' needs a model with 2\*C = 2 output channels"):
        learned.split_model_output(x, x)
