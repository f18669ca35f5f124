"""HFDDPMScheduler as a drop-in for diffusers' DDPMScheduler: every overlapping feature against diffusers with the same
config, and every deliberate difference (the table in docs/diffusers_compatibility.md)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from hf_ddpm import HFDDPMScheduler
from hf_ddpm.ddpm.chain import DiffusionChain, dynamic_threshold
from hf_ddpm.ddpm.elbo import prior_term
from hf_ddpm.ddpm.scheduler import scheduler_from_config
from hf_ddpm.ddpm.schedules import BETA_SCHEDULES, make_betas, rescale_zero_terminal_snr, sigmoid_betas

T = 50


def pair(**config) -> tuple[HFDDPMScheduler, DDPMScheduler]:
    """Ours and diffusers' with the same config; diffusers' alphas_cumprod replaced by our float64 one, so that
    only the float32 arithmetic of the samples separates them."""
    config = {"num_train_timesteps": T, "timestep_spacing": "linspace", **config}
    ours, theirs = HFDDPMScheduler(**config), DDPMScheduler(**config)
    theirs.alphas_cumprod = ours.alphas_cumprod.clone()
    return ours, theirs


def fake_model(sample: torch.Tensor, t: int, learned: bool) -> torch.Tensor:
    """A deterministic stand-in for a UNet: a prediction (and, for learned_range, v in [-1, 1])."""
    prediction = torch.tanh(1.7 * sample) * (1.0 + t / T) + 0.1 * torch.cos(sample)
    if not learned:
        return prediction
    return torch.cat([prediction, torch.tanh(0.4 * sample + t / T - 0.5)], dim=1)


def sample_both(ours, theirs, learned=False, seed=0, shape=(2, 3, 4, 4)):
    """Run both reverse processes from the same x_T with generators of the same seed; yield per-step outputs."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(123))
    x_ours, x_theirs = x.clone(), x.clone()
    g_ours, g_theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for t in ours.timesteps.tolist():
        a = ours.step(fake_model(x_ours, t, learned), t, x_ours, generator=g_ours)
        b = theirs.step(fake_model(x_theirs, t, learned), t, x_theirs, generator=g_theirs)
        yield t, a, b
        x_ours, x_theirs = a.prev_sample, b.prev_sample


