"""Where the bound goes in time, the diffusion pipelines' ``bound_by_time`` (against closed forms and the bound's own
estimators), and hf_ddpm.plots' images of it and of the loss."""

from __future__ import annotations

import math
import sys

import PIL.Image
import pytest
import torch

from helpers import on_grid, tiny_ddpm_pipeline, tiny_vae_pipeline, tiny_vdm_pipeline
from hf_ddpm.ddpm.elbo import full_elbo, prior_term
from hf_ddpm.distributions import nats_to_bits_per_dim
from hf_ddpm.evaluation import BoundByTime, has_time_axis
from hf_ddpm.pipelines.vdm import vdm_epsilon
from hf_ddpm.plots import plot_bound_by_time, plot_loss_curve
from hf_ddpm.vdm.elbo import clipped_estimate_model, continuous_time_bound_estimate
from hf_ddpm.vdm.noise_schedule import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ddpm_terms_by_timestep_add_up_to_the_full_bound():
    pipeline = tiny_ddpm_pipeline(0)
    images = on_grid(3, 1, 8, 8)
    result = pipeline.bound_by_time(images, generator=torch.Generator().manual_seed(0))
    assert isinstance(result, BoundByTime)
    x, bits, label = result
    chain = pipeline.train_chain
    assert x.tolist() == list(range(10)) and bits.dtype == torch.float64 and bits.shape == (10,)

    def model_fn(x_t, t):
        return pipeline.unet(x_t.to(pipeline.unet.dtype), t).sample

    reference = full_elbo(chain, model_fn, images, generator=torch.Generator().manual_seed(0), clip_denoised=True)
    prior = nats_to_bits_per_dim(prior_term(chain, images), 64).mean()
    assert (bits.sum() + prior).item() == pytest.approx(reference.bits_per_dim.mean().item(), rel=1e-12)
    assert bits[0].item() == pytest.approx(reference.reconstruction_term.mean().item(), rel=1e-12)
    assert f"{reference.bits_per_dim.mean().item():.4f}" in label
    # the terms the pipeline's exact bound sums: the same draws give the same bound
    bound = pipeline.elbo(images, generator=torch.Generator().manual_seed(0))
    assert (bits.sum() + prior).item() == pytest.approx(bound.bits_per_dim, rel=1e-12)
    assert pipeline.bound_by_time(images, num_images=2).label.endswith("mean of 2 images")


def test_vdm_density_integrates_to_the_continuous_diffusion_term():
    pipeline = tiny_vdm_pipeline(0)
    images = on_grid(4, 1, 8, 8)
    x, density, label = pipeline.bound_by_time(images, generator=torch.Generator().manual_seed(0), num_times=64)
    assert x.shape == density.shape == (64,) and 0 < x.min() and x.max() < 1
    with torch.no_grad():
        estimate = continuous_time_bound_estimate(
            pipeline.noise_schedule,
            clipped_estimate_model(pipeline.noise_schedule, lambda z, t: vdm_epsilon(pipeline.unet, z, t)),
            images,
            num_times=128,
            generator=torch.Generator().manual_seed(1),
        )
    diffusion = nats_to_bits_per_dim(estimate.terms.diffusion, 64).mean().item()
    standard_error = nats_to_bits_per_dim(estimate.standard_error, 64).pow(2).sum().sqrt().item() / 4
    assert standard_error < 0.05 * diffusion
    assert density.mean().item() == pytest.approx(diffusion, abs=3 * standard_error)  # the midpoint rule on [0, 1]
    assert f"diffusion {density.mean().item():.4f}" in label and "prior" in label and "reconstruction" in label


def test_vdm_density_of_a_linear_schedule_and_a_zero_network_is_the_constant_closed_form():
    pipeline = tiny_vdm_pipeline(0)
    pipeline.noise_schedule = NoiseSchedule(schedule_type="linear", gamma_min=-10.0, gamma_max=6.0)
    with torch.no_grad():
        for parameter in pipeline.unet.parameters():
            parameter.zero_()
    # eps_hat = 0: 1/2 gamma' E||eps||^2 = D (gamma_max - gamma_min) / 2 nats per unit t, (gamma_max - gamma_min)
    # / (2 ln 2) bits/dim; each point averages 16 images x 4 draws x 64 dims of eps^2 (relative sd 1.6 %, 0.35 %
    # for the mean of the 40 points)
    images = on_grid(16, 1, 8, 8)
    _, density, _ = pipeline.bound_by_time(
        images, generator=torch.Generator().manual_seed(0), num_times=40, clip_denoised=False
    )
    expected = 16.0 / (2 * math.log(2))
    assert density.mean().item() == pytest.approx(expected, rel=0.015)
    assert (density / expected - 1).abs().max().item() < 0.08


def test_the_vae_has_no_time_axis():
    assert has_time_axis(tiny_ddpm_pipeline(0)) and has_time_axis(tiny_vdm_pipeline(0))
    assert not has_time_axis(tiny_vae_pipeline(0)) and not hasattr(tiny_vae_pipeline(0), "bound_by_time")
    with pytest.raises(ValueError, match="num_times=0 and draws_per_time=4 must be at least 1"):
        tiny_vdm_pipeline(0).bound_by_time(on_grid(2, 1, 8, 8), num_times=0)
    with pytest.raises(ValueError, match="Images must be 8x8, got"):
        tiny_ddpm_pipeline(0).bound_by_time(on_grid(2, 1, 4, 4))


def test_plots_are_images():
    ddpm = plot_bound_by_time(torch.arange(10), torch.linspace(3.0, 0.1, 10, dtype=torch.float64), "a label")
    vdm = plot_bound_by_time(torch.linspace(0.05, 0.95, 10, dtype=torch.float64), torch.ones(10), "a label")
    history = [{"step": i, "loss": 1.0 / (i + 1), "lr": 1e-3} for i in range(1, 80)] + [{"step": 80}]
    loss = plot_loss_curve(history)
    for image in (ddpm, vdm, loss):
        assert isinstance(image, PIL.Image.Image) and image.mode == "RGB" and image.size == (700, 420)
    with pytest.raises(ValueError, match="grad_norm"):
        plot_loss_curve(history, keys=("grad_norm",))


def test_plots_without_matplotlib_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'hf_ddpm\[train\]'"):
        plot_loss_curve([{"step": 1, "loss": 1.0}])
