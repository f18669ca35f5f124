"""diffusers' ``callback_on_step_end`` in HFDDPMPipeline and VDMPipeline: the callback sees every step's tensors of
the seeded chain, a returned ``latents`` replaces x, and a tensor the pipeline does not offer is refused before any
step; the scheduler choices of ``with_scheduler``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.callbacks import PipelineCallback

from helpers import tiny_ddpm_pipeline, tiny_vae_pipeline, tiny_vdm_pipeline
from hf_ddpm.image_utils import model_range_to_output
from hf_ddpm.pipelines.auto import with_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
ALL_TENSORS = ["latents", "sample", "pred_original_sample"]
#: The tiny pipelines and the samplers each is run with.
CASES = [("ddpm", "vdm"), ("ddpm", "ddim"), ("ddpm", "dpm"), ("vdm", "ancestral"), ("vdm", "ddim")]


def tiny(kind: str, scheduler: str):
    pipeline = {"ddpm": tiny_ddpm_pipeline, "vdm": tiny_vdm_pipeline}[kind](seed=2)
    return with_scheduler(pipeline, scheduler)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(11)


def run(pipeline, callback=None, names=ALL_TENSORS) -> np.ndarray:
    call = {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": names} if callback else {}
    return pipeline(batch_size=2, generator=seeded(), num_inference_steps=STEPS, output_type="np", **call).images


@pytest.mark.parametrize("kind, scheduler", CASES)
def test_the_callback_sees_every_step_of_the_seeded_chain(kind: str, scheduler: str) -> None:
    pipeline = tiny(kind, scheduler)
    seen = []

    def keep(pipe, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        assert pipe is pipeline and set(callback_kwargs) == set(ALL_TENSORS)
        seen.append((step_index, timestep.item(), {k: v.clone() for k, v in callback_kwargs.items()}))
        return {}

    images = run(pipeline, keep)
    np.testing.assert_array_equal(images, run(pipeline))  # watching changes nothing
    assert [index for index, _, _ in seen] == list(range(len(pipeline.scheduler.timesteps)))
    assert [t for _, t, _ in seen] == pipeline.scheduler.timesteps.tolist()
    # x_T is the seed's N(0, I) draw; each step starts where the one before ended; the last ends at the images
    config = pipeline.unet.config
    noise = torch.randn((2, config.in_channels, config.sample_size, config.sample_size), generator=seeded())
    assert torch.equal(seen[0][2]["sample"], noise * pipeline.scheduler.init_noise_sigma)
    for (_, _, before), (_, _, after) in zip(seen, seen[1:]):
        assert torch.equal(after["sample"], before["latents"])
    np.testing.assert_array_equal(model_range_to_output(seen[-1][2]["latents"], "np"), images)


def test_dpm_solver_gets_the_x0_of_the_training_chain() -> None:
    """DPM-Solver's step estimates no x_0; the callback gets (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)."""
    pipeline = tiny("ddpm", "dpm")
    seen = []
    run(pipeline, lambda pipe, i, t, kwargs: seen.append((t, kwargs)) or {})
    abar = pipeline.scheduler.alphas_cumprod.double()
    for t, kwargs in seen:
        eps = pipeline.unet(kwargs["sample"], t).sample[:, :1].double()
        expected = (kwargs["sample"].double() - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        torch.testing.assert_close(kwargs["pred_original_sample"].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, scheduler", [("ddpm", "vdm"), ("vdm", "ancestral")])
def test_returned_latents_replace_the_chain(kind: str, scheduler: str) -> None:
    pipeline = tiny(kind, scheduler)

    def to_gray(pipe, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        latents = callback_kwargs["latents"]
        return {"latents": torch.zeros_like(latents)} if step_index == STEPS - 1 else {"latents": latents}

    images = run(pipeline, to_gray, ["latents"])
    assert np.all(images == 0.5)  # x = 0 is mid-gray, (0 + 1) / 2

    def restart(pipe, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        return {"latents": -callback_kwargs["latents"]} if step_index == 0 else {}

    assert not np.allclose(run(pipeline, restart, ["latents"]), run(pipeline))


def test_a_pipeline_callback_brings_its_own_tensor_names() -> None:
    class Record(PipelineCallback):
        tensor_inputs = ["sample"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            calls.append(sorted(callback_kwargs))
            return {}

    calls = []
    pipeline = tiny_ddpm_pipeline(seed=2)
    run(pipeline, Record(), ["latents"])
    assert calls == [["sample"]] * len(pipeline.scheduler.timesteps)


@pytest.mark.parametrize("kind", ["ddpm", "vdm"])
def test_an_unknown_tensor_is_refused_before_any_step(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = tiny(kind, "ddim")
    monkeypatch.setattr(pipeline.unet, "forward", lambda *a, **k: pytest.fail("ran a step"))
    with pytest.raises(ValueError) as error:
        run(pipeline, lambda *a: {}, ["latents", "prompt_embeds"])
    assert str(error.value) == (
        f"callback_on_step_end_tensor_inputs ['prompt_embeds'] are not offered by {type(pipeline).__name__}: "
        "choose from latents, sample, pred_original_sample."
    )


def test_with_scheduler_offers_each_pipeline_its_own_choices() -> None:
    ddpm, vdm, vae = tiny_ddpm_pipeline(), tiny_vdm_pipeline(), tiny_vae_pipeline()
    assert list(ddpm.scheduler_choices) == ["vdm", "ddpm", "ddim", "dpm"]
    assert list(vdm.scheduler_choices) == ["ancestral", "ddim"] and vae.scheduler_choices == {}
    for name, expected in [("vdm", "HFDDPMScheduler"), ("dpm", "DPMSolverMultistepScheduler")]:
        copy = with_scheduler(ddpm, name)
        assert type(copy.scheduler).__name__ == expected and copy.unet is ddpm.unet
        assert copy.scheduler.config.num_train_timesteps == ddpm.scheduler.config.num_train_timesteps
    with pytest.raises(ValueError, match=r"^scheduler must be one of ancestral, ddim, got 'dpm'\.$"):
        with_scheduler(vdm, "dpm")
    with pytest.raises(ValueError, match=r"^scheduler 'ddim': a VAEPipeline samples without a scheduler\.$"):
        with_scheduler(vae, "ddim")
