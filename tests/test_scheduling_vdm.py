"""VDMScheduler against diffusers' DDPMScheduler, Monte Carlo, Gaussian conditioning and its own definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from hf_ddpm import VDMScheduler

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULES = [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


def diffusers_in_float64(beta_schedule: str, **config) -> DDPMScheduler:
    """diffusers' DDPMScheduler with its schedule recomputed in float64 from its own definitions.

    diffusers stores betas and alphas_cumprod in float32, which moves 1 - alphas_cumprod at the first steps (and
    1 - beta at the clipped last cosine step) by up to ~1e-4 relative, so its step outputs differ from any float64
    implementation by more than 1e-6 for that reason alone. The betas recomputed here equal diffusers' own to
    float32 rounding (checked), so the comparisons test diffusers' formulas at our precision.
    """
    scheduler = DDPMScheduler(beta_schedule=beta_schedule, **config)
    T = scheduler.config.num_train_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(scheduler.config.beta_start, scheduler.config.beta_end, T, dtype=np.float64)
    else:  # squaredcos_cap_v2: 1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), capped at 0.999
        alpha_bar = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    np.testing.assert_allclose(betas, scheduler.betas.double().numpy(), rtol=3e-7)
    scheduler.betas = torch.from_numpy(betas)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def toy_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a network: bounded, and different at every timestep."""
    return 0.8 * torch.tanh(sample) + 0.1 * math.cos(int(t) / 50.0)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to 1e-6 absolute (the issue's tolerance; 1e-9 relative where unclipped x_0 estimates are large)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-6)


def chain_of(scheduler: VDMScheduler) -> torch.Tensor:
    """The increasing timesteps of the scheduler's current chain."""
    return scheduler.timesteps.flip(0)


# ---------------------------------------------------------------------------------------------- vs diffusers
@pytest.mark.parametrize("ours, theirs", SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(ours, theirs):
    vdm, ddpm = VDMScheduler(beta_schedule=ours), diffusers_in_float64(theirs)
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(1000)
    x0 = torch.rand(1000, 1, 2, 2, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(1000, 1, 2, 2, generator=generator, dtype=torch.float64)
    assert_close(vdm.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t))
    assert_close(vdm.get_velocity(x0, noise, t), ddpm.get_velocity(x0, noise, t))
    # and in float32, against diffusers as shipped (float32 constants), to float32 precision
    stock = DDPMScheduler(beta_schedule=theirs)
    x0, noise = x0.float(), noise.float()
    torch.testing.assert_close(vdm.add_noise(x0, noise, t), stock.add_noise(x0, noise, t), rtol=0, atol=1e-5)


@pytest.mark.parametrize("ours, theirs", SCHEDULES)
@pytest.mark.parametrize("steps, spacing", [(None, "leading"), (50, "leading"), (37, "linspace")])
def test_posterior_and_fixed_large_variances_match_diffusers(ours, theirs, steps, spacing):
    vdm_small = VDMScheduler(beta_schedule=ours, timestep_spacing=spacing)
    vdm_large = VDMScheduler(beta_schedule=ours, variance_type="fixed_large", timestep_spacing=spacing)
    ddpm = diffusers_in_float64(theirs, timestep_spacing=spacing)
    if steps:
        for scheduler in (vdm_small, vdm_large, ddpm):
            scheduler.set_timesteps(steps)
    chain = chain_of(vdm_small)
    x = torch.zeros(len(chain), 1, 1, 1, dtype=torch.float64)
    _, small, log_small = vdm_small.q_posterior_mean_variance(x, x, chain)
    theirs_small = torch.stack([ddpm._get_variance(t, variance_type="fixed_small") for t in chain])
    # chain position 0 decodes x_0: the posterior is a point mass there (diffusers clamps it to 1e-20 for the log)
    assert small.flatten()[0].item() == 0.0 and theirs_small[0].item() == pytest.approx(1e-20)
    torch.testing.assert_close(small.flatten()[1:], theirs_small[1:], rtol=1e-10, atol=0)
    torch.testing.assert_close(vdm_small.model_log_variance(None, x, chain), log_small, rtol=0, atol=0)
    theirs_large = torch.stack([ddpm._get_variance(t, variance_type="fixed_large") for t in chain])
    ours_large = vdm_large.model_log_variance(None, x, chain).exp().flatten()
    torch.testing.assert_close(ours_large[1:], theirs_large[1:], rtol=1e-10, atol=0)


@pytest.mark.parametrize("ours, theirs", SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps, spacing, clip", [(None, "leading", True), (50, "leading", True), (37, "linspace", False)])
def test_sampling_chain_matches_diffusers_with_the_same_noise(ours, theirs, prediction_type, variance_type, steps, spacing, clip):
    """Both schedulers run a whole reverse chain from the same x_T with equally seeded generators; every step's
    x_{t-1} and x_0 estimate agree. Both chains end at t = 0, where neither adds noise."""
    config = dict(prediction_type=prediction_type, variance_type=variance_type, timestep_spacing=spacing, clip_sample=clip)
    vdm, ddpm = VDMScheduler(beta_schedule=ours, **config), diffusers_in_float64(theirs, **config)
    if steps:
        vdm.set_timesteps(steps)
        ddpm.set_timesteps(steps)
    assert torch.equal(vdm.timesteps, ddpm.timesteps) and vdm.timesteps[-1] == 0
    assert len(vdm.timesteps) == (steps or 1000)
    ours_x = theirs_x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours_gen, theirs_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    ours_steps, theirs_steps = [], []
    for t in vdm.timesteps:
        a = vdm.step(toy_model(ours_x, t), t, ours_x, generator=ours_gen)
        b = ddpm.step(toy_model(theirs_x, t), t, theirs_x, generator=theirs_gen)
        ours_steps.append(torch.stack([a.pred_original_sample, a.prev_sample]))
        theirs_steps.append(torch.stack([b.pred_original_sample, b.prev_sample]))
        ours_x, theirs_x = a.prev_sample, b.prev_sample
    assert_close(torch.stack(ours_steps), torch.stack(theirs_steps))  # every step's x_0 estimate and x_{t-1}
    # the same number of noise draws: the generators are in the same state
    assert torch.equal(torch.randn(3, generator=ours_gen), torch.randn(3, generator=theirs_gen))


@pytest.mark.parametrize("steps", [None, 100])
def test_learned_range_matches_diffusers(steps):
    config = dict(variance_type="learned_range", timestep_spacing="leading")
    vdm, ddpm = VDMScheduler(**config), diffusers_in_float64("linear", **config)
    if steps:
        vdm.set_timesteps(steps)
        ddpm.set_timesteps(steps)
    generator = torch.Generator().manual_seed(3)
    v = torch.rand(2, 1, 3, 3, generator=generator, dtype=torch.float64) * 2 - 1
    x = torch.zeros_like(v)
    for t in vdm.timesteps[:-1]:  # t > 0: diffusers' learned range at t = 0 starts from log(1e-20)
        torch.testing.assert_close(vdm.model_log_variance(v, x, t), ddpm._get_variance(t, predicted_variance=v), rtol=1e-10, atol=0)
    ours_x = theirs_x = torch.randn(2, 1, 3, 3, generator=generator, dtype=torch.float64)
    ours_gen, theirs_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    ours_steps, theirs_steps = [], []
    for t in vdm.timesteps:
        ours_x = vdm.step(torch.cat([toy_model(ours_x, t), v], dim=1), t, ours_x, generator=ours_gen).prev_sample
        theirs_x = ddpm.step(torch.cat([toy_model(theirs_x, t), v], dim=1), t, theirs_x, generator=theirs_gen).prev_sample
        ours_steps.append(ours_x)
        theirs_steps.append(theirs_x)
    assert_close(torch.stack(ours_steps), torch.stack(theirs_steps))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 333, 1000])
def test_respaced_timesteps_equal_diffusers(spacing, steps):
    vdm, ddpm = VDMScheduler(timestep_spacing=spacing), DDPMScheduler(timestep_spacing=spacing)
    vdm.set_timesteps(steps)
    ddpm.set_timesteps(steps)
    assert torch.equal(vdm.timesteps, ddpm.timesteps)
    np.testing.assert_array_equal(vdm.chain.timesteps, ddpm.timesteps.flip(0).numpy())


def test_configs_interchange_with_diffusers_schedulers():
    for schedule in ("linear", "cosine"):
        ours = VDMScheduler(num_train_timesteps=500, beta_schedule=schedule, beta_end=0.03, prediction_type="v_prediction")
        for cls in (DDIMScheduler, DPMSolverMultistepScheduler, DDPMScheduler):
            theirs = cls.from_config(ours.config)
            assert theirs.config.num_train_timesteps == 500 and theirs.config.prediction_type == "v_prediction"
            assert (theirs.alphas_cumprod.double() - ours.alphas_cumprod).abs().max().item() <= 1e-6
    custom = DDPMScheduler(num_train_timesteps=300, beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    for config in (DDPMScheduler().config, custom.config):
        ours = VDMScheduler.from_config(config)
        assert ours.config.prediction_type == config.prediction_type and len(ours) == config.num_train_timesteps
        assert (ours.alphas_cumprod - DDPMScheduler.from_config(config).alphas_cumprod.double()).abs().max().item() <= 1e-6
    assert {DDIMScheduler, DPMSolverMultistepScheduler, DDPMScheduler} <= set(VDMScheduler().compatibles)


# ---------------------------------------------------------------------------------------------- the forward chain
@pytest.mark.parametrize("T, steps", [(30, None), (1000, 8)])
def test_composed_single_steps_match_the_marginal(T, steps):
    """x_{t_k} = sqrt(1 - beta_k) x_{t_{k-1}} + sqrt(beta_k) eps, composed from x_0, has the moments of q(x_t | x_0)
    at every step, and consecutive steps have the covariance sqrt(abar_t / abar_s) (1 - abar_s) of the joint.
    Tolerances are 5 standard errors of each estimate."""
    scheduler = VDMScheduler(num_train_timesteps=T, beta_end=0.1 if T == 30 else 0.02)
    if steps:
        scheduler.set_timesteps(steps)
    n = 200_000
    x0 = torch.tensor([-1.0, 0.4, 1.0], dtype=torch.float64).reshape(3, 1, 1, 1).expand(3, 1, 1, n)
    generator = torch.Generator().manual_seed(0)
    abar = scheduler.alphas_cumprod.numpy()
    x, previous_t = x0, None
    for t in chain_of(scheduler).tolist():
        x_next = scheduler.q_step(x, torch.randn(x.shape, generator=generator, dtype=torch.float64), torch.tensor(t))
        mean, variance, log_variance = scheduler.q_mean_variance(x0[..., :1], torch.tensor(t))
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


# ---------------------------------------------------------------------------------------------- the reverse posterior
@pytest.mark.parametrize(
    "schedule, T, steps, spacing",
    [("cosine", 100, None, "linspace"), ("linear", 1000, 10, "linspace"), ("linear", 1000, 40, "leading")],
)
def test_posterior_equals_gaussian_conditioning_of_the_joint(schedule, T, steps, spacing):
    """q(x_s | x_t, x_0) for consecutive chain timesteps s < t, from the joint Gaussian of (x_s, x_t) given x_0:
    means sqrt(abar) x_0, variances 1 - abar, covariance sqrt(abar_t / abar_s) (1 - abar_s) (x_t is x_s scaled by
    sqrt(abar_t / abar_s) plus independent noise), conditioned with the standard formulas
    mu_1 + S_12 S_22^-1 (x_t - mu_2) and S_11 - S_12 S_22^-1 S_21."""
    scheduler = VDMScheduler(beta_schedule=schedule, num_train_timesteps=T, timestep_spacing=spacing)
    if steps:
        scheduler.set_timesteps(steps)
    chain = chain_of(scheduler).tolist()
    abar = scheduler.alphas_cumprod.numpy()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 1, 1, 1, generator=generator, dtype=torch.float64) * 2 - 1
    xt = torch.randn(5, 1, 1, 1, generator=generator, dtype=torch.float64) * 1.5
    for s, t in zip(chain[:-1], chain[1:]):
        joint_mean = np.stack([math.sqrt(abar[s]) * x0.flatten().numpy(), math.sqrt(abar[t]) * x0.flatten().numpy()])
        cov = math.sqrt(abar[t] / abar[s]) * (1 - abar[s])
        joint_cov = np.array([[1 - abar[s], cov], [cov, 1 - abar[t]]])
        gain = joint_cov[0, 1] / joint_cov[1, 1]
        expected_mean = joint_mean[0] + gain * (xt.flatten().numpy() - joint_mean[1])
        expected_var = joint_cov[0, 0] - gain * joint_cov[1, 0]
        mean, variance, log_variance = scheduler.q_posterior_mean_variance(x0, xt, torch.tensor(t))
        np.testing.assert_allclose(mean.flatten().numpy(), expected_mean, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(variance.flatten().numpy(), expected_var, rtol=1e-10)
        np.testing.assert_allclose(log_variance.flatten().numpy(), math.log(expected_var), rtol=1e-10)
    # the first step decodes x_0 itself: the posterior is the point mass at x_0, its log-variance clipped to the next
    mean, variance, log_variance = scheduler.q_posterior_mean_variance(x0, xt, torch.tensor(chain[0]))
    torch.testing.assert_close(mean, x0, rtol=1e-15, atol=0)
    assert variance.abs().max().item() == 0.0
    assert log_variance.flatten()[0].item() == pytest.approx(math.log(scheduler.chain.posterior_variance[1]), rel=1e-15)


# ---------------------------------------------------------------------------------------------- the decoder
@pytest.mark.parametrize("steps, spacing", [(None, "linspace"), (25, "linspace"), (40, "leading")])
def test_learned_range_spans_log_beta_tilde_to_log_beta_on_every_chain(steps, spacing):
    scheduler = VDMScheduler(variance_type="learned_range", timestep_spacing=spacing)
    if steps:
        scheduler.set_timesteps(steps)
    chain = chain_of(scheduler)
    abar = scheduler.alphas_cumprod.numpy()[chain.numpy()]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1 - abar / abar_prev
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    np.testing.assert_allclose(scheduler.chain.betas, betas, rtol=1e-12)
    x = torch.zeros(len(chain), 1, 1, 1, dtype=torch.float64)
    low = scheduler.model_log_variance(-torch.ones_like(x), x, chain).flatten().numpy()
    high = scheduler.model_log_variance(torch.ones_like(x), x, chain).flatten().numpy()
    middle = scheduler.model_log_variance(torch.zeros_like(x), x, chain).flatten().numpy()
    np.testing.assert_allclose(low[1:], np.log(beta_tilde[1:]), rtol=1e-12)
    assert low[0] == pytest.approx(math.log(beta_tilde[1]), rel=1e-12)  # beta~ is 0 at the decoder: clipped
    np.testing.assert_allclose(high, np.log(betas), rtol=1e-12)  # including the decoder: its variance is learned
    np.testing.assert_allclose(middle, (low + high) / 2, rtol=1e-12)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_predict_original_sample_inverts_each_training_target(prediction_type, schedule):
    scheduler = VDMScheduler(beta_schedule=schedule, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(1000, 1, 2, 2, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(1000, 1, 2, 2, generator=generator, dtype=torch.float64)
    t = torch.arange(1000)
    x_t = scheduler.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction_type]
    torch.testing.assert_close(scheduler.predict_original_sample(target, x_t, t), x0, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------- chains and bad input
def test_set_timesteps_builds_valid_chains_and_restores_the_full_one():
    scheduler = VDMScheduler(num_train_timesteps=100)
    full = scheduler.chain
    scheduler.set_timesteps(10)
    assert scheduler.chain.timesteps[0] == 0 and scheduler.chain.timesteps[-1] == 99  # linspace spans the chain
    scheduler.set_timesteps(timesteps=[90, 40, 3])
    np.testing.assert_array_equal(scheduler.chain.timesteps, [3, 40, 90])
    abar = scheduler.alphas_cumprod.numpy()
    np.testing.assert_allclose(scheduler.chain.betas, 1 - abar[[3, 40, 90]] / np.array([1.0, abar[3], abar[40]]), rtol=1e-12)
    scheduler.set_timesteps(100)
    for name in ("timesteps", "betas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_array_equal(getattr(scheduler.chain, name), getattr(full, name))
    bad_requests = (dict(num_inference_steps=0), dict(num_inference_steps=101), dict(timesteps=[3, 40]), dict(timesteps=[100, 3]))
    for bad in bad_requests:
        with pytest.raises(ValueError):
            scheduler.set_timesteps(**bad)


@pytest.mark.parametrize(
    "kwargs, choices",
    [
        ({"prediction_type": "noise"}, "'noise'.*epsilon, sample, v_prediction"),
        ({"variance_type": "learned"}, "'learned'.*fixed_small, fixed_large, learned_range"),
        ({"timestep_spacing": "even"}, "'even'.*linspace, leading, trailing"),
        ({"beta_schedule": "sigmoid"}, "'sigmoid'.*linear, scaled_linear, cosine, squaredcos_cap_v2"),
    ],
)
def test_unknown_names_are_rejected_with_the_choices(kwargs, choices):
    with pytest.raises(ValueError, match=choices):
        VDMScheduler(**kwargs)


def test_timesteps_outside_the_chain_and_wrong_channel_counts_are_rejected():
    scheduler = VDMScheduler()
    scheduler.set_timesteps(10)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"Timestep\(s\) \[5\] are not in the current chain"):
        scheduler.step(x, 5, x)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        scheduler.q_posterior_mean_variance(x, x, torch.tensor([1000]))
    with pytest.raises(ValueError, match="needs a model with C = 1 output channels"):
        scheduler.step(torch.zeros(1, 2, 2, 2), 999, x)
    learned = VDMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="2\\*C = 2"):
        learned.step(x, 999, x)