# ------------------------------------------------------------------------------------------------ step()
# (every step against diffusers with the same noise, and learned-range respacing: test_ddpm_scheduler.py)
def test_no_noise_at_a_last_step_above_zero():
    """trailing ends at t = 4 > 0 here: diffusers adds noise there (sqrt(beta_t) for fixed_large, ~1e-10 for
    fixed_small after its 1e-20 clamp); ours returns the mean, i.e. what diffusers' fixed_small returns."""
    ours, theirs_large = pair(variance_type="fixed_large", timestep_spacing="trailing")
    _, theirs_small = pair(variance_type="fixed_small", timestep_spacing="trailing")
    for s in (ours, theirs_large, theirs_small):
        s.set_timesteps(10)
    assert int(ours.timesteps[-1]) == 4
    steps_large = list(sample_both(ours, theirs_large))
    for _, a, b in steps_large[:-1]:
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=2e-5, rtol=1e-5)
    _, last_ours, last_large = steps_large[-1]
    x = steps_large[-2][1].prev_sample
    small = theirs_small.step(fake_model(x, 4, False), 4, x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(last_ours.prev_sample, small.prev_sample, atol=1e-6, rtol=1e-6)
    assert (last_ours.prev_sample - last_large.prev_sample).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ thresholding
def test_dynamic_threshold_is_diffusers_threshold_sample():
    x = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x[0] *= 0.1  # an image whose quantile is below 1: plain clipping to [-1, 1]
    _, theirs = pair(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    torch.testing.assert_close(dynamic_threshold(x, 0.9, 2.5), theirs._threshold_sample(x), atol=0, rtol=0)
    half = dynamic_threshold(x.half(), 0.9, 2.5)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, theirs._threshold_sample(x.half()))


def test_thresholding_in_step_matches_ddpm_and_takes_precedence_over_clip_sample():
    config = dict(
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=3.0,
        clip_sample=True,
        clip_sample_range=0.25,
        prediction_type="sample",
    )
    ours, theirs = pair(**config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    for _, a, b in sample_both(ours, theirs):
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=2e-5, rtol=1e-5)
    assert a.pred_original_sample.abs().max() > 0.25  # thresholded to [-1, 1], not clipped to the range


def test_thresholding_defaults_are_diffusers():
    ours, theirs = HFDDPMScheduler(), DDPMScheduler()
    for key in (
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "rescale_betas_zero_snr",
        "steps_offset",
        "clip_sample",
        "clip_sample_range",
        "variance_type",
        "prediction_type",
    ):
        assert ours.config[key] == theirs.config[key], key


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_rescale_zero_terminal_snr_matches_diffusers(schedule):
    betas = make_betas(schedule, 1000, 1e-4, 0.02)
    rescaled = rescale_zero_terminal_snr(betas)
    # float64 both; torch's and numpy's vectorised sqrt and cumprod round differently on different CPUs (seen: 2e-12
    # on an AMD EPYC, exact agreement to 1e-12 on an Intel Xeon), far below float32's 1e-7
    np.testing.assert_allclose(rescaled, diffusers_rescale(torch.from_numpy(betas)).numpy(), rtol=1e-10, atol=0)
    ours = HFDDPMScheduler(
        num_train_timesteps=1000, beta_schedule=schedule, rescale_betas_zero_snr=True, prediction_type="v_prediction"
    )
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, rescale_betas_zero_snr=True)
    assert ours.alphas_cumprod[-1] == 0.0 and ours.betas[-1] == 1.0 and ours.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), theirs.alphas_cumprod.double().numpy(), atol=2e-6)
    assert ours.alphas_cumprod[0].item() == pytest.approx(1 - betas[0], rel=1e-15)  # the first step is unchanged


def test_zero_terminal_snr_survives_the_bound_and_learned_range_sampling():
    config = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", variance_type="learned_range")
    ours, theirs = pair(**config)
    chain = DiffusionChain.from_config(ours.config)
    assert chain.train_alphas_cumprod[-1] == 0.0
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    assert torch.equal(prior_term(chain, x0), torch.zeros(3))  # q(x_T | x_0) = N(0, I) exactly
    log_var = chain.model_log_variance(torch.zeros(3, 1, 4, 4), x0, torch.full((3,), T - 1))
    assert torch.isfinite(log_var).all()
    for _, a, b in sample_both(ours, theirs, learned=True):
        assert torch.isfinite(a.prev_sample).all()
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=2e-5, rtol=1e-5)


def test_sigmoid_betas_match_diffusers():
    assert "sigmoid" in BETA_SCHEDULES
    ours = HFDDPMScheduler(num_train_timesteps=1000, beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(ours.betas.numpy(), theirs.betas.double().numpy(), rtol=1e-6)
    exact = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.02 - 1e-4) + 1e-4
    np.testing.assert_allclose(sigmoid_betas(1000, 1e-4, 0.02), exact.numpy(), rtol=1e-14)


def test_float64_constants_are_more_accurate_than_diffusers_float32():
    """At t = 1, 1 - abar_1 = beta_1 exactly; float32 keeps only ~1e-3 of its relative precision."""
    ours, theirs = HFDDPMScheduler(), DDPMScheduler()
    assert ours.alphas_cumprod.dtype == torch.float64 and theirs.alphas_cumprod.dtype == torch.float32
    ours_err = abs((1 - ours.alphas_cumprod[0].item()) / 1e-4 - 1)
    theirs_err = abs((1 - theirs.alphas_cumprod[0].double().item()) / 1e-4 - 1)
    assert ours_err < 1e-10 and theirs_err > 1e-4


