"""The derivation's equations against diffusers, closed forms and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from scipy.stats import norm

from hf_ddpm import DenoisingUNet, HFDDPMPipeline, VDMScheduler
from hf_ddpm import losses

SCHEDULES = [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]


# ---------------------------------------------------------------------------------------------- vs diffusers
def diffusers_in_float64(scheduler: DDPMScheduler) -> DDPMScheduler:
    """diffusers' DDPMScheduler with its cumulative products in float64, so its formulas run at our precision.

    In float32, 1 - alphas_cumprod at the first steps loses ~1e-4 of its relative precision (hf_ddpm keeps every
    constant in float64), so step outputs there differ by ~1e-4 for that reason alone.
    """
    scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.double(), dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


@pytest.mark.parametrize("ours, theirs", SCHEDULES)
def test_schedule_add_noise_and_posterior_variance_match_diffusers(ours, theirs):
    vdm, ddpm = VDMScheduler(beta_schedule=ours), DDPMScheduler(beta_schedule=theirs)
    assert torch.allclose(vdm.alphas_cumprod.float(), ddpm.alphas_cumprod, atol=1e-6)
    x0, noise = torch.rand(4, 1, 6, 6) * 2 - 1, torch.randn(4, 1, 6, 6)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(vdm.add_noise(x0, noise, t), diffusers_in_float64(ddpm).add_noise(x0, noise, t).float(), atol=1e-6)
    for step in (1, 2, 100, 999):
        _, variance, _ = vdm.q_posterior_mean_variance(x0, x0, torch.tensor([step]))
        # diffusers computes in float32, which loses ~5e-5 of the first steps' relative precision: compare absolutely
        assert variance[0, 0, 0, 0].item() == pytest.approx(ddpm._get_variance(step).item(), rel=0, abs=1e-7)


@pytest.mark.parametrize("ours, theirs", SCHEDULES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps, spacing", [(1000, "leading"), (50, "leading"), (37, "linspace")])
def test_step_matches_diffusers_with_the_same_noise(ours, theirs, prediction_type, variance_type, steps, spacing):
    config = dict(prediction_type=prediction_type, variance_type=variance_type, timestep_spacing=spacing)
    vdm = VDMScheduler(beta_schedule=ours, **config)
    ddpm = diffusers_in_float64(DDPMScheduler(beta_schedule=theirs, **config))
    vdm.set_timesteps(steps)
    ddpm.set_timesteps(steps)
    assert torch.equal(vdm.timesteps, ddpm.timesteps)
    sample = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    picks = list(ddpm.timesteps[:3]) + list(ddpm.timesteps[-3:]) if steps == 1000 else list(ddpm.timesteps)
    for t in picks:
        model_output = torch.randn(2, 1, 5, 5, dtype=torch.float64) * 0.5
        ours_out = vdm.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)))
        theirs_out = ddpm.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)))
        assert torch.allclose(ours_out.pred_original_sample, theirs_out.pred_original_sample, atol=1e-6, rtol=0)
        assert torch.allclose(ours_out.prev_sample, theirs_out.prev_sample, atol=1e-6, rtol=0), int(t)
        sample = theirs_out.prev_sample


def test_learned_range_step_matches_diffusers_for_t_above_zero():
    config = dict(variance_type="learned_range", timestep_spacing="leading")
    vdm, ddpm = VDMScheduler(**config), diffusers_in_float64(DDPMScheduler(**config))
    vdm.set_timesteps(100)
    ddpm.set_timesteps(100)
    sample = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    for t in ddpm.timesteps[:-1]:
        output = torch.cat([torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1], dim=1)
        a = vdm.step(output, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
        b = ddpm.step(output, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.allclose(a, b, atol=1e-6, rtol=0), int(t)


def test_configs_interchange_with_diffusers_schedulers():
    ours = VDMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler, DDPMScheduler):
        theirs = cls.from_config(ours.config)
        assert torch.allclose(theirs.alphas_cumprod, ours.alphas_cumprod.float(), atol=1e-6)
        assert theirs.config.prediction_type == "v_prediction"
    cosine = VDMScheduler(beta_schedule="cosine")
    assert cosine.config.beta_schedule == "squaredcos_cap_v2"
    assert torch.allclose(DDIMScheduler.from_config(cosine.config).alphas_cumprod, cosine.alphas_cumprod.float(), atol=1e-6)
    back = VDMScheduler.from_config(DDPMScheduler(beta_schedule="linear", beta_end=0.03).config)
    assert torch.allclose(back.alphas_cumprod.float(), DDPMScheduler(beta_end=0.03).alphas_cumprod, atol=1e-6)
    assert "DDIMScheduler" in VDMScheduler._compatibles


# ---------------------------------------------------------------------------------------------- the forward chain
def test_composed_single_steps_match_the_marginal():
    scheduler = VDMScheduler(num_train_timesteps=30, beta_end=0.1)
    n, t_final = 200_000, 29
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    x = x0
    generator = torch.Generator().manual_seed(0)
    for t in range(t_final + 1):
        x = scheduler.q_step(x, torch.randn(x.shape, generator=generator, dtype=torch.float64), torch.tensor([t]))
    mean, variance, _ = scheduler.q_mean_variance(x0[:1], torch.tensor([t_final]))
    sample_mean, sample_var = x.mean().item(), x.var().item()
    v = variance.item()
    assert abs(sample_mean - mean.item()) < 5 * math.sqrt(v / n)
    assert abs(sample_var - v) < 5 * v * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize("respace", [None, 10])
def test_posterior_equals_gaussian_conditioning_of_the_joint(respace):
    scheduler = VDMScheduler(beta_schedule="cosine", num_train_timesteps=100)
    if respace:
        scheduler.set_timesteps(respace)
    chain = [int(t) for t in scheduler.timesteps.flip(0)]
    abar = scheduler.alphas_cumprod.numpy()
    x0, xt = torch.tensor([[[[0.3]]]], dtype=torch.float64), torch.tensor([[[[-0.8]]]], dtype=torch.float64)
    for k in range(1, len(chain)):
        s, t = chain[k - 1], chain[k]
        # joint of (x_s, x_t) given x0: x_s = sqrt(abar_s) x0 + e_s, x_t = sqrt(abar_t/abar_s) x_s + e
        var_s = 1 - abar[s]
        cov = math.sqrt(abar[t] / abar[s]) * var_s
        var_t = 1 - abar[t]
        mean_s, mean_t = math.sqrt(abar[s]) * 0.3, math.sqrt(abar[t]) * 0.3
        cond_mean = mean_s + cov / var_t * (-0.8 - mean_t)
        cond_var = var_s - cov**2 / var_t
        mean, variance, _ = scheduler.q_posterior_mean_variance(x0, xt, torch.tensor([t]))
        assert mean.item() == pytest.approx(cond_mean, rel=1e-10, abs=1e-12)
        assert variance.item() == pytest.approx(cond_var, rel=1e-10, abs=1e-15)


def test_learned_range_interpolates_between_log_beta_tilde_and_log_beta_on_a_respaced_chain():
    scheduler = VDMScheduler(variance_type="learned_range")
    scheduler.set_timesteps(25)
    chain = scheduler.chain
    np.testing.assert_allclose(chain.betas, 1 - chain.alphas_cumprod / chain.alphas_cumprod_prev)
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    k = 7
    t = torch.tensor([int(chain.timesteps[k])])
    low = scheduler.model_log_variance(-torch.ones_like(x), x, t)
    high = scheduler.model_log_variance(torch.ones_like(x), x, t)
    assert low[0, 0, 0, 0].item() == pytest.approx(math.log(chain.posterior_variance[k]), rel=1e-12)
    assert high[0, 0, 0, 0].item() == pytest.approx(math.log(chain.betas[k]), rel=1e-12)


# ---------------------------------------------------------------------------------------------- densities and terms
def test_normal_kl_equals_torch_distributions():
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    l1, l2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()), torch.distributions.Normal(m2, (0.5 * l2).exp()))
    assert torch.allclose(losses.normal_kl(m1, l1, m2, l2), expected, rtol=1e-12)


@pytest.mark.parametrize("mean, log_scale", [(0.0, -6.0), (0.3, -2.0), (-0.95, 0.0), (2.5, -1.0), (-3.0, 3.0), (0.999, -9.0)])
def test_discretized_gaussian_sums_to_one_and_matches_scipy(mean, log_scale):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    means, scales = torch.full_like(x, mean), torch.full_like(x, log_scale)
    log_p = losses.discretized_gaussian_log_likelihood(x, means, scales)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    sigma = math.exp(log_scale)
    upper = np.where(x.numpy() > 0.999, np.inf, (x.numpy() + 1 / 255 - mean) / sigma)
    lower = np.where(x.numpy() < -0.999, -np.inf, (x.numpy() - 1 / 255 - mean) / sigma)
    # each bin's mass from the tail where it is small, so the reference itself does not cancel
    expected = np.where(lower > 0, norm.sf(lower) - norm.sf(upper), norm.cdf(upper) - norm.cdf(lower))
    big = expected > 1e-200
    np.testing.assert_allclose(log_p.exp().numpy()[big], expected[big], rtol=1e-9)


def test_prior_term_equals_its_closed_form():
    scheduler = VDMScheduler()
    abar = scheduler.alphas_cumprod[-1].item()
    assert abar == pytest.approx(4.04e-5, rel=2e-3)
    ones = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    for image, pixel in ((ones, 1.0), (-ones, -1.0), (torch.zeros_like(ones), 0.0)):
        closed = 0.5 * (-1 - math.log1p(-abar) + (1 - abar) + abar * pixel**2) / math.log(2)
        bpd = losses.nats_to_bits_per_dim(losses.prior_term(scheduler, image), 16).item()
        assert bpd == pytest.approx(closed, rel=1e-6)
    assert losses.nats_to_bits_per_dim(losses.prior_term(scheduler, ones), 16).item() == pytest.approx(2.91e-5, rel=2e-3)
    assert losses.nats_to_bits_per_dim(losses.prior_term(scheduler, 0 * ones), 16).item() == pytest.approx(5.9e-10, rel=2e-2)


def test_oracle_model_makes_every_denoising_term_zero():
    scheduler = VDMScheduler(num_train_timesteps=40, prediction_type="sample", beta_end=0.2)
    x0 = torch.randint(0, 256, (3, 1, 4, 4)).double() / 127.5 - 1
    result = losses.full_elbo(scheduler, lambda x_t, t: x0, x0, generator=torch.Generator().manual_seed(0), keep_per_timestep=True)
    assert result.per_timestep[:, 1:].abs().max().item() < 1e-10
    assert torch.allclose(result.bits_per_dim, result.prior_term + result.reconstruction_term, rtol=1e-12)
    assert torch.allclose(result.bits_per_dim, result.prior_term + result.denoising_terms + result.reconstruction_term, rtol=1e-12)


def test_vlb_loss_averaged_over_all_timesteps_equals_the_exact_bound():
    """With the same x_t draws, T * mean_t(L_t) + prior over every t is the exact sum: the vlb loss is unbiased."""
    T = 12
    scheduler = VDMScheduler(num_train_timesteps=T, variance_type="learned_range", beta_end=0.3)
    x0 = torch.randint(0, 256, (2, 1, 4, 4)).double() / 127.5 - 1
    weight = torch.randn(2, 1, 1, 1, dtype=torch.float64) * 0.3

    def model_fn(x_t, t):
        return torch.cat([weight * x_t + 0.01 * t.view(-1, 1, 1, 1), torch.tanh(x_t)], dim=1)

    exact = losses.full_elbo(scheduler, model_fn, x0, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    vlb = []
    for t in range(T):
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).double()
        out = losses.training_loss("vlb", scheduler, model_fn, x0, torch.full((2,), t), noise=noise)
        vlb.append(out.vlb_bits_per_dim)
    # the training path computes in float32, the bound in float64
    assert torch.allclose(torch.stack(vlb).mean(0).double(), exact.bits_per_dim, rtol=1e-5)


def test_hybrid_gradient_on_the_mean_equals_the_simple_loss_gradient():
    scheduler = VDMScheduler(num_train_timesteps=20, variance_type="learned_range")
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([3, 15])
    mean_param = torch.zeros(1, requires_grad=True)
    variance_param = torch.zeros(1, requires_grad=True)

    def model_fn(x_t, _):
        return torch.cat([x_t * mean_param, torch.ones_like(x_t) * variance_param], dim=1)

    grads = {}
    for kind in ("simple", "hybrid"):
        mean_param.grad = variance_param.grad = None
        losses.training_loss(kind, scheduler, model_fn, x0, t, noise=noise).loss.mean().backward()
        grads[kind] = (mean_param.grad.clone(), None if variance_param.grad is None else variance_param.grad.clone())
    assert torch.allclose(grads["simple"][0], grads["hybrid"][0], rtol=1e-6)
    assert grads["hybrid"][1] is not None and grads["hybrid"][1].abs().item() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta_schedule": "sigmoid"}, "linear, scaled_linear, cosine, squaredcos_cap_v2"),
        ({"prediction_type": "noise"}, "epsilon, sample, v_prediction"),
        ({"variance_type": "learned"}, "fixed_small, fixed_large, learned_range"),
        ({"timestep_spacing": "even"}, "linspace, leading, trailing"),
    ],
)
def test_unknown_names_are_rejected_with_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VDMScheduler(**kwargs)


def test_a_timestep_outside_the_respaced_chain_is_rejected():
    scheduler = VDMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the current chain"):
        scheduler.step(torch.zeros(1, 1, 2, 2), 5, torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def pipeline():
    torch.manual_seed(0)
    unet = DenoisingUNet(sample_size=8, block_out_channels=(8, 16), attention_resolutions=(4,), learn_variance=True)
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.05)
    return HFDDPMPipeline(unet=unet, scheduler=VDMScheduler(num_train_timesteps=20, variance_type="learned_range"))


def test_pipeline_is_deterministic_and_round_trips_through_save_and_load(pipeline, tmp_path):
    first = pipeline(batch_size=3, num_inference_steps=20, generator=torch.Generator().manual_seed(1), output_type="pt").images
    again = pipeline(batch_size=3, num_inference_steps=20, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.equal(first, again) and first.shape == (3, 1, 8, 8)
    pipeline.save_pretrained(tmp_path)
    index = (tmp_path / "model_index.json").read_text()
    assert '"hf_ddpm",\n    "DenoisingUNet"' in index and '"hf_ddpm",\n    "VDMScheduler"' in index
    loaded = HFDDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is DenoisingUNet and type(loaded.scheduler) is VDMScheduler
    reloaded = loaded(batch_size=3, num_inference_steps=20, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.equal(first, reloaded)


def test_pipeline_output_types_and_a_ddim_swap(pipeline):
    pil = pipeline(batch_size=2, num_inference_steps=4).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    array = pipeline(batch_size=2, num_inference_steps=4, output_type="np").images
    assert array.shape == (2, 8, 8, 1)
    ddim = HFDDPMPipeline(unet=pipeline.unet, scheduler=DDIMScheduler.from_config(pipeline.scheduler.config))
    images = ddim(batch_size=2, num_inference_steps=5, output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_pipeline_elbo_adds_up_and_accepts_uint8_and_pil(pipeline):
    pixels = torch.randint(0, 256, (2, 8, 8), dtype=torch.uint8)
    as_float = pixels[:, None].float() / 127.5 - 1
    a = pipeline.elbo(as_float, generator=torch.Generator().manual_seed(0))
    b = pipeline.elbo(pixels.numpy(), generator=torch.Generator().manual_seed(0))
    from PIL import Image

    c = pipeline.elbo([Image.fromarray(p.numpy()) for p in pixels], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a.bits_per_dim, a.prior_term + a.denoising_terms + a.reconstruction_term, rtol=1e-12)
    assert torch.equal(a.bits_per_dim, b.bits_per_dim) and torch.equal(a.bits_per_dim, c.bits_per_dim)
    with pytest.raises(ValueError, match="256-level grid"):
        pipeline.elbo(as_float + 0.001)
