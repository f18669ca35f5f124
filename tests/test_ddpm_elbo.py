"""The ELBO terms against scipy and closed forms, the exact bound and its stratified estimate, and the training
losses against the exact bound; all on the frozen chain (hf_ddpm.ddpm.chain.DiffusionChain)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from helpers import on_grid
from hf_ddpm import HFDDPMScheduler
from hf_ddpm.ddpm import elbo
from hf_ddpm.ddpm.chain import DiffusionChain
from hf_ddpm.distributions import nats_to_bits_per_dim

pytestmark = pytest.mark.usefixtures("one_thread")

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- ELBO terms
def test_prior_term_equals_its_closed_form():
    """KL(N(sqrt(a) x, 1 - a) || N(0, 1)) = (a x^2 - a - log(1 - a)) / 2 per pixel, a = alphas_cumprod[T-1]."""
    chain = HFDDPMScheduler().train_chain
    a = float(np.prod(1.0 - np.linspace(1e-4, 0.02, 1000)))
    assert a == pytest.approx(4.04e-5, rel=2e-3)
    shape = (3, 1, 4, 5)
    images = {1.0: torch.ones(shape, dtype=torch.float64), 0.0: torch.zeros(shape, dtype=torch.float64)}
    images[-1.0] = -images[1.0]
    bpd = {x: nats_to_bits_per_dim(elbo.prior_term(chain, image), 20) for x, image in images.items()}
    for x, value in bpd.items():
        closed = 0.5 * (a * x * x - a - math.log1p(-a)) / LN2
        torch.testing.assert_close(value, torch.full((3,), closed, dtype=torch.float64), rtol=1e-6, atol=0)
    assert bpd[1.0][0].item() == pytest.approx(2.91e-5, rel=2e-3)
    assert bpd[0.0][0].item() == pytest.approx(5.9e-10, rel=1e-2)  # ~ a^2 / (4 ln 2): q(x_T) ~= N(0, I)


def test_prior_term_sits_at_the_top_of_a_respaced_chain():
    scheduler = HFDDPMScheduler(timestep_spacing="leading")
    scheduler.set_timesteps(50)  # leading: 0, 20, ..., 980
    top = int(scheduler.chain.timesteps[-1])
    assert top == 980
    a = scheduler.alphas_cumprod[top].item()
    nats = elbo.prior_term(scheduler.chain, torch.ones(2, 1, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(
        nats, torch.full((2,), 4 * 0.5 * -math.log1p(-a), dtype=torch.float64), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("steps", [None, 10])
def test_oracle_model_makes_every_denoising_term_zero(steps):
    """A model that outputs the true x_0 with fixed_small variance: every KL(q || p) is 0, the bound is prior +
    reconstruction, and the decoder is N(x_0, beta~_1) discretized, whose bin masses scipy gives independently."""
    scheduler = HFDDPMScheduler(num_train_timesteps=100, beta_end=0.1, prediction_type="sample")
    if steps:
        scheduler.set_timesteps(steps)
    chain = scheduler.chain
    x0 = on_grid(3, 1, 4, 4)
    oracle = lambda x_t, t: x0  # noqa: E731
    result = elbo.full_elbo(chain, oracle, x0, generator=torch.Generator().manual_seed(0), keep_per_timestep=True)
    assert isinstance(result, elbo.ELBOOutput)
    assert result.per_timestep.shape == (3, steps or 100)
    assert result.per_timestep[:, 1:].abs().max().item() < 1e-12
    assert result.denoising_terms.abs().max().item() < 1e-10
    torch.testing.assert_close(result.bits_per_dim, result.prior_term + result.reconstruction_term, rtol=1e-12, atol=0)
    parts = result.prior_term + result.denoising_terms + result.reconstruction_term
    torch.testing.assert_close(result.bits_per_dim, parts, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.reconstruction_term, result.per_timestep[:, 0], rtol=0, atol=0)
    sigma = math.sqrt(chain.posterior_variance[1])  # the clipped decoder variance
    inner = 2 * norm.cdf(1 / 255 / sigma) - 1
    edge = norm.cdf(1 / 255 / sigma)
    masses = np.where(np.abs(x0.numpy()) == 1.0, edge, inner).reshape(3, -1)
    expected_bpd = -np.log(masses).sum(axis=1) / (16 * LN2)
    np.testing.assert_allclose(result.reconstruction_term.numpy(), expected_bpd, rtol=1e-10)
    top = scheduler.alphas_cumprod[int(chain.timesteps[-1])].item()
    closed_prior = 0.5 * (top * x0**2 - top - math.log1p(-top)).reshape(3, -1).sum(dim=1) / (16 * LN2)
    torch.testing.assert_close(result.prior_term, closed_prior, rtol=1e-9, atol=0)


def test_denoising_term_is_ho_et_al_weighted_noise_error():
    """With epsilon prediction and fixed_small variance, L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))
    ||eps - eps_theta||^2 (Ho et al., 2020, eq. 12)."""
    scheduler = HFDDPMScheduler(num_train_timesteps=50, beta_end=0.2, clip_sample=False)
    chain = scheduler.train_chain
    generator = torch.Generator().manual_seed(1)
    x0 = on_grid(2, 1, 3, 3)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    error = 0.3 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    betas, abar = scheduler.betas.numpy(), scheduler.alphas_cumprod.numpy()
    for step in (1, 2, 25, 49):
        t = torch.full((2,), step)
        x_t = chain.add_noise(x0, noise, t)
        kl = elbo.variational_terms(chain, noise + error, x0, x_t, t)
        sigma2 = betas[step] * (1 - abar[step - 1]) / (1 - abar[step])
        weight = betas[step] ** 2 / (2 * sigma2 * (1 - betas[step]) * (1 - abar[step]))
        torch.testing.assert_close(kl, weight * (error**2).reshape(2, -1).sum(dim=1), rtol=1e-9, atol=0)


def test_clipped_denoising_term_is_the_kl_to_the_mean_of_the_clipped_x0_estimate():
    """clip_denoised: by hand, x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), clipped to [-1, 1], mean
    c1 x0_hat + c2 x_t, and with fixed_small variance the KL is ||mu~ - mu_theta||^2 / (2 beta~_t)."""
    scheduler = HFDDPMScheduler(num_train_timesteps=50, beta_end=0.2)
    chain = scheduler.train_chain
    generator = torch.Generator().manual_seed(2)
    x0 = on_grid(2, 1, 3, 3)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    eps_hat = noise + 0.5 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    betas, abar = scheduler.betas.numpy(), scheduler.alphas_cumprod.numpy()
    for step in (1, 10, 49):
        t = torch.full((2,), step)
        x_t = chain.add_noise(x0, noise, t)
        x0_hat = (x_t - math.sqrt(1 - abar[step]) * eps_hat) / math.sqrt(abar[step])
        clipped_pixels = (x0_hat.abs() > 1).reshape(2, -1).any(dim=1)
        assert clipped_pixels.any()  # the clipping does something here
        c1 = math.sqrt(abar[step - 1]) * betas[step] / (1 - abar[step])
        c2 = math.sqrt(1 - betas[step]) * (1 - abar[step - 1]) / (1 - abar[step])
        sigma2 = betas[step] * (1 - abar[step - 1]) / (1 - abar[step])
        posterior_mean, model_mean = c1 * x0 + c2 * x_t, c1 * x0_hat.clamp(-1, 1) + c2 * x_t
        expected = ((posterior_mean - model_mean) ** 2).reshape(2, -1).sum(dim=1) / (2 * sigma2)
        clipped = elbo.variational_terms(chain, eps_hat, x0, x_t, t, clip_denoised=True)
        torch.testing.assert_close(clipped, expected, rtol=1e-9, atol=1e-12)
        unclipped = elbo.variational_terms(chain, eps_hat, x0, x_t, t)
        assert torch.equal(clipped < unclipped, clipped_pixels)  # lower exactly where a pixel was clipped


def test_clipping_never_raises_a_term_and_leaves_the_decoder_alone():
    """Over every timestep of a chain with a learned variance: clipped terms <= unclipped terms (the same x_t
    draws), the reconstruction term L_0 identical, and the clipped full bound lower."""
    T = 20
    chain = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.3, variance_type="learned_range").train_chain
    model_fn = linear_model(T, learned=True)
    x0 = on_grid(3, 1, 4, 4)
    runs = [
        elbo.full_elbo(chain, model_fn, x0, torch.Generator().manual_seed(5), True, clip_denoised=clip)
        for clip in (False, True)
    ]
    unclipped, clipped = (run.per_timestep for run in runs)
    assert torch.equal(clipped[:, 0], unclipped[:, 0])
    assert (clipped[:, 1:] <= unclipped[:, 1:] + 1e-15).all() and (clipped[:, 1:] < unclipped[:, 1:]).any()
    assert (runs[1].bits_per_dim < runs[0].bits_per_dim).all()


def test_clipped_terms_take_one_model_mean_and_equal_the_two_mean_formula_bitwise(monkeypatch):
    """With clip_denoised, the model's x_0 estimate, mean and variance are computed once (one p_mean_variance per
    call; the clipped mean from the same x0_hat), and every term is, to the bit, the formula of two
    p_mean_variance calls: the KL to the clipped mean, L_0 with the unclipped one, at a learned variance."""
    T = 20
    chain = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.3, variance_type="learned_range").train_chain
    x0 = on_grid(4, 1, 4, 4)
    t = torch.tensor([0, 1, 9, T - 1])
    x_t = chain.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(8), dtype=x0.dtype), t)
    output = 3.0 * torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    model_mean, model_log_variance, _ = chain.p_mean_variance(output, x_t, t)
    clipped_mean, clipped_log_variance, _ = chain.p_mean_variance(output, x_t, t, clip_denoised=True)
    assert torch.equal(clipped_log_variance, model_log_variance) and not torch.equal(clipped_mean, model_mean)
    posterior_mean, _, posterior_log_variance = chain.q_posterior_mean_variance(x0, x_t, t)
    kl = elbo.denoising_matching_term(posterior_mean, posterior_log_variance, clipped_mean, model_log_variance)
    nll = elbo.reconstruction_term(x0, model_mean, model_log_variance)
    expected = torch.cat([nll[:1], kl[1:]])  # t = 0: the decoder; t >= 1: the denoising KLs
    calls = []
    original = DiffusionChain.p_mean_variance
    monkeypatch.setattr(DiffusionChain, "p_mean_variance", lambda *a, **k: calls.append(k) or original(*a, **k))
    terms = elbo.variational_terms(chain, output, x0, x_t, t, clip_denoised=True)
    assert torch.equal(terms, expected) and len(calls) == 1


def linear_model(T: int, learned: bool) -> elbo.ModelFn:
    """A fixed, deterministic model: a per-timestep affine map of x_t (and tanh(x_t) as the variance channel)."""
    generator = torch.Generator().manual_seed(7)
    scale = 0.5 + 0.3 * torch.rand(T, generator=generator, dtype=torch.float64)
    shift = 0.1 * torch.randn(T, generator=generator, dtype=torch.float64)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t = x_t.double()
        prediction = scale[t].view(-1, 1, 1, 1) * x_t + shift[t].view(-1, 1, 1, 1)
        return torch.cat([prediction, torch.tanh(x_t)], dim=1) if learned else prediction

    return model_fn


def test_full_elbo_is_the_sum_of_every_term_of_the_chain():
    """full_elbo draws one x_t per chain timestep, in order, from the generator (the one-sample term_at); the bound
    is the prior plus all K terms summed at once, converted to bits/dim, exactly as before the refactor to chains."""
    T = 20
    chain = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.3, variance_type="learned_range").train_chain
    model_fn = linear_model(T, learned=True)
    x0 = on_grid(3, 1, 4, 4)
    result = elbo.full_elbo(chain, model_fn, x0, generator=torch.Generator().manual_seed(5), keep_per_timestep=True)
    generator = torch.Generator().manual_seed(5)
    nats = torch.stack([elbo.term_at(chain, model_fn, x0, torch.full((3,), t), generator) for t in range(T)], dim=1)
    prior = elbo.prior_term(chain, x0)
    assert torch.equal(result.bits_per_dim, nats_to_bits_per_dim(prior + nats.sum(dim=1), 16))
    assert torch.equal(result.per_timestep, nats_to_bits_per_dim(nats, 16))
    assert torch.equal(result.prior_term, nats_to_bits_per_dim(prior, 16))
    assert torch.equal(result.denoising_terms, nats_to_bits_per_dim(nats[:, 1:].sum(dim=1), 16))
    assert torch.equal(result.reconstruction_term, nats_to_bits_per_dim(nats[:, 0], 16))
    without = elbo.full_elbo(chain, model_fn, x0, generator=torch.Generator().manual_seed(5))
    assert without.per_timestep is None and torch.equal(without.bits_per_dim, result.bits_per_dim)


def test_strata_cover_every_denoising_timestep_once_with_geometric_edges():
    groups = elbo.strata(1000, 8)
    assert torch.equal(torch.cat(groups), torch.arange(1, 1000))
    assert [int(g[0]) for g in groups] == [1, 2, 6, 13, 32, 75, 178, 422]  # round(1000^(k/8))
    for T in (2, 5, 12, 20, 1000):
        for K in range(1, T):
            groups = elbo.strata(T, K)
            assert len(groups) == K and all(len(g) >= 1 for g in groups), (T, K)
            assert torch.equal(torch.cat(groups), torch.arange(1, T)), (T, K)
    with pytest.raises(ValueError, match="between 1 and T-1 = 999, got 1000"):
        elbo.strata(1000, 1000)
    with pytest.raises(ValueError, match="between 1 and T-1 = 999, got 0"):
        elbo.strata(1000, 0)


def test_stratified_elbo_is_the_size_weighted_sum_of_one_term_per_stratum():
    """sum_{t=1}^{T-1} L_t is estimated by sum_k |S_k| L_{t_k}, t_k drawn in stratum S_k; the reconstruction and
    prior terms are exact. Checked on the x_t the model saw (unbiasedness within error bars: test_evaluation.py)."""
    T, K = 12, 3
    chain = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.3, variance_type="learned_range").train_chain
    model_fn = linear_model(T, learned=True)
    x0 = on_grid(2, 1, 4, 4)
    calls = []

    def recording_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append((t.clone(), x_t.clone()))
        return model_fn(x_t, t)

    estimate = elbo.stratified_elbo(
        chain, recording_model, x0, timesteps_per_image=K, generator=torch.Generator().manual_seed(1)
    )
    groups = elbo.strata(T, K)
    assert [len(g) for g in groups] == [1, 3, 7] and len(calls) == K + 1  # K + 1 network evaluations per image
    terms = [elbo.variational_terms(chain, model_fn(x_t, t), x0, x_t, t) for t, x_t in calls]
    for (t, _), group in zip(calls, groups):
        assert all(int(s) in group.tolist() for s in t)  # each image's t_k lies in its stratum
    assert torch.equal(calls[-1][0], torch.zeros(2, dtype=torch.long))
    denoising = sum(len(group) * term for group, term in zip(groups, terms[:-1]))
    torch.testing.assert_close(estimate.denoising_terms, nats_to_bits_per_dim(denoising, 16), rtol=1e-15, atol=0)
    torch.testing.assert_close(estimate.reconstruction_term, nats_to_bits_per_dim(terms[-1], 16), rtol=1e-15, atol=0)
    torch.testing.assert_close(
        estimate.prior_term, nats_to_bits_per_dim(elbo.prior_term(chain, x0), 16), rtol=0, atol=0
    )
    parts = estimate.prior_term + estimate.denoising_terms + estimate.reconstruction_term
    torch.testing.assert_close(estimate.bits_per_dim, parts, rtol=1e-12, atol=0)


@pytest.mark.parametrize("timesteps_per_forward", [2, 3, 8])
def test_the_stratified_estimate_is_the_same_with_strata_evaluated_together(timesteps_per_forward):
    """stratified_elbo with m strata per network call (a GPU's width) gives the estimate of one call per stratum:
    the same timesteps and noise drawn in the same order, one call per m strata plus the reconstruction's."""
    T, K = 100, 8
    chain = HFDDPMScheduler(num_train_timesteps=T, variance_type="learned_range").train_chain
    model_fn, x0 = linear_model(T, learned=True), on_grid(3, 1, 4, 4, seed=4)
    batches = []

    def recording_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batches.append(len(t))
        return model_fn(x_t, t)

    one = elbo.stratified_elbo(chain, model_fn, x0, K, torch.Generator().manual_seed(6), clip_denoised=True)
    many = elbo.stratified_elbo(
        chain,
        recording_model,
        x0,
        K,
        torch.Generator().manual_seed(6),
        clip_denoised=True,
        timesteps_per_forward=timesteps_per_forward,
    )
    m = timesteps_per_forward
    assert batches == [3 * min(m, K - start) for start in range(0, K, m)] + [3]  # 3 images; the last: t = 0
    for part in ("denoising_terms", "reconstruction_term", "prior_term", "bits_per_dim"):
        torch.testing.assert_close(getattr(many, part), getattr(one, part), rtol=1e-12, atol=0)


def test_stratified_elbo_refuses_a_respaced_chain():
    scheduler = HFDDPMScheduler(num_train_timesteps=20)
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match=r"stratified_elbo needs the full chain \(DiffusionChain.from_config\)"):
        elbo.stratified_elbo(scheduler.chain, lambda x, t: x, -torch.ones(1, 1, 2, 2))
    assert not scheduler.chain.is_full and scheduler.train_chain.is_full


