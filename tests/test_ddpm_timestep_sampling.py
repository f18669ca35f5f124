"""The timestep samplers (hf_ddpm.ddpm.timestep_sampling): uniform weights, importance weights that keep estimates
unbiased, state round trip."""

import numpy as np
import pytest
import torch

from hf_ddpm.ddpm.timestep_sampling import (
    DecoderOversampler,
    LossSecondMomentSampler,
    UniformTimestepSampler,
    make_timestep_sampler,
)


def test_uniform_sampler_has_unit_weights_and_covers_all_timesteps():
    sampler = UniformTimestepSampler(10)
    t, w = sampler.sample(5000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(5000))
    counts = torch.bincount(t, minlength=10).double()
    # each count is Binomial(5000, 0.1): mean 500, sd 21.2
    assert (counts - 500).abs().max() < 5 * 21.3


def test_second_moment_sampler_is_uniform_until_warm_then_proportional_to_rms_loss():
    sampler = LossSecondMomentSampler(4, history=3, uniform_prob=0.0)
    rms = np.array([1.0, 2.0, 3.0, 4.0])
    for t in range(4):
        for _ in range(2):
            sampler.update(torch.tensor([t]), torch.tensor([rms[t]]))
    assert not sampler.warmed_up()
    np.testing.assert_allclose(sampler.probabilities(), 0.25)
    for t in range(4):
        sampler.update(torch.tensor([t]), torch.tensor([rms[t]]))
    assert sampler.warmed_up()
    np.testing.assert_allclose(sampler.probabilities(), rms / rms.sum())


def test_importance_weights_keep_the_mean_unbiased():
    """E_p[w_t f(t)] with w_t = 1 / (T p(t)) equals the uniform mean of f, for any warmed-up p."""
    sampler = LossSecondMomentSampler(5, history=1, uniform_prob=0.1)
    sampler.update(torch.arange(5), torch.tensor([0.1, 1.0, 5.0, 0.5, 2.0]))
    f = torch.tensor([3.0, -1.0, 2.0, 7.0, 0.5])
    p = torch.from_numpy(sampler.probabilities())
    t = torch.arange(5)
    weights = 1.0 / (5 * p[t])
    assert torch.isclose((p * weights * f[t]).sum().float(), f.mean(), rtol=1e-6)
    # and a Monte-Carlo draw agrees within its standard error
    draws, w = sampler.sample(200_000, "cpu", torch.Generator().manual_seed(1))
    values = (w * f[draws]).double()
    assert abs(values.mean().item() - f.mean().item()) < 5 * values.std().item() / np.sqrt(len(values))


def test_decoder_oversampler_draws_the_decoder_term_its_share_on_top_of_uniform_weighted_back():
    sampler = make_timestep_sampler("decoder-oversampled", 1000)
    assert isinstance(sampler, DecoderOversampler) and sampler.share == 1 / 32
    p = sampler.probabilities()
    assert p[0] == pytest.approx(1 / 32 + (31 / 32) / 1000) and np.all(p[1:] == (31 / 32) / 1000)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    t, w = sampler.sample(100_000, "cpu", torch.Generator().manual_seed(0))
    share = (t == 0).double().mean().item()  # Binomial: sd sqrt(p0 (1 - p0) / n) = 0.00056
    assert abs(share - p[0]) < 5 * 0.00056
    torch.testing.assert_close(w, torch.from_numpy(1 / (1000 * p[t.numpy()])).float())
    assert abs((w.double() * (t == 0)).mean().item() - 1 / 1000) < 5 * 0.00056 / (1000 * p[0])  # E[w 1{t=0}] = 1/T
    with pytest.raises(ValueError, match=r"share must be in \[0, 1\), got 1"):
        DecoderOversampler(10, share=1)
    other = make_timestep_sampler("auto", 1000, "hybrid_decoder", decoder_share=1 / 8)
    assert other.probabilities()[0] == pytest.approx(1 / 8 + (7 / 8) / 1000)


def test_auto_picks_the_sampler_of_the_loss():
    kinds = {
        loss: type(make_timestep_sampler("auto", 10, loss)) for loss in ("simple", "hybrid", "vlb", "hybrid_decoder")
    }
    assert kinds == {
        "simple": UniformTimestepSampler,
        "hybrid": UniformTimestepSampler,
        "vlb": LossSecondMomentSampler,
        "hybrid_decoder": DecoderOversampler,
    }


def test_sampler_state_round_trip_and_history_window():
    sampler = LossSecondMomentSampler(3, history=2)
    for loss in (1.0, 2.0, 3.0):
        sampler.update(torch.tensor([1]), torch.tensor([loss]))
    np.testing.assert_allclose(sampler.losses[1], [2.0, 3.0])  # the oldest loss dropped out
    restored = LossSecondMomentSampler(3, history=2)
    restored.load_state_dict(sampler.state_dict())
    np.testing.assert_array_equal(restored.losses, sampler.losses)
    np.testing.assert_array_equal(restored.counts, sampler.counts)


def test_unknown_sampler_name_is_rejected():
    with pytest.raises(ValueError, match="uniform, loss-second-moment, decoder-oversampled"):
        make_timestep_sampler("importance", 10)