# ------------------------------------------------------------------------------------------------ timesteps
# (every spacing, offset and count against DDPM and DDIM: test_ddpm_scheduler.py)
def test_default_timestep_spacing_is_linspace_not_leading():
    assert HFDDPMScheduler().config.timestep_spacing == "linspace"
    assert DDPMScheduler().config.timestep_spacing == "leading"


def test_trailing_drops_diffusers_spurious_minus_one():
    ours = HFDDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    theirs = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    ours.set_timesteps(61)
    theirs.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and int(theirs.timesteps[-1]) == -1
    assert torch.equal(ours.timesteps, theirs.timesteps[:-1]) and len(ours.timesteps) == 61


def test_previous_timestep_matches_ddpm_in_every_mode():
    ours, theirs = pair(timestep_spacing="leading")
    for t in (T - 1, 17, 0):  # before set_timesteps: t - 1
        assert ours.previous_timestep(t) == theirs.previous_timestep(t) == t - 1
    for kwargs in ({"num_inference_steps": 7}, {"timesteps": [40, 33, 20, 3]}, {"num_inference_steps": T}):
        ours.set_timesteps(**kwargs)
        theirs.set_timesteps(**kwargs)
        got = [int(ours.previous_timestep(t)) for t in ours.timesteps]
        assert got == [int(theirs.previous_timestep(t)) for t in theirs.timesteps]
        assert got == ours.timesteps.tolist()[1:] + [-1]
        assert isinstance(ours.previous_timestep(ours.timesteps[0]), torch.Tensor)
    assert ours.custom_timesteps is False
    ours.set_timesteps(timesteps=[9, 4])
    assert ours.custom_timesteps is True


def test_num_inference_steps_after_custom_timesteps_is_their_count():
    ours, theirs = pair()
    ours.set_timesteps(timesteps=[40, 20, 0])
    theirs.set_timesteps(timesteps=[40, 20, 0])
    assert ours.num_inference_steps == 3 and theirs.num_inference_steps is None


def test_both_arguments_raise_diffusers_error():
    ours, theirs = pair()
    with pytest.raises(ValueError) as theirs_error:
        theirs.set_timesteps(num_inference_steps=3, timesteps=[9, 4, 0])
    with pytest.raises(ValueError) as ours_error:
        ours.set_timesteps(num_inference_steps=3, timesteps=[9, 4, 0])
    assert str(ours_error.value) == str(theirs_error.value)
    with pytest.raises(ValueError, match="descending"):
        ours.set_timesteps(timesteps=[4, 9])


# ------------------------------------------------------------------------------------------------ config round trip
def test_decoder_min_std_samples_as_diffusers_and_travels_with_the_config(tmp_path, caplog, monkeypatch):
    """The decoder's floor enters the bound only (the last step adds no noise): with it, ours samples as diffusers'
    DDPMScheduler without it; saved and loaded, and through diffusers' schedulers' configs (without their warning
    that they ignore the key), the bound still reads it."""
    ours, theirs = pair(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
    ours = HFDDPMScheduler.from_config(ours.config, decoder_min_std=1e-3)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    for t, a, b in sample_both(ours, theirs, learned=True):
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=1e-6, msg=f"t={t}")
    ours.save_config(tmp_path)
    loaded = HFDDPMScheduler.from_pretrained(tmp_path)
    assert loaded.config.decoder_min_std == 1e-3 and loaded.train_chain.decoder_min_std == 1e-3
    monkeypatch.setattr(logging.getLogger("diffusers"), "propagate", True)  # diffusers' loggers stop at its root
    for cls in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler):
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            built = scheduler_from_config(cls, ours.config)
        assert isinstance(built, cls) and DiffusionChain.from_config(built.config).decoder_min_std == 1e-3
    assert "not expected" not in caplog.text