# ---------------------------------------------------------------------------------------------- training losses
@pytest.mark.parametrize("variance_type", ["fixed_large", "learned_range"])
def test_vlb_loss_is_an_unbiased_estimate_of_the_exact_bound(variance_type):
    """full_elbo draws one x_t per timestep; the vlb loss at every t with those same x_t, averaged over uniform t
    (or weighted by 1 / (T p(t)) and averaged over p(t)), is that exact bound."""
    T = 20
    chain = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.3, variance_type=variance_type).train_chain
    model_fn = linear_model(T, variance_type == "learned_range")
    x0 = on_grid(3, 1, 4, 4)
    seen = {}

    def recording_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen[int(t[0])] = x_t.clone()
        return model_fn(x_t, t)

    exact = elbo.full_elbo(chain, recording_model, x0, generator=torch.Generator().manual_seed(5))
    abar = torch.from_numpy(chain.train_alphas_cumprod)

    def vlb_at(t: int, weight: float = 1.0) -> elbo.TrainingLoss:
        noise = (seen[t] - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()  # the noise full_elbo drew at t
        weights = torch.full((3,), weight)
        return elbo.training_loss(
            "vlb", chain, model_fn, x0, torch.full((3,), t), noise=noise, timestep_weights=weights
        )

    uniform = [vlb_at(t) for t in range(T)]
    vlb = torch.stack([out.vlb_bits_per_dim.double() for out in uniform])  # (T, B)
    loss = torch.stack([out.loss.double() for out in uniform])
    # the training path computes in float32 (here ~5e-6 off), the bound in float64; a wrong scale would be >= 1/T
    torch.testing.assert_close(vlb.mean(dim=0), exact.bits_per_dim, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.mean(dim=0), exact.bits_per_dim - exact.prior_term, rtol=1e-5, atol=0)
    p = torch.rand(T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    p /= p.sum()
    weighted = torch.stack([vlb_at(t, 1.0 / (T * p[t].item())).vlb_bits_per_dim.double() for t in range(T)])
    torch.testing.assert_close((p[:, None] * weighted).sum(dim=0), exact.bits_per_dim, rtol=1e-5, atol=0)


def test_hybrid_gradient_trains_the_mean_like_simple_and_the_variance_like_vlb():
    T = 20
    chain = HFDDPMScheduler(num_train_timesteps=T, variance_type="learned_range").train_chain
    generator = torch.Generator().manual_seed(0)
    x0 = on_grid(4, 1, 4, 4).float()
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 1, 9, 19])  # the reconstruction term and three KL terms
    raw = torch.cat(
        [torch.randn(x0.shape, generator=generator), torch.rand(x0.shape, generator=generator) * 2 - 1], dim=1
    )
    grads = {}
    for kind in ("simple", "vlb", "hybrid", "hybrid_decoder"):
        output = raw.clone().requires_grad_(True)
        elbo.training_loss(kind, chain, lambda x_t, _, output=output: output, x0, t, noise=noise).loss.sum().backward()
        grads[kind] = output.grad
    mean, var = slice(0, 1), slice(1, 2)
    torch.testing.assert_close(grads["hybrid"][:, mean], grads["simple"][:, mean], rtol=1e-6, atol=0)
    # float32 rounding, amplified where a gradient nearly cancels: relative to the gradient's scale
    expected = elbo.HYBRID_VLB_WEIGHT * grads["vlb"][:, var]
    for kind in ("hybrid", "hybrid_decoder"):
        torch.testing.assert_close(grads[kind][:, var], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert grads["simple"][:, var].abs().max() == 0  # the squared error does not see the variance
    assert grads["vlb"][:, mean].abs().min() > 0  # ... and the bound does see the mean: hybrid detaches it
    assert grads["hybrid"][:, var].abs().min() > 0
    # hybrid_decoder: the same, except that the decoder's term L_0 (timestep 0) trains the mean as the bound does
    torch.testing.assert_close(grads["hybrid_decoder"][1:], grads["hybrid"][1:], rtol=0, atol=0)
    decoder = grads["simple"][:1, mean] + elbo.HYBRID_VLB_WEIGHT * grads["vlb"][:1, mean]
    torch.testing.assert_close(grads["hybrid_decoder"][:1, mean], decoder, rtol=1e-5, atol=1e-6)
    assert not torch.equal(grads["hybrid_decoder"][:1, mean], grads["hybrid"][:1, mean])


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_simple_loss_is_zero_for_the_true_target_and_positive_otherwise(prediction_type):
    chain = HFDDPMScheduler(num_train_timesteps=20, prediction_type=prediction_type).train_chain
    generator = torch.Generator().manual_seed(0)
    x0 = on_grid(3, 1, 4, 4).float()
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 7, 19])
    target = {"epsilon": noise, "sample": x0, "v_prediction": chain.get_velocity(x0, noise, t)}[prediction_type]
    torch.testing.assert_close(elbo.training_target(chain, x0, noise, t), target, rtol=0, atol=0)
    oracle = elbo.training_loss("hybrid", chain, lambda x_t, _: target, x0, t, noise=noise)
    assert oracle.mse.abs().max().item() == 0.0
    assert oracle.vlb_term_bits_per_dim[1:].abs().max().item() < 1e-5  # KL terms vanish (float32)
    off = elbo.training_loss("simple", chain, lambda x_t, _: target + 0.5, x0, t, noise=noise)
    torch.testing.assert_close(off.loss, torch.full((3,), 0.25), rtol=1e-6, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weight_weights_the_x0_error_by_min_snr_gamma(prediction_type):
    """Each parameterisation's squared error is SNR_t (eps), 1 (x_0) or SNR_t + 1 (v) times the x_0-space error;
    the weight makes all three min(SNR_t, gamma) times the x_0 error."""
    chain = DiffusionChain.from_alphas_cumprod(
        np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), prediction_type=prediction_type
    )
    t = torch.tensor([0, 100, 500, 999])
    abar = chain.train_alphas_cumprod[t.numpy()]
    snr = abar / (1 - abar)
    per_x0_error = {"epsilon": snr, "sample": np.ones_like(snr), "v_prediction": snr + 1}[prediction_type]
    weight = elbo.min_snr_weight(chain, t, 5.0)
    assert weight.dtype == torch.float32
    np.testing.assert_allclose(weight.double().numpy() * per_x0_error, np.minimum(snr, 5.0), rtol=1e-6)


