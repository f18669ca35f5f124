"""HFDDPMPipeline: sampling against diffusers' schedulers, save/load, output types and the ELBO of images."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

import hf_ddpm
from helpers import on_grid
from hf_ddpm import DenoisingUNet, HFDDPMPipeline, HFDDPMScheduler
from hf_ddpm.ddpm.chain import DiffusionChain
from hf_ddpm.ddpm.elbo import full_elbo
from hf_ddpm.evaluation import BoundOptions, BoundResult, evaluate_bound
from hf_ddpm.hub.registration import HFDDPMRegistrationMixin

pytestmark = pytest.mark.usefixtures("one_thread")

T = 20
SIZE = 8


def tiny_unet(learn_variance: bool = True, perturb: bool = True) -> DenoisingUNet:
    """A tiny U-Net; its output layer starts at zero, so ``perturb`` gives it a non-trivial output."""
    torch.manual_seed(0)
    unet = DenoisingUNet(
        sample_size=SIZE, block_out_channels=(8, 16), attention_resolutions=(4,), learn_variance=learn_variance
    )
    if perturb:
        with torch.no_grad():
            unet.conv_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return unet.eval()


def make_pipeline(unet: DenoisingUNet, scheduler: SchedulerMixin) -> HFDDPMPipeline:
    """A pipeline of ``unet`` and ``scheduler`` without progress bars."""
    pipeline = HFDDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipeline() -> HFDDPMPipeline:
    """A tiny learned-variance pipeline with a T = 20 chain."""
    return make_pipeline(tiny_unet(), HFDDPMScheduler(num_train_timesteps=T, variance_type="learned_range"))


def sample(pipeline: HFDDPMPipeline, seed: int, steps: int = T, **kwargs: Any) -> Any:
    """Three images drawn with a generator seeded with ``seed``."""
    return pipeline(
        batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs
    ).images


# ---------------------------------------------------------------------------------------------- sampling
def test_same_generator_gives_identical_images(pipeline):
    first, again, other = (sample(pipeline, seed, output_type="pt") for seed in (1, 1, 2))
    assert first.shape == (3, 1, SIZE, SIZE)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 0.1


@pytest.mark.parametrize("learn_variance", [True, False])
def test_sampling_equals_diffusers_ddpm_scheduler_with_the_same_noise(learn_variance):
    """The same model and generator, with our scheduler or diffusers' DDPMScheduler built from its config, gives the
    same images (to diffusers' float32 schedule constants)."""
    variance_type = "learned_range" if learn_variance else "fixed_small"
    ours = make_pipeline(
        tiny_unet(learn_variance), HFDDPMScheduler(num_train_timesteps=T, variance_type=variance_type)
    )
    theirs = make_pipeline(ours.unet, DDPMScheduler.from_config(ours.scheduler.config))
    assert theirs.scheduler.config.variance_type == variance_type
    a, b = sample(ours, 3, output_type="pt"), sample(theirs, 3, output_type="pt")
    assert 0.01 < a.std() and torch.equal(ours.scheduler.timesteps, theirs.scheduler.timesteps)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_ddim_swap_gives_the_closed_form_of_a_zero_noise_prediction():
    """A fresh DenoisingUNet outputs exactly 0 (zero-initialised output layer). Deterministic DDIM with eps = 0
    maps x_T to clip(x_T / sqrt(abar_top), -1, 1) at the first step and keeps it, so the image is that, rescaled."""
    base = make_pipeline(
        tiny_unet(perturb=False), HFDDPMScheduler(num_train_timesteps=T, variance_type="learned_range")
    )
    ddim = make_pipeline(base.unet, DDIMScheduler.from_config(base.scheduler.config))
    assert (ddim.scheduler.alphas_cumprod.double() - base.scheduler.alphas_cumprod).abs().max().item() <= 1e-6
    images = sample(ddim, 4, steps=5, output_type="pt")
    top = int(ddim.scheduler.timesteps[0])
    x_T = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    expected = (x_T / ddim.scheduler.alphas_cumprod[top].sqrt()).clamp(-1, 1) / 2 + 0.5
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def test_ddim_swap_with_a_learned_variance_model_returns_images_in_range(pipeline):
    ddim = make_pipeline(pipeline.unet, DDIMScheduler.from_config(pipeline.scheduler.config))
    images = sample(ddim, 5, steps=5, output_type="pt")
    assert images.shape == (3, 1, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1 and images.std() > 0.01
    assert torch.equal(images, sample(ddim, 5, steps=5, output_type="pt"))


def test_output_types_hold_the_same_images(pipeline):
    pt = sample(pipeline, 6, steps=4, output_type="pt")
    array = sample(pipeline, 6, steps=4, output_type="np")
    pil = sample(pipeline, 6, steps=4)
    assert isinstance(array, np.ndarray) and array.shape == (3, SIZE, SIZE, 1)
    np.testing.assert_array_equal(array, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 3 and all(image.size == (SIZE, SIZE) and image.mode == "L" for image in pil)
    pixels = np.stack([np.asarray(image) for image in pil])
    np.testing.assert_array_equal(pixels, (array[..., 0] * 255).round().astype(np.uint8))
    generator = torch.Generator().manual_seed(6)
    (as_tuple,) = pipeline(
        batch_size=3, num_inference_steps=4, generator=generator, output_type="pt", return_dict=False
    )
    assert torch.equal(as_tuple, pt)
    with pytest.raises(ValueError, match="'pil', 'np' or 'pt'"):
        pipeline(output_type="latent")


def test_images_are_clamped_to_the_unit_range_when_the_sampler_does_not_clip(pipeline):
    scheduler = HFDDPMScheduler(num_train_timesteps=T, variance_type="learned_range", clip_sample=False)
    unclipped = make_pipeline(pipeline.unet, scheduler)
    images = sample(unclipped, 8, output_type="pt")
    assert images.min() == 0 and images.max() == 1  # x_0 beyond [-1, 1] is clamped, not wrapped or rescaled
    inside = (images > 0) & (images < 1)
    assert inside.float().mean() > 0.2


# ---------------------------------------------------------------------------------------------- save and load
def test_save_and_load_round_trip_with_our_classes(pipeline, tmp_path):
    before = sample(pipeline, 7, output_type="pt")
    pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["hf_ddpm", "DenoisingUNet"] and index["scheduler"] == ["hf_ddpm", "HFDDPMScheduler"]
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin"))
    # diffusers' own component loader resolves hf_ddpm classes and checks them against the base classes it looks up
    # by name in the hf_ddpm module: they must be there, and be diffusers' own
    assert hf_ddpm.ModelMixin is ModelMixin and hf_ddpm.SchedulerMixin is SchedulerMixin
    loaders = {
        "HFDDPMPipeline.from_pretrained": HFDDPMPipeline.from_pretrained,
        "diffusers' DiffusionPipeline.from_pretrained": super(HFDDPMRegistrationMixin, HFDDPMPipeline).from_pretrained,
    }
    for name, load in loaders.items():
        loaded = load(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert isinstance(loaded, DiffusionPipeline), name
        assert type(loaded.unet) is DenoisingUNet and type(loaded.scheduler) is HFDDPMScheduler, name
        public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.scheduler.config) == public(pipeline.scheduler.config), name
        for key, value in pipeline.unet.state_dict().items():
            assert torch.equal(loaded.unet.state_dict()[key], value), (name, key)
        assert torch.equal(sample(loaded, 7, output_type="pt"), before), name


# ---------------------------------------------------------------------------------------------- the ELBO of images
def test_elbo_adds_up_equals_the_bound_and_ignores_a_respaced_sampler(pipeline):
    pixels = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = pixels[:, None].float() / 127.5 - 1
    result = pipeline.elbo(images, generator=torch.Generator().manual_seed(0))
    assert isinstance(result, BoundResult) and result.per_image_iwae is None
    assert list(result.per_image_terms) == ["prior", "denoising", "reconstruction"]
    parts = tuple(result.per_image_terms.values())
    assert result.per_image.shape == (3,) and all(part.shape == (3,) for part in parts)
    torch.testing.assert_close(result.per_image, sum(parts), rtol=1e-12, atol=0)
    assert (result.per_image_terms["denoising"] > 0).all() and (result.per_image_terms["reconstruction"] > 0).all()
    # the same bound computed directly: every one of the T terms, the x_0 estimate clipped (BoundOptions' default)
    chain = HFDDPMScheduler(num_train_timesteps=T, variance_type="learned_range").train_chain
    direct = {
        clip: full_elbo(
            chain,
            lambda x_t, t: pipeline.unet(x_t.float(), t).sample,
            images,
            generator=torch.Generator().manual_seed(0),
            clip_denoised=clip,
        )
        for clip in (True, False)
    }
    torch.testing.assert_close(result.per_image, direct[True].bits_per_dim, rtol=1e-12, atol=0)
    for name, term in (
        ("prior", "prior_term"),
        ("denoising", "denoising_terms"),
        ("reconstruction", "reconstruction_term"),
    ):
        assert torch.equal(result.per_image_terms[name], getattr(direct[True], term)), name
    unclipped = evaluate_bound(
        pipeline, images, BoundOptions(exact=True, clip_denoised=False), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(unclipped.per_image, direct[False].bits_per_dim, rtol=1e-12, atol=0)
    assert (direct[True].bits_per_dim <= direct[False].bits_per_dim).all()
    sample(pipeline, 0, steps=5)  # leaves the pipeline's scheduler respaced to 5 steps
    assert len(pipeline.scheduler.chain.timesteps) == 5
    after = pipeline.elbo(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(after.per_image, result.per_image)
    # the pipeline's elbo is evaluate_bound's exact bound, image by image
    bound = evaluate_bound(pipeline, images, BoundOptions(exact=True), generator=torch.Generator().manual_seed(0))
    assert torch.equal(bound.per_image, result.per_image)
    assert torch.equal(bound.per_image_terms["denoising"], result.per_image_terms["denoising"])


def test_train_chain_is_the_configs_full_chain_and_bound_terms_name_their_estimator(pipeline):
    chain = pipeline.train_chain
    assert isinstance(chain, DiffusionChain) and chain.is_full and chain.num_train_timesteps == T
    assert (chain.prediction_type, chain.variance_type) == ("epsilon", "learned_range")
    np.testing.assert_array_equal(chain.train_alphas_cumprod, pipeline.scheduler.train_chain.train_alphas_cumprod)
    assert pipeline.image_channels == 1
    images = -torch.ones(2, 1, SIZE, SIZE)
    exact = pipeline.bound_terms(images, BoundOptions(exact=True), torch.Generator().manual_seed(0))
    assert exact.estimator == f"exact: all {T} terms; x_0 estimate clipped to [-1, 1] in the denoising terms"
    assert exact.iwae is None
    assert list(exact.terms) == ["prior", "denoising", "reconstruction"]
    stratified = pipeline.bound_terms(images, BoundOptions(timesteps_per_image=3), torch.Generator().manual_seed(0))
    assert stratified.estimator == (
        f"unbiased stratified estimate of the full {T}-term bound, 3 timesteps per image "
        "+ exact reconstruction and prior terms; x_0 estimate clipped to [-1, 1] in the denoising terms"
    )
    assert all(values.dtype == torch.float64 and values.shape == (2,) for values in stratified.terms.values())


def test_a_bound_evaluated_several_timesteps_a_call_is_the_same(pipeline, monkeypatch):
    """With several timesteps per network call (what ``draws_per_forward`` gives on a CUDA device), the stratified
    estimate is the same (the same timesteps and noise; float32 network outputs at another batch size)."""
    from hf_ddpm.pipelines import ddpm

    images, options = on_grid(4, 1, SIZE, SIZE, seed=5), BoundOptions(timesteps_per_image=6)
    one = evaluate_bound(pipeline, images, options, generator=torch.Generator().manual_seed(3))
    widths = []
    forward = pipeline.unet.forward
    monkeypatch.setattr(ddpm, "draws_per_forward", lambda device, batch: 4)
    monkeypatch.setattr(pipeline.unet, "forward", lambda x, t: widths.append(len(x)) or forward(x, t))
    many = evaluate_bound(pipeline, images, options, generator=torch.Generator().manual_seed(3))
    assert widths == [16, 8, 4]  # strata 1-4, strata 5-6, then the reconstruction term's 4 images
    torch.testing.assert_close(many.per_image, one.per_image, rtol=1e-6, atol=0)


def test_elbo_accepts_uint8_arrays_and_pil_images_and_rejects_off_grid_floats(pipeline):
    pixels = torch.randint(0, 256, (2, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    reference = pipeline.elbo(
        pixels[:, None].float() / 127.5 - 1, generator=torch.Generator().manual_seed(3)
    ).per_image
    inputs = {
        "uint8 (N, H, W)": pixels.numpy(),
        "uint8 (N, H, W, C)": pixels[..., None].numpy(),
        "PIL images": [PIL.Image.fromarray(p.numpy()) for p in pixels],
    }
    for name, images in inputs.items():
        assert torch.equal(pipeline.elbo(images, generator=torch.Generator().manual_seed(3)).per_image, reference), (
            name
        )
    off_grid = pixels[:, None].double() / 127.5 - 1
    off_grid[0, 0, 0, 0] = 100.3 / 127.5 - 1  # between the pixel values 100 and 101
    with pytest.raises(ValueError, match="256-level grid of 8-bit data"):
        pipeline.elbo(off_grid)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        pipeline.elbo(off_grid.clamp(-1, 1) * 1.5)
    with pytest.raises(ValueError, match="8x8"):
        pipeline.elbo(-torch.ones(1, 1, 4, 4))
