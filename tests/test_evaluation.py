"""evaluate_bound, the one way to measure a bound on a set of images: batching, the summary and its standard
error, and the stratified estimate of a diffusion model against the exact sum of all T terms, within error bars."""

from __future__ import annotations

import importlib
import inspect
import math
import warnings

import pytest
import torch

import hf_ddpm
from helpers import mnist_like_pixels, on_grid, public_pipeline_classes, tiny_pipeline_of, tiny_vae
from hf_ddpm import (
    BoundOptions,
    BoundResult,
    DenoisingUNet,
    HFDDPMPipeline,
    HFDDPMScheduler,
    VAEPipeline,
    evaluate_bound,
)
from hf_ddpm.evaluation import BatchBound, mean_and_standard_error
from hf_ddpm.pipelines import vdm as vdm_pipeline_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_pipeline() -> tuple[HFDDPMPipeline, torch.Tensor]:
    torch.manual_seed(0)
    unet = DenoisingUNet(
        sample_size=8, block_out_channels=(8, 16), attention_resolutions=(), learn_variance=True
    ).eval()
    with torch.no_grad():  # a non-trivial model: the output layer starts at zero
        unet.conv_out.weight.normal_(0, 0.05)
    scheduler = HFDDPMScheduler(
        num_train_timesteps=20, variance_type="learned_range", beta_schedule="linear", beta_end=0.2
    )
    pipeline = HFDDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = torch.randint(0, 256, (6, 1, 8, 8)).float() / 127.5 - 1.0
    return pipeline, images


class CountingPipeline:
    """The smallest pipeline evaluate_bound accepts: two deterministic terms per image, and a record of its batches."""

    image_channels = 1

    def __init__(self, iwae: bool = False):
        self.batches: list[int] = []
        self.iwae = iwae

    def bound_terms(
        self, images: torch.Tensor, options: BoundOptions, generator: torch.Generator | None
    ) -> BatchBound:
        self.batches.append(len(images))
        mean = images.flatten(1).mean(dim=1).double()
        terms = {"a": mean + 2.0, "b": 0.5 * mean**2}
        return BatchBound(terms=terms, estimator="counting", iwae=mean + 1.0 if self.iwae else None)


# ---------------------------------------------------------------------------------------------- the summary
def test_mean_and_standard_error():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, error = mean_and_standard_error(values)
    assert mean == pytest.approx(3.5, rel=1e-15)
    assert error == pytest.approx(math.sqrt(((values - 3.5) ** 2).sum().item() / 3) / 2, rel=1e-15)
    single_mean, single_error = mean_and_standard_error(torch.tensor([0.25]))
    assert single_mean == 0.25 and math.isnan(single_error)


def test_bound_result_summarises_its_per_image_terms():
    a, d = 1.25, 0.125
    result = BoundResult(
        per_image_terms={
            "x": torch.tensor([a - d - 1, a + d - 1], dtype=torch.float64),
            "y": torch.ones(2, dtype=torch.float64),
        },
        estimator="two images",
    )
    assert torch.equal(result.per_image, torch.tensor([a - d, a + d], dtype=torch.float64))
    assert result.num_images == 2 and result.bits_per_dim == a and result.standard_error == pytest.approx(d, rel=1e-15)
    assert result.terms == {"x": a - 1, "y": 1.0}
    assert result.to_dict() == {
        "bits_per_dim": a,
        "standard_error": result.standard_error,
        "terms": {"x": a - 1, "y": 1.0},
        "estimator": "two images",
        "num_images": 2,
    }
    with_iwae = BoundResult(
        result.per_image_terms, "two images", per_image_iwae=torch.tensor([0.5, 1.5], dtype=torch.float64)
    )
    summary = with_iwae.to_dict()
    assert summary["iwae_bits_per_dim"] == 1.0 and summary["iwae_standard_error"] == pytest.approx(0.5, rel=1e-15)


