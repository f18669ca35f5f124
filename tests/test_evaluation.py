"""The stratified bound estimator is unbiased for the exact sum of all T terms, within its error bars."""

import math

import pytest
import torch

from hf_ddpm import DenoisingUNet, VDMScheduler
from hf_ddpm.evaluation import estimate_bound, exact_bound, strata


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    unet = DenoisingUNet(sample_size=8, block_out_channels=(8, 16), attention_resolutions=(), learn_variance=True).eval()
    with torch.no_grad():  # a non-trivial model: the output layer starts at zero
        unet.conv_out.weight.normal_(0, 0.05)
    scheduler = VDMScheduler(num_train_timesteps=20, variance_type="learned_range", beta_schedule="linear", beta_end=0.2)
    images = (torch.randint(0, 256, (6, 1, 8, 8)).float() / 127.5 - 1.0)
    return unet, scheduler, images


def model_fn_of(unet):
    return lambda x_t, t: unet(x_t.float(), t).sample


def test_strata_cover_every_denoising_timestep_once():
    groups = strata(1000, 8)
    assert torch.equal(torch.cat(groups), torch.arange(1, 1000))
    assert max(len(g) for g in groups) - min(len(g) for g in groups) <= 1
    with pytest.raises(ValueError, match="between 1 and T-1 = 999"):
        strata(1000, 1000)


def test_estimator_mean_matches_the_exact_sum_within_its_error_bars(small_model):
    unet, scheduler, images = small_model
    model_fn = model_fn_of(unet)
    # the exact bound is itself a one-draw-per-term estimate over x_t ~ q: average many draws for its expectation
    exact = torch.stack([exact_bound(scheduler, model_fn, images, generator=torch.Generator().manual_seed(s)).per_image for s in range(30)])
    estimates = torch.stack([
        estimate_bound(scheduler, model_fn, images, timesteps_per_image=3, generator=torch.Generator().manual_seed(100 + s)).per_image
        for s in range(120)
    ])
    for image in range(len(images)):
        difference = estimates[:, image].mean() - exact[:, image].mean()
        error = math.sqrt(estimates[:, image].var() / len(estimates) + exact[:, image].var() / len(exact))
        assert abs(difference) < 4.5 * error, (image, difference.item(), error)


def test_estimator_reports_a_standard_error_and_a_consistent_breakdown(small_model):
    unet, scheduler, images = small_model
    result = estimate_bound(scheduler, model_fn_of(unet), images, timesteps_per_image=4, generator=torch.Generator().manual_seed(0))
    assert result.num_images == 6 and result.timesteps_per_image == 4
    assert result.bits_per_dim == pytest.approx(result.prior_term + result.denoising_terms + result.reconstruction_term, rel=1e-12)
    assert result.standard_error == pytest.approx(result.per_image.std().item() / math.sqrt(6), rel=1e-12)


def test_estimator_refuses_a_respaced_chain(small_model):
    unet, _, images = small_model
    respaced = VDMScheduler(num_train_timesteps=20)
    respaced.set_timesteps(5)
    with pytest.raises(ValueError, match="needs the full chain"):
        estimate_bound(respaced, model_fn_of(unet), images)
