"""Noise schedules (hf_ddpm.ddpm.schedules): closed forms, diffusers' schedules, float64 precision and bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from hf_ddpm import HFDDPMScheduler
from hf_ddpm.ddpm.schedules import BETA_SCHEDULES, betas_from_config, cosine_betas, linear_betas, make_betas

pytestmark = pytest.mark.usefixtures("one_thread")


def cosine_alpha_bar(s: np.ndarray) -> np.ndarray:
    """Nichol & Dhariwal's alpha_bar(s) = cos^2(((s + 0.008) / 1.008) pi / 2), written out here independently."""
    return np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2


def test_linear_schedule_is_ho_et_al_and_ends_near_the_standard_normal():
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == pytest.approx(0.02, rel=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    abar = HFDDPMScheduler().alphas_cumprod.numpy()
    # prod_t (1 - beta_t) with beta_t = 1e-4 + (t - 1) (0.02 - 1e-4) / 999, as an explicit product
    expected = math.prod(1.0 - (1e-4 + (t - 1) * (0.02 - 1e-4) / 999) for t in range(1, 1001))
    assert abar[-1] == pytest.approx(expected, rel=1e-12)
    assert round(abar[-1], 7) == 4.04e-5


def test_cosine_schedule_follows_alpha_bar_until_the_clip_at_0_999():
    T = 1000
    betas = cosine_betas(T)
    abar = np.cumprod(1.0 - betas)
    s = np.arange(1, T + 1) / T
    unclipped = betas < 0.999
    assert unclipped[:-1].all() and betas[-1] == 0.999  # alpha_bar(1) = 0: only the last step is clipped
    np.testing.assert_allclose(abar[unclipped], (cosine_alpha_bar(s) / cosine_alpha_bar(0.0))[unclipped], rtol=1e-10)
    assert abar[-1] == pytest.approx(abar[-2] * 0.001, rel=1e-12)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("linear", "linear"),
        ("cosine", "squaredcos_cap_v2"),
        ("squaredcos_cap_v2", "squaredcos_cap_v2"),
        ("scaled_linear", "scaled_linear"),
    ],
)
def test_schedules_equal_diffusers(ours, theirs):
    ends = dict(beta_start=0.00085, beta_end=0.012) if ours == "scaled_linear" else {}  # latent diffusion's
    vdm, ddpm = HFDDPMScheduler(beta_schedule=ours, **ends), DDPMScheduler(beta_schedule=theirs, **ends)
    # diffusers keeps float32: equal to its rounding
    np.testing.assert_allclose(vdm.betas.numpy(), ddpm.betas.double().numpy(), rtol=3e-7)
    assert (vdm.alphas_cumprod - ddpm.alphas_cumprod.double()).abs().max().item() <= 1e-6
    assert vdm.config.beta_schedule == theirs  # "cosine" is recorded under diffusers' name


def test_schedule_constants_are_float64():
    """In float32, 1 - alphas_cumprod[0] = 1e-4 would be off by ~1e-4 relative (float32 spacing near 1 is 6e-8)."""
    scheduler = HFDDPMScheduler()
    assert scheduler.alphas_cumprod.dtype == torch.float64
    assert 1.0 - scheduler.alphas_cumprod[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert 1.0 - scheduler.chain.alphas_cumprod[1] == pytest.approx(
        1 - (1 - 1e-4) * (1 - (1e-4 + 0.0199 / 999)), rel=1e-11
    )


def test_trained_betas_are_used_exactly_and_validated():
    betas = np.linspace(0.01, 0.3, 7) ** 1.5
    scheduler = HFDDPMScheduler(num_train_timesteps=7, trained_betas=betas.tolist(), beta_schedule="not-used")
    np.testing.assert_array_equal(scheduler.betas.numpy(), betas)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-15)
    with pytest.raises(ValueError, match="num_train_timesteps=8"):
        make_betas("linear", 8, trained_betas=betas)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        make_betas("linear", 3, trained_betas=[0.1, 1.0, 0.2])


def test_betas_from_config_reads_ours_and_diffusers_configs_with_diffusers_defaults():
    ours = HFDDPMScheduler(num_train_timesteps=50, beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.03)
    np.testing.assert_array_equal(betas_from_config(ours.config), ours.betas.numpy())
    np.testing.assert_array_equal(betas_from_config(DDPMScheduler(num_train_timesteps=80).config), linear_betas(80))
    np.testing.assert_array_equal(betas_from_config({"num_train_timesteps": 30}), linear_betas(30, 1e-4, 0.02))
    trained = np.linspace(0.01, 0.2, 6)
    np.testing.assert_array_equal(
        betas_from_config({"num_train_timesteps": 6, "trained_betas": trained.tolist()}), trained
    )


def test_unknown_beta_schedule_is_rejected_with_the_choices():
    assert BETA_SCHEDULES[:4] == ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2")
    choices = re.escape(", ".join(BETA_SCHEDULES))
    for make in (lambda: make_betas("not_a_schedule", 10), lambda: HFDDPMScheduler(beta_schedule="not_a_schedule")):
        with pytest.raises(ValueError, match=f"'not_a_schedule'.*{choices} or pass trained_betas"):
            make()
