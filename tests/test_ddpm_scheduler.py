"""HFDDPMScheduler, the sampling state, against diffusers' DDPMScheduler (and the schedulers that read its config):
respacing, ancestral sampling with the same noise, add_noise, configs, bad input."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from helpers import diffusers_in_float64
from hf_ddpm import HFDDPMScheduler, HFDDPMSchedulerOutput

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULES = [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


def toy_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a network: bounded, and different at every timestep."""
    return 0.8 * torch.tanh(sample) + 0.1 * math.cos(int(t) / 50.0)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to 1e-6 absolute (the issue's tolerance), of the same dtype and shape."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- vs diffusers
@pytest.mark.parametrize("ours, theirs", SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(ours, theirs):
    vdm, ddpm = HFDDPMScheduler(beta_schedule=ours), diffusers_in_float64(theirs)
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(1000)
    x0 = torch.rand(1000, 1, 2, 2, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(1000, 1, 2, 2, generator=generator, dtype=torch.float64)
    assert_close(vdm.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t))
    assert_close(vdm.get_velocity(x0, noise, t), ddpm.get_velocity(x0, noise, t))
    # the scheduler's add_noise is the training chain's, whatever it samples on
    vdm.set_timesteps(10)
    assert torch.equal(vdm.add_noise(x0, noise, t), vdm.train_chain.add_noise(x0, noise, t))
    # in float32 our constants (float64, cast at use) keep the float64 result to float32 rounding ...
    x0_32, noise_32 = x0.float(), noise.float()
    torch.testing.assert_close(
        vdm.add_noise(x0_32, noise_32, t), ddpm.add_noise(x0, noise, t).float(), rtol=1e-5, atol=1e-6
    )
    # ... and agree with diffusers as shipped (float32 constants) to float32 precision
    stock = DDPMScheduler(beta_schedule=theirs)
    torch.testing.assert_close(
        vdm.add_noise(x0_32, noise_32, t), stock.add_noise(x0_32, noise_32, t), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("ours, theirs", SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize(
    "steps, spacing, clip", [(None, "leading", True), (50, "leading", True), (37, "linspace", False)]
)
def test_sampling_chain_matches_diffusers_with_the_same_noise(
    ours, theirs, prediction_type, variance_type, steps, spacing, clip
):
    """Both schedulers run a whole reverse chain from the same x_T with equally seeded generators; every step's
    x_{t-1} and x_0 estimate agree. Both chains end at t = 0, where neither adds noise."""
    config = dict(
        prediction_type=prediction_type, variance_type=variance_type, timestep_spacing=spacing, clip_sample=clip
    )
    vdm, ddpm = HFDDPMScheduler(beta_schedule=ours, **config), diffusers_in_float64(theirs, **config)
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
    # return_dict=False gives the same two tensors as a tuple, (x_{t-1}, x_0 estimate)
    last = vdm.timesteps[-1]
    as_tuple = vdm.step(toy_model(ours_x, last), last, ours_x, return_dict=False)
    as_output = vdm.step(toy_model(ours_x, last), last, ours_x)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert torch.equal(as_tuple[0], as_output.prev_sample) and torch.equal(as_tuple[1], as_output.pred_original_sample)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [None, 100, [900, 600, 240, 100, 0]])
def test_learned_range_matches_diffusers(steps, prediction_type):
    """Both recompute beta_k = 1 - abar_{t_k} / abar_{t_{k-1}} on a respaced chain (by a count or custom timesteps),
    so the learned variances and the samples agree."""
    config = dict(variance_type="learned_range", timestep_spacing="leading", prediction_type=prediction_type)
    vdm, ddpm = HFDDPMScheduler(**config), diffusers_in_float64("linear", **config)
    if isinstance(steps, list):
        vdm.set_timesteps(timesteps=steps)
        ddpm.set_timesteps(timesteps=steps)
    elif steps:
        vdm.set_timesteps(steps)
        ddpm.set_timesteps(steps)
    chain = vdm.chain
    np.testing.assert_allclose(chain.betas[1:], 1 - chain.alphas_cumprod[1:] / chain.alphas_cumprod[:-1], rtol=1e-12)
    generator = torch.Generator().manual_seed(3)
    v = torch.rand(2, 1, 3, 3, generator=generator, dtype=torch.float64) * 2 - 1
    x = torch.zeros_like(v)
    for t in vdm.timesteps[:-1]:  # t > 0: diffusers' learned range at t = 0 starts from log(1e-20)
        torch.testing.assert_close(
            vdm.chain.model_log_variance(v, x, t), ddpm._get_variance(t, predicted_variance=v), rtol=1e-10, atol=0
        )
    ours_x = theirs_x = torch.randn(2, 1, 3, 3, generator=generator, dtype=torch.float64)
    ours_gen, theirs_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    ours_steps, theirs_steps = [], []
    for t in vdm.timesteps:
        ours_x = vdm.step(torch.cat([toy_model(ours_x, t), v], dim=1), t, ours_x, generator=ours_gen).prev_sample
        theirs_x = ddpm.step(
            torch.cat([toy_model(theirs_x, t), v], dim=1), t, theirs_x, generator=theirs_gen
        ).prev_sample
        ours_steps.append(ours_x)
        theirs_steps.append(theirs_x)
    assert_close(torch.stack(ours_steps), torch.stack(theirs_steps))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_respaced_timesteps_equal_diffusers(spacing, steps_offset):
    """The same spacing and offset give the same timesteps as diffusers' DDPMScheduler and DDIMScheduler (which a
    pipeline swaps in from our config), for every count, except where diffusers leaves the chain (refused, see
    test_ddpm_scheduler_dropin.py)."""
    for num_train in (50, 1000):
        ours = HFDDPMScheduler(num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=steps_offset)
        theirs = DDPMScheduler(num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=steps_offset)
        ddim = DDIMScheduler.from_config(ours.config)
        for n in (1, 2, 3, 7, 10, 25, 49, 50, 250, 333, 999, 1000):
            if n > num_train:
                continue
            theirs.set_timesteps(n)
            expected = theirs.timesteps
            if spacing == "leading" and int(expected[0]) >= num_train:
                continue  # refused: test_leading_offset_past_the_chain_is_refused
            if spacing == "trailing" and int(expected[-1]) < 0:
                continue  # test_trailing_drops_diffusers_spurious_minus_one
            ours.set_timesteps(n)
            ddim.set_timesteps(n)
            assert torch.equal(ours.timesteps, expected), (num_train, n)
            assert torch.equal(ours.timesteps, ddim.timesteps), ("DDIM", num_train, n)
            assert ours.num_inference_steps == theirs.num_inference_steps == n
            np.testing.assert_array_equal(ours.chain.timesteps, ours.timesteps.flip(0).numpy())


def test_configs_interchange_with_diffusers_schedulers():
    for schedule in ("linear", "cosine", "squaredcos_cap_v2"):
        ours = HFDDPMScheduler(
            num_train_timesteps=500, beta_schedule=schedule, beta_end=0.03, prediction_type="v_prediction"
        )
        for cls in (DDIMScheduler, DPMSolverMultistepScheduler, DDPMScheduler):
            theirs = cls.from_config(ours.config)
            assert theirs.config.num_train_timesteps == 500 and theirs.config.prediction_type == "v_prediction"
            assert (theirs.alphas_cumprod.double() - ours.alphas_cumprod).abs().max().item() <= 1e-6
    custom = DDPMScheduler(num_train_timesteps=300, beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    for config in (DDPMScheduler().config, DDPMScheduler(beta_end=0.03).config, custom.config):
        ours = HFDDPMScheduler.from_config(config)
        assert ours.config.prediction_type == config.prediction_type and len(ours) == config.num_train_timesteps
        assert (
            ours.alphas_cumprod - DDPMScheduler.from_config(config).alphas_cumprod.double()
        ).abs().max().item() <= 1e-6
    assert {DDIMScheduler, DPMSolverMultistepScheduler, DDPMScheduler} <= set(HFDDPMScheduler().compatibles)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_ddim_and_ddpm_built_from_our_config_share_our_schedule_and_timesteps(spacing):
    ours = HFDDPMScheduler(
        num_train_timesteps=200, beta_schedule="cosine", variance_type="learned_range", timestep_spacing=spacing
    )
    for cls in (DDIMScheduler, DDPMScheduler):
        theirs = cls.from_config(ours.config)
        assert theirs.config.timestep_spacing == spacing
        assert (theirs.alphas_cumprod.double() - ours.alphas_cumprod).abs().max().item() <= 1e-6
        for steps in (10, 37):
            ours.set_timesteps(steps)
            theirs.set_timesteps(steps)
            assert torch.equal(ours.timesteps, theirs.timesteps), (cls.__name__, steps)


# EDMEulerScheduler ignores beta_schedule (it has its own sigma schedule), so built from our config it samples another
# noise schedule. It is listed because diffusers' DDPMScheduler lists every Karras scheduler as compatible.
IGNORES_OUR_SCHEDULE = {"EDMEulerScheduler"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="ignores beta_schedule"))
        if n in IGNORES_OUR_SCHEDULE
        else n
        for n in HFDDPMScheduler._compatibles
    ],
)
# diffusers' schedulers pass tensors to numpy, which numpy 2 warns about once per element
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_each_compatible_name_is_a_diffusers_scheduler_that_reads_our_config(name):
    if name == "DPMSolverSDEScheduler":  # without torchsde diffusers exports a placeholder object under its name
        pytest.importorskip("torchsde", reason="diffusers' DPMSolverSDEScheduler needs torchsde")
    cls = getattr(diffusers, name)
    assert isinstance(cls, type) and issubclass(cls, SchedulerMixin), name
    ours = HFDDPMScheduler(num_train_timesteps=500, beta_schedule="cosine", prediction_type="v_prediction")
    theirs = cls.from_config(ours.config)
    assert theirs.config.num_train_timesteps == 500 and theirs.config.prediction_type == "v_prediction"
    assert hasattr(theirs, "alphas_cumprod"), f"{name} does not take its noise schedule from beta_schedule"
    assert (theirs.alphas_cumprod.double() - ours.alphas_cumprod).abs().max().item() <= 1e-6
    theirs.set_timesteps(10)
    assert len(theirs.timesteps) >= 10


# ---------------------------------------------------------------------------------------------- sampling state
def test_set_timesteps_builds_valid_chains_and_restores_the_full_one():
    scheduler = HFDDPMScheduler(num_train_timesteps=100)
    full = scheduler.chain
    assert full is scheduler.train_chain and scheduler.num_inference_steps is None
    scheduler.set_timesteps(10)
    assert scheduler.chain.timesteps[0] == 0 and scheduler.chain.timesteps[-1] == 99  # linspace spans the chain
    assert scheduler.num_inference_steps == 10 and scheduler.train_chain is full
    scheduler.set_timesteps(timesteps=[90, 40, 3])
    np.testing.assert_array_equal(scheduler.chain.timesteps, [3, 40, 90])
    assert scheduler.timesteps.tolist() == [90, 40, 3]
    abar = scheduler.alphas_cumprod.numpy()
    np.testing.assert_allclose(
        scheduler.chain.betas, 1 - abar[[3, 40, 90]] / np.array([1.0, abar[3], abar[40]]), rtol=1e-12
    )
    scheduler.set_timesteps(100)
    for name in ("timesteps", "betas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_array_equal(getattr(scheduler.chain, name), getattr(full, name))
    bad_requests = (
        dict(num_inference_steps=0),
        dict(num_inference_steps=101),
        dict(timesteps=[3, 40]),
        dict(timesteps=[100, 3]),
    )
    for bad in bad_requests:
        with pytest.raises(ValueError):
            scheduler.set_timesteps(**bad)


def test_step_returns_the_output_or_a_tuple_and_scale_model_input_is_the_identity():
    scheduler = HFDDPMScheduler(num_train_timesteps=20)
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    out = scheduler.step(toy_model(x, 10), 10, x, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, HFDDPMSchedulerOutput)
    prev, x0 = scheduler.step(toy_model(x, 10), 10, x, generator=torch.Generator().manual_seed(1), return_dict=False)
    assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)
    assert scheduler.scale_model_input(x, 10) is x and scheduler.init_noise_sigma == 1.0 and len(scheduler) == 20
    # no noise at the decoding step: the generator is not drawn from
    generator = torch.Generator().manual_seed(5)
    last = scheduler.step(toy_model(x, 0), 0, x, generator=generator)
    mean, _, _ = scheduler.chain.p_mean_variance(toy_model(x, 0), x, torch.tensor([0]), clip_denoised=True)
    assert torch.equal(last.prev_sample, mean)
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=torch.Generator().manual_seed(5)))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, choices",
    [
        ({"prediction_type": "noise"}, "'noise'.*epsilon, sample, v_prediction"),
        ({"variance_type": "fixed_medium"}, "'fixed_medium'.*fixed_small, fixed_large, learned_range"),
        ({"timestep_spacing": "even"}, "'even'.*linspace, leading, trailing"),
        ({"beta_schedule": "not_a_schedule"}, "'not_a_schedule'.*linear, scaled_linear, cosine, squaredcos_cap_v2"),
    ],
)
def test_unknown_names_are_rejected_with_the_choices(kwargs, choices):
    with pytest.raises(ValueError, match=choices):
        HFDDPMScheduler(**kwargs)


def test_timesteps_outside_the_chain_and_wrong_channel_counts_are_rejected():
    scheduler = HFDDPMScheduler()
    scheduler.set_timesteps(10)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(
        ValueError, match=r"Timestep\(s\) \[5\] are not in the chain \[999, 888, 777, 666, 555, 444, 333, 222\]"
    ):
        scheduler.step(x, 5, x)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        scheduler.chain.q_posterior_mean_variance(x, x, torch.tensor([1000]))
    with pytest.raises(ValueError, match="needs a model with C = 1 output channels"):
        scheduler.step(torch.zeros(1, 2, 2, 2), 999, x)
    learned = HFDDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="2\\*C = 2"):
        learned.step(x, 999, x)
    with pytest.raises(ValueError, match="num_train_timesteps must be at least 2"):
        HFDDPMScheduler(num_train_timesteps=1)