def test_evaluate_bound_batches_concatenates_and_reports_progress():
    pipeline = CountingPipeline(iwae=True)
    pixels = torch.randint(0, 256, (7, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seen = []

    def progress(batches):
        for batch in batches:
            seen.append(len(batch))
            yield batch

    result = evaluate_bound(pipeline, pixels.numpy(), batch_size=3, progress=progress)
    assert pipeline.batches == [3, 3, 1] and seen == [3, 3, 1]
    x = pixels[:, None].double() / 127.5 - 1  # uint8 arrays become the float images on the 8-bit grid
    mean = x.flatten(1).mean(dim=1)
    torch.testing.assert_close(result.per_image_terms["a"], mean + 2.0, rtol=1e-7, atol=0)
    assert result.per_image_terms["a"].dtype == torch.float64 and result.estimator == "counting"
    torch.testing.assert_close(result.per_image_iwae, mean + 1.0, rtol=1e-7, atol=0)
    assert result.num_images == 7 and set(result.to_dict()) >= {"iwae_bits_per_dim", "iwae_standard_error"}
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        evaluate_bound(pipeline, pixels.numpy(), batch_size=0)
    with pytest.raises(ValueError, match="No images given"):
        evaluate_bound(pipeline, torch.zeros(0, 1, 4, 4))


# ---------------------------------------------------------------------------------------------- diffusion models
def test_estimator_mean_matches_the_exact_sum_within_its_error_bars(small_pipeline):
    pipeline, images = small_pipeline
    # the exact bound is itself a one-draw-per-term estimate over x_t ~ q: average many draws for its expectation
    exact = torch.stack(
        [
            evaluate_bound(
                pipeline, images, BoundOptions(exact=True), generator=torch.Generator().manual_seed(s)
            ).per_image
            for s in range(30)
        ]
    )
    stratified = BoundOptions(timesteps_per_image=3)
    estimates = torch.stack(
        [
            evaluate_bound(pipeline, images, stratified, generator=torch.Generator().manual_seed(100 + s)).per_image
            for s in range(120)
        ]
    )
    for image in range(len(images)):
        difference = estimates[:, image].mean() - exact[:, image].mean()
        error = math.sqrt(estimates[:, image].var() / len(estimates) + exact[:, image].var() / len(exact))
        assert abs(difference) < 4.5 * error, (image, difference.item(), error)


def test_estimator_reports_a_standard_error_and_a_consistent_breakdown(small_pipeline):
    pipeline, images = small_pipeline
    result = evaluate_bound(
        pipeline, images, BoundOptions(timesteps_per_image=4), generator=torch.Generator().manual_seed(0)
    )
    assert result.num_images == 6
    assert result.estimator == (
        "unbiased stratified estimate of the full 20-term bound, 4 timesteps per image "
        "+ exact reconstruction and prior terms; x_0 estimate clipped to [-1, 1] in the denoising terms"
    )
    terms = result.terms
    assert list(terms) == ["prior", "denoising", "reconstruction"]
    assert result.bits_per_dim == pytest.approx(
        terms["prior"] + terms["denoising"] + terms["reconstruction"], rel=1e-12
    )
    assert result.standard_error == pytest.approx(result.per_image.std().item() / math.sqrt(6), rel=1e-12)
    exact = evaluate_bound(
        pipeline, images, BoundOptions(exact=True), batch_size=4, generator=torch.Generator().manual_seed(0)
    )
    assert exact.estimator == "exact: all 20 terms; x_0 estimate clipped to [-1, 1] in the denoising terms"
    assert exact.num_images == 6


def test_the_bound_is_of_the_training_chain_whatever_the_scheduler_samples_on(small_pipeline):
    pipeline, images = small_pipeline
    options = BoundOptions(timesteps_per_image=4)
    before = evaluate_bound(pipeline, images, options, generator=torch.Generator().manual_seed(1))
    pipeline(batch_size=1, num_inference_steps=5)  # leaves the scheduler respaced to 5 steps
    assert not pipeline.scheduler.chain.is_full
    after = evaluate_bound(pipeline, images, options, generator=torch.Generator().manual_seed(1))
    assert torch.equal(before.per_image, after.per_image)


# ---------------------------------------------------------------------------------------------- VAEs
def test_a_vae_reports_its_elbo_terms_and_the_iwae_bound():
    pipeline = VAEPipeline(tiny_vae(num_latent_layers=2))
    pixels = mnist_like_pixels(5)
    options = BoundOptions(elbo_samples=2, iwae_samples=3)
    result = evaluate_bound(
        pipeline, pixels.numpy(), options, batch_size=2, generator=torch.Generator().manual_seed(0)
    )
    assert list(result.terms) == ["reconstruction", "kl"] and result.num_images == 5
    assert result.estimator == "ELBO with 2 sample(s) of z; IWAE with K=3"
    summary = result.to_dict()
    assert summary["bits_per_dim"] == pytest.approx(sum(summary["terms"].values()), rel=1e-12)
    assert 0 < summary["iwae_bits_per_dim"] and result.per_image_iwae.shape == (5,)


# ---------------------------------------------------------------------------------------------- one protocol
#: Each pipeline's ``elbo`` without options: the bound its 0.1 ``elbo`` computed.
DEFAULT_OPTIONS = {
    "HFDDPMPipeline": BoundOptions(exact=True),
    "VDMPipeline": BoundOptions(exact=True),
    "VAEPipeline": BoundOptions(elbo_samples=1, iwae_samples=0),
}


@pytest.mark.parametrize("name", public_pipeline_classes())
def test_every_pipelines_elbo_has_one_signature_and_is_evaluate_bound_to_the_bit(name, monkeypatch):
    monkeypatch.setattr(vdm_pipeline_module, "VDM_EXACT_BOUND_STEPS", 20)  # T = 1000 in use; fewer steps here
    pipeline, _ = tiny_pipeline_of(name)
    signature = inspect.signature(type(pipeline).elbo)
    assert list(signature.parameters) == ["self", "images", "options", "batch_size", "generator"]
    assert signature == inspect.signature(HFDDPMPipeline.elbo) and signature.return_annotation == "BoundResult"
    assert pipeline.default_bound_options == DEFAULT_OPTIONS[name]
    images = on_grid(3, 1, 8, 8)
    for options in (None, BoundOptions(timesteps_per_image=2, elbo_samples=2, iwae_samples=3)):
        result = pipeline.elbo(images, options=options, generator=torch.Generator().manual_seed(0))
        direct = evaluate_bound(
            pipeline, images, options or DEFAULT_OPTIONS[name], generator=torch.Generator().manual_seed(0)
        )
        assert isinstance(result, BoundResult) and result.estimator == direct.estimator
        assert list(result.per_image_terms) == list(direct.per_image_terms)
        for term, values in direct.per_image_terms.items():
            assert values.dtype == torch.float64 and torch.equal(result.per_image_terms[term], values), term
        assert (
            (result.per_image_iwae is None)
            == (direct.per_image_iwae is None)
            == (name != "VAEPipeline" or not options)
        )
        if direct.per_image_iwae is not None:
            assert torch.equal(result.per_image_iwae, direct.per_image_iwae)
        assert result.bits_per_dim == direct.bits_per_dim and result.standard_error == direct.standard_error


def test_the_removed_output_types_resolve_from_hf_ddpm_with_a_warning_once(monkeypatch):
    monkeypatch.setattr(hf_ddpm, "_warned", set())
    assert set(hf_ddpm.REMOVED_IN_0_2) == {"ELBOOutput", "VAEELBOOutput", "IWAEOutput"}
    for name, module in hf_ddpm.REMOVED_IN_0_2.items():
        assert name not in hf_ddpm.__all__
        with pytest.warns(
            FutureWarning, match=rf"^hf_ddpm\.{name} leaves the top level in 0\.3\.0: .* from {module}\.$"
        ):
            resolved = getattr(hf_ddpm, name)
        assert resolved is getattr(importlib.import_module(module), name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert getattr(hf_ddpm, name) is resolved  # once
    with pytest.raises(AttributeError, match="has no attribute 'VDMLossTerms'"):
        hf_ddpm.VDMLossTerms  # noqa: B018


def test_draws_per_forward_fills_a_gpu_call_and_keeps_one_draw_a_call_elsewhere():
    from hf_ddpm.evaluation import GPU_FORWARD_IMAGES, draws_per_forward

    assert draws_per_forward(torch.device("cpu"), 256) == 1
    assert draws_per_forward(torch.device("cuda"), 256) == GPU_FORWARD_IMAGES // 256 == 16
    assert draws_per_forward(torch.device("cuda", 1), 3 * GPU_FORWARD_IMAGES) == 1
