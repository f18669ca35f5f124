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


def appended_one_by_one(num_timesteps: int, history: int, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """The history improved-diffusion keeps, built by appending each loss in turn (the reference for the batched
    update): per timestep, its last ``history`` losses, oldest first, zeros after them."""
    losses, counts = np.zeros((num_timesteps, history)), np.zeros(num_timesteps, dtype=np.int64)
    for timesteps, values in batches:
        for t, loss in zip(timesteps.tolist(), values.tolist()):
            if counts[t] == history:
                losses[t, :-1] = losses[t, 1:]
                losses[t, -1] = loss
            else:
                losses[t, counts[t]] = loss
                counts[t] += 1
    return losses, counts


@pytest.mark.parametrize("history, batch_size", [(1, 9), (3, 7), (4, 2), (5, 40)])
def test_the_batched_history_update_equals_appending_the_losses_one_by_one(history, batch_size):
    """Batches with repeated timesteps (more repeats than the history holds, too) and a history filling up across
    batches: the batched update keeps exactly the losses, order and counts of the one-by-one loop."""
    generator = torch.Generator().manual_seed(history)
    sampler, batches = LossSecondMomentSampler(5, history=history, uniform_prob=0.01), []
    for _ in range(12):
        batch = (torch.randint(0, 5, (batch_size,), generator=generator), torch.rand(batch_size, generator=generator))
        batches.append(batch)
        sampler.update(*batch)
        losses, counts = appended_one_by_one(5, history, batches)
        np.testing.assert_array_equal(sampler.losses.numpy(), losses)
        np.testing.assert_array_equal(sampler.counts.numpy(), counts)
        warm = bool((counts == history).all())
        assert sampler.warmed_up() == warm
        if warm:  # improved-diffusion's formula, in numpy
            rms = np.sqrt(np.mean(losses**2, axis=-1))
            np.testing.assert_allclose(sampler.probabilities(), rms / rms.sum() * 0.99 + 0.01 / 5, rtol=1e-14)


@pytest.mark.parametrize("name", ["uniform", "decoder-oversampled"])
def test_fixed_samplers_draw_on_the_cpu_exactly_what_a_multinomial_of_their_probabilities_draws(name):
    """Keeping p(t) on the batch's device changes no CPU draw: the timesteps and weights of a seeded draw are those
    of ``torch.multinomial`` over the float64 probabilities (the draws of earlier versions)."""
    sampler = make_timestep_sampler(name, 1000)
    for _ in range(2):  # the second draw reads the kept p(t)
        t, w = sampler.sample(64, "cpu", torch.Generator().manual_seed(5))
        p = torch.from_numpy(sampler.probabilities())
        expected = torch.multinomial(p, 64, replacement=True, generator=torch.Generator().manual_seed(5))
        assert torch.equal(t, expected)
        assert torch.equal(w, (1.0 / (1000 * p[expected])).float())