def test_todays_config_loads_unchanged_and_configs_cross_load(tmp_path):
    old = {
        "_class_name": "HFDDPMScheduler",
        "num_train_timesteps": 20,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": "learned_range",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    (tmp_path / "scheduler_config.json").write_text(json.dumps(old))
    loaded = HFDDPMScheduler.from_pretrained(tmp_path)
    assert loaded.config.thresholding is False and loaded.config.rescale_betas_zero_snr is False
    reference = HFDDPMScheduler(**{k: v for k, v in old.items() if k != "_class_name"})
    assert torch.equal(loaded.alphas_cumprod, reference.alphas_cumprod)
    theirs = DDPMScheduler(
        num_train_timesteps=20, thresholding=True, beta_schedule="sigmoid", timestep_spacing="trailing"
    )
    ours = HFDDPMScheduler.from_config(theirs.config)
    assert ours.config.thresholding and ours.config.beta_schedule == "sigmoid"
    assert set(theirs.config) - {"_use_default_values"} <= set(ours.config)
    assert DDPMScheduler.from_config(ours.config).config.thresholding


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5])
def test_betas_outside_the_open_interval_are_refused(bad):
    betas = np.full(T, 0.01)
    betas[7] = bad
    DDPMScheduler(num_train_timesteps=T, trained_betas=betas)  # accepted there
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\) so that q\(x_t \| x_\{t-1\}\) is a proper Gaussian"):
        HFDDPMScheduler(num_train_timesteps=T, trained_betas=betas)


def test_a_single_timestep_is_refused():
    DDPMScheduler(num_train_timesteps=1)
    with pytest.raises(ValueError, match=r"at least 2 \(got 1\): the decoder p\(x_0 \| x_1\) takes its clipped"):
        HFDDPMScheduler(num_train_timesteps=1)


@pytest.mark.parametrize(
    "name,why",
    [
        ("fixed_small_log", "samples exactly as 'fixed_small'"),
        ("fixed_large_log", r"square root of log beta_t"),
        ("learned", "unbounded raw variance"),
    ],
)
def test_diffusers_only_variance_types_are_refused_with_a_reason(name, why):
    DDPMScheduler(num_train_timesteps=T, variance_type=name)
    with pytest.raises(ValueError, match=rf"variance_type='{name}' is not supported: .*{why}") as error:
        HFDDPMScheduler(num_train_timesteps=T, variance_type=name)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="Unknown variance_type 'wide'"):
        HFDDPMScheduler(num_train_timesteps=T, variance_type="wide")


def test_epsilon_at_zero_terminal_snr_is_refused():
    theirs = DDPMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=True, clip_sample=False)
    x = torch.randn(1, 1, 2, 2)
    assert not torch.isfinite(theirs.step(torch.randn(1, 1, 2, 2), T - 1, x).pred_original_sample).all()
    with pytest.raises(ValueError, match=r"prediction_type='epsilon' cannot decode at zero terminal SNR"):
        HFDDPMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=True)


def test_leading_offset_past_the_chain_is_refused():
    theirs = DDPMScheduler(num_train_timesteps=T, steps_offset=1)
    theirs.set_timesteps(T)
    assert int(theirs.timesteps[0]) == T  # one past the end: diffusers' step would index out of range
    ours = HFDDPMScheduler(num_train_timesteps=T, timestep_spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match=r"steps_offset=1 gives timesteps in \[1, 50\], outside the chain's"):
        ours.set_timesteps(T)


def test_the_refused_log_variance_types_are_redundant_or_broken_in_diffusers():
    x, out = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    names = ("fixed_small", "fixed_small_log", "fixed_large_log")
    small, small_log, large_log = (DDPMScheduler(num_train_timesteps=T, variance_type=v) for v in names)
    a = small.step(out, 20, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = small_log.step(out, 20, x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(a, b)
    assert torch.isnan(large_log.step(out, 20, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