def test_unknown_loss_type_is_rejected_with_the_choices():
    chain = HFDDPMScheduler(num_train_timesteps=20).train_chain
    with pytest.raises(ValueError, match="'l2'.*simple, vlb, hybrid, hybrid_decoder"):
        elbo.training_loss("l2", chain, lambda x, t: x, -torch.ones(1, 1, 2, 2), torch.tensor([3]))
    assert elbo.LOSS_TYPES == ("simple", "vlb", "hybrid", "hybrid_decoder") and elbo.HYBRID_VLB_WEIGHT == 0.001


@pytest.mark.parametrize("timesteps_per_forward", [3, 20])
def test_the_exact_bound_is_the_same_with_timesteps_evaluated_together(timesteps_per_forward):
    """full_elbo with m timesteps per network call (a GPU's width) gives the terms of one call per timestep: the
    same noise in the same order, the same model outputs (the model here sees each image alone)."""
    chain = DiffusionChain.from_config(HFDDPMScheduler(num_train_timesteps=20, variance_type="learned_range").config)
    x0 = on_grid(3, 1, 4, 4, seed=2)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = (t.double() / 20).view(-1, 1, 1, 1)
        return torch.cat([0.3 * x_t * scale, torch.tanh(x_t) * 0.5], dim=1)

    one = elbo.full_elbo(chain, model_fn, x0, torch.Generator().manual_seed(5), keep_per_timestep=True)
    many = elbo.full_elbo(
        chain,
        model_fn,
        x0,
        torch.Generator().manual_seed(5),
        keep_per_timestep=True,
        timesteps_per_forward=timesteps_per_forward,
    )
    torch.testing.assert_close(many.per_timestep, one.per_timestep, rtol=1e-12, atol=0)
    torch.testing.assert_close(many.bits_per_dim, one.bits_per_dim, rtol=1e-12, atol=0)
