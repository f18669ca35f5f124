"""The Gaussian VAE's bounds: closed-form KL, ELBO <= IWAE_K <= log p(x) on an exactly solvable model, round trips."""

import math

import pytest
import torch

from hf_ddpm import GaussianVAE, VAEPipeline
from hf_ddpm.losses import gaussian_log_density, sum_over_pixels


def test_closed_form_kl_equals_a_monte_carlo_estimate():
    mean, logvar = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64), torch.tensor([[0.0, -1.5, 0.7]], dtype=torch.float64)
    closed = GaussianVAE.kl_to_prior(mean, logvar).item()
    generator = torch.Generator().manual_seed(0)
    z = torch.stack([GaussianVAE.reparameterize(mean, logvar, generator) for _ in range(100_000)])
    samples = sum_over_pixels((gaussian_log_density(z, mean, logvar) - gaussian_log_density(z, 0 * z, 0 * z)).reshape(len(z), -1))
    assert abs(samples.mean().item() - closed) < 5 * samples.std().item() / math.sqrt(len(samples))


class LinearGaussianVAE(GaussianVAE):
    """p(z) = N(0, I), p(x|z) = N(W z + b, s^2 I) (continuous), q(z|x) = N(A (x - b), diag v): log p(x) is exact,
    log N(x; b, W W^T + s^2 I), and the true posterior is N(S W^T (x - b) / s^2, S) with S = (I + W^T W / s^2)^-1."""

    def setup(self, W, b, s2, A, logvar):
        self.W, self.b, self.s2, self.A, self.q_logvar = W, b, s2, A, logvar

    def encode(self, x):
        flat = x.reshape(len(x), -1)
        return (flat - self.b) @ self.A.T, self.q_logvar.expand(len(x), -1)

    def reconstruction_log_likelihood(self, x, z):
        mean = z @ self.W.T + self.b
        return sum_over_pixels(gaussian_log_density(x.reshape(len(x), -1), mean, torch.full_like(mean, math.log(self.s2))))

    def log_marginal(self, x):
        flat = x.reshape(len(x), -1)
        covariance = self.W @ self.W.T + self.s2 * torch.eye(len(self.b), dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, covariance).log_prob(flat)

    def true_posterior(self):
        S = torch.linalg.inv(torch.eye(self.W.shape[1], dtype=torch.float64) + self.W.T @ self.W / self.s2)
        return S @ self.W.T / self.s2, S


@pytest.fixture
def linear_model():
    torch.manual_seed(0)
    model = LinearGaussianVAE(latent_dim=2).double()
    W, b = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64) * 0.1
    model.setup(W, b, 0.3, torch.randn(2, 4, dtype=torch.float64) * 0.2, torch.tensor([[-0.5, 0.2]], dtype=torch.float64))
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    return model, x


def test_elbo_below_iwae_below_log_likelihood_and_iwae_grows_with_k(linear_model):
    model, x = linear_model
    log_p = model.log_marginal(x)
    generator = torch.Generator().manual_seed(1)
    repeats = 300
    elbo = torch.stack([-model.elbo(x, generator=generator).negative_elbo_nats for _ in range(repeats)])
    iwae = {k: torch.stack([-model.iwae(x, k, generator=generator).negative_bound_nats for _ in range(repeats)]) for k in (1, 4, 32)}
    error = lambda a, b: 5 * torch.sqrt(a.var(0) / repeats + b.var(0) / repeats)  # noqa: E731
    assert (iwae[1].mean(0) - elbo.mean(0)).abs().le(error(iwae[1], elbo)).all()  # IWAE_1 is the ELBO
    assert (iwae[4].mean(0) >= iwae[1].mean(0) - error(iwae[4], iwae[1])).all()
    assert (iwae[32].mean(0) >= iwae[4].mean(0) - error(iwae[32], iwae[4])).all()
    assert (elbo.mean(0) < log_p).all() and (iwae[32].mean(0) <= log_p + 5 * iwae[32].std(0) / math.sqrt(repeats)).all()
    assert (iwae[32].mean(0) > elbo.mean(0)).all()


def test_elbo_is_tight_when_q_is_the_true_posterior(linear_model):
    model, x = linear_model
    # a W with orthogonal columns makes the true posterior's covariance diagonal, which the encoder can represent
    W = torch.linalg.qr(model.W)[0] * torch.tensor([1.5, 0.7], dtype=torch.float64)
    model.setup(W, model.b, model.s2, None, None)
    A, S = model.true_posterior()
    model.setup(W, model.b, model.s2, A, torch.log(torch.diagonal(S))[None])
    log_p = model.log_marginal(x)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):  # log p(x, z) - log q(z | x) = log p(x) for every z: the bound's integrand is constant
        assert torch.allclose(model.log_importance_weight(x, generator), log_p, rtol=1e-10)
    # the ELBO estimator (Monte-Carlo reconstruction, closed-form KL) is unbiased for it
    draws = torch.stack([-model.elbo(x, generator=generator).negative_elbo_nats for _ in range(2000)])
    assert ((draws.mean(0) - log_p).abs() < 5 * draws.std(0) / math.sqrt(len(draws))).all()


def test_hierarchical_terms_add_up_and_uint8_input_matches_float(tmp_path):
    torch.manual_seed(0)
    pipe = VAEPipeline(GaussianVAE(latent_dim=8, block_out_channels=(8, 16), hidden_dim=32, num_latent_layers=3))
    pixels = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    a = pipe.elbo(pixels[:, None].float() / 127.5 - 1, num_samples=2, generator=torch.Generator().manual_seed(0))
    b = pipe.elbo(pixels.numpy(), num_samples=2, generator=torch.Generator().manual_seed(0))
    assert a.layer_nats.shape == (2, 2)
    assert torch.allclose(a.negative_elbo_nats, a.reconstruction_nats + a.kl_nats + a.layer_nats.sum(1))
    assert torch.allclose(a.bits_per_dim, a.negative_elbo_nats / (784 * math.log(2)))
    assert torch.equal(a.bits_per_dim, b.bits_per_dim)
    iwae = pipe.iwae(pixels.numpy(), num_samples=3, generator=torch.Generator().manual_seed(0))
    assert iwae.bits_per_dim.shape == (2,)


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    torch.manual_seed(0)
    pipe = VAEPipeline(GaussianVAE(latent_dim=8, block_out_channels=(8, 16), num_latent_layers=2, hidden_dim=16))
    first = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), output_type="pt").images
    pipe.save_pretrained(tmp_path)
    loaded = VAEPipeline.from_pretrained(tmp_path)
    assert type(loaded.vae) is GaussianVAE
    assert torch.equal(first, loaded(batch_size=3, generator=torch.Generator().manual_seed(5), output_type="pt").images)
    assert first.shape == (3, 1, 28, 28) and 0 <= first.min() and first.max() <= 1


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="divisible by 4"):
        GaussianVAE(sample_size=30)
    with pytest.raises(ValueError, match="at least 1"):
        GaussianVAE(num_latent_layers=0)
