"""The Gaussian VAE (hf_ddpm.vae.model): its bounds against numbers computed independently (the closed-form KL
against Monte Carlo, ELBO <= IWAE_K <= log p(x) against the exact log p(x) of linear-Gaussian latent chains), and
the bookkeeping of the terms, the units, training and bad input."""

import math

import pytest
import torch

from helpers import mnist_like_pixels, tiny_vae
from hf_ddpm import GaussianVAE
from hf_ddpm.distributions import gaussian_log_density, kl_to_standard_normal, sum_over_pixels

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def test_closed_form_kl_equals_a_monte_carlo_estimate():
    mean = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]], dtype=F64)
    logvar = torch.tensor([[0.0, -1.5, 0.7], [1.0, -0.3, 0.0]], dtype=F64)
    closed = kl_to_standard_normal(mean, logvar)
    draws = 100_000
    means, logvars = mean.repeat(draws, 1), logvar.repeat(draws, 1)
    z = GaussianVAE.reparameterize(means, logvars, torch.Generator().manual_seed(0))
    log_ratio = sum_over_pixels(gaussian_log_density(z, means, logvars)) - GaussianVAE.prior_log_density(z)
    log_ratio = log_ratio.view(draws, len(mean))  # KL = E_q[log q(z) - log p(z)]
    standard_error = log_ratio.std(0) / math.sqrt(draws)
    assert ((log_ratio.mean(0) - closed).abs() < 5 * standard_error).all()
    assert torch.allclose(closed, 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(1))


# ---------------------------------------------------------------------------------------------- linear-Gaussian chains
class LinearGaussianChain(GaussianVAE):
    """A GaussianVAE whose distributions are linear-Gaussian, so that log p(x) and the true posterior are exact:

        p(z_L) = N(0, I), p(z_l | z_{l+1}) = N(a_l z_{l+1}, diag v_l), p(x | z_1) = N(W z_1 + b, s I)  (x in R^16,
        a continuous density), q(z_1 | x) = N(A (x - b), diag e^u_1), q(z_l | z_{l-1}) = N(g_l z_{l-1}, diag e^u_l).

    W has orthogonal columns, so every true posterior factor is diagonal and q can equal it. Only the distributions
    are replaced: the bounds (elbo, iwae, layer terms, closed-form KL, reparameterization) are GaussianVAE's own.
    """

    def __init__(self, num_latent_layers: int, latent_dim: int = 2, seed: int = 0):
        super().__init__(
            sample_size=4,
            latent_dim=latent_dim,
            block_out_channels=(1, 1),
            hidden_dim=1,
            num_latent_layers=num_latent_layers,
        )
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.rand(*shape, generator=g, dtype=F64)  # noqa: E731
        self.W = torch.linalg.qr(torch.randn(16, latent_dim, generator=g, dtype=F64))[0] * (1 + rand(latent_dim))
        self.b, self.s = 0.1 * torch.randn(16, generator=g, dtype=F64), 0.3
        self.a = [0.5 + rand(latent_dim) for _ in range(num_latent_layers - 1)]
        self.v = [0.2 + 0.5 * rand(latent_dim) for _ in range(num_latent_layers - 1)]
        self.use_true_posterior()

    def marginal_variances(self) -> list[torch.Tensor]:
        """Var z_l under p for l = 1..L: P_L = 1, P_l = a_l^2 P_{l+1} + v_l."""
        variances = [torch.ones_like(self.b[: self.W.shape[1]])]
        for a, v in zip(reversed(self.a), reversed(self.v)):
            variances.insert(0, a**2 * variances[0] + v)
        return variances

    def use_true_posterior(self) -> None:
        """q(z_1 | x) = p(z_1 | x) and q(z_l | z_{l-1}) = p(z_l | z_{l-1}), the Gaussian conditionals of the chain."""
        variances = self.marginal_variances()
        first = 1 / (1 / variances[0] + (self.W**2).sum(0) / self.s)
        self.A = first[:, None] * self.W.T / self.s
        self.gains, self.q_logvars = [], [first.log()]
        for a, v, prior_variance in zip(self.a, self.v, variances[1:]):
            variance = 1 / (1 / prior_variance + a**2 / v)
            self.gains.append(variance * a / v)
            self.q_logvars.append(variance.log())

    def use_wrong_posterior(self) -> None:
        self.use_true_posterior()
        self.A, self.gains = 0.4 * self.A, [0.5 * g + 0.2 for g in self.gains]
        self.q_logvars = [u + 1.2 for u in self.q_logvars]

    def encode(self, x):
        mean = (x.flatten(1) - self.b) @ self.A.T
        return mean, self.q_logvars[0].expand_as(mean)

    def encoder_transition(self, layer, z_below):
        return self.gains[layer - 2] * z_below, self.q_logvars[layer - 1].expand_as(z_below)

    def decoder_transition(self, layer, z_above):
        return self.a[layer - 1] * z_above, self.v[layer - 1].log().expand_as(z_above)

    def reconstruction_log_likelihood(self, x, z):
        mean = z @ self.W.T + self.b
        return sum_over_pixels(gaussian_log_density(x.flatten(1), mean, torch.full_like(mean, math.log(self.s))))

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = log N(x; b, W diag(Var z_1) W^T + s I), exact."""
        covariance = self.W @ torch.diag(self.marginal_variances()[0]) @ self.W.T + self.s * torch.eye(16, dtype=F64)
        return torch.distributions.MultivariateNormal(self.b, covariance).log_prob(x.flatten(1))

    def data(self, n: int) -> torch.Tensor:
        """n draws x ~ p(x), (n, 1, 4, 4)."""
        g = torch.Generator().manual_seed(123)
        z = torch.randn(n, self.W.shape[1], generator=g, dtype=F64) * self.marginal_variances()[0].sqrt()
        return (z @ self.W.T + self.b + math.sqrt(self.s) * torch.randn(n, 16, generator=g, dtype=F64)).view(
            n, 1, 4, 4
        )


def repeated(bound, x: torch.Tensor, repeats: int) -> torch.Tensor:
    """``repeats`` independent draws of a per-image bound (in nats, as log p) of each image: (repeats, N)."""
    return -bound(x.repeat(repeats, 1, 1, 1)).view(repeats, len(x))


def standard_error(*draws: torch.Tensor) -> torch.Tensor:
    """Standard error of the difference of the means of independent (R, N) draws, per image."""
    return torch.sqrt(sum(d.var(0) / len(d) for d in draws))


@pytest.mark.parametrize("num_latent_layers", [1, 3])
def test_elbo_below_iwae_below_log_likelihood_and_iwae_grows_with_k(num_latent_layers):
    model = LinearGaussianChain(num_latent_layers)
    model.use_wrong_posterior()
    x = model.data(4)
    log_p = model.log_marginal(x)
    g = torch.Generator().manual_seed(1)
    repeats = 400
    elbo = repeated(lambda v: model.elbo(v, generator=g).negative_elbo_nats, x, repeats)
    iwae = {
        k: repeated(lambda v, k=k: model.iwae(v, k, generator=g).negative_bound_nats, x, repeats) for k in (1, 4, 32)
    }
    assert ((iwae[1].mean(0) - elbo.mean(0)).abs() < 5 * standard_error(iwae[1], elbo)).all()  # E[IWAE_1] = ELBO
    assert (iwae[4].mean(0) > iwae[1].mean(0) - 5 * standard_error(iwae[4], iwae[1])).all()
    assert (iwae[32].mean(0) > iwae[4].mean(0) - 5 * standard_error(iwae[32], iwae[4])).all()
    assert (iwae[32].mean(0) - elbo.mean(0) > 5 * standard_error(iwae[32], elbo)).all()  # strictly tighter here
    assert (log_p - elbo.mean(0) > 5 * standard_error(elbo)).all()  # the gap is KL(q || p(z | x)) > 0
    assert (iwae[32].mean(0) < log_p + 5 * standard_error(iwae[32])).all()


@pytest.mark.parametrize("num_latent_layers", [1, 3])
def test_bounds_are_tight_when_q_is_the_true_posterior(num_latent_layers):
    model = LinearGaussianChain(num_latent_layers)
    x = model.data(3)
    log_p = model.log_marginal(x)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # log p(x, z) - log q(z | x) = log p(x) for every z
        assert torch.allclose(model.log_importance_weight(x, g), log_p, rtol=1e-10)
    assert torch.allclose(-model.iwae(x, 5, generator=g).negative_bound_nats, log_p, rtol=1e-10)
    # the ELBO's estimator (Monte-Carlo reconstruction and layer terms, closed-form top KL) is unbiased for it
    draws = repeated(lambda v: model.elbo(v, generator=g).negative_elbo_nats, x, 2000)
    assert ((draws.mean(0) - log_p).abs() < 5 * standard_error(draws)).all()


# ------------------------------------------------------------------------------------------- the convolutional model
def test_hierarchical_terms_add_up_and_convert_to_bits_per_dim():
    vae = tiny_vae(num_latent_layers=3)
    x = mnist_like_pixels(2)[:, None].float() / 127.5 - 1
    out = vae.elbo(x, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert out.layer_nats.shape == (2, 2) and out.reconstruction_nats.shape == out.kl_nats.shape == (2,)
    assert torch.allclose(out.negative_elbo_nats, out.reconstruction_nats + out.kl_nats + out.layer_nats.sum(1))
    assert torch.allclose(out.bits_per_dim, out.negative_elbo_nats / (28 * 28 * math.log(2)))
    assert (out.reconstruction_nats > 0).all() and (out.kl_nats > 0).all()
    iwae = vae.iwae(x, 3, generator=torch.Generator().manual_seed(0))
    assert iwae.bits_per_dim.shape == (2,)
    assert torch.allclose(iwae.bits_per_dim, iwae.negative_bound_nats / (28 * 28 * math.log(2)))


def test_the_top_kl_is_the_closed_form_kl_of_the_encoder_to_the_standard_normal():
    vae = tiny_vae(num_latent_layers=1)
    x = mnist_like_pixels(3)[:, None].float() / 127.5 - 1
    out = vae.elbo(x, generator=torch.Generator().manual_seed(0))
    assert out.layer_nats.shape == (3, 0)
    torch.testing.assert_close(out.kl_nats, kl_to_standard_normal(*vae.encode(x)), rtol=0, atol=0)


def test_elbo_is_the_average_of_its_monte_carlo_draws():
    vae = tiny_vae(num_latent_layers=2)
    x = mnist_like_pixels(2)[:, None].float() / 127.5 - 1
    averaged = vae.elbo(x, num_samples=3, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    singles = [vae.elbo(x, num_samples=1, generator=g) for _ in range(3)]
    for name in ("reconstruction_nats", "kl_nats", "layer_nats", "negative_elbo_nats"):
        assert torch.allclose(
            getattr(averaged, name), torch.stack([getattr(s, name) for s in singles]).mean(0), atol=1e-4
        )


def test_training_loss_is_the_one_sample_bound_and_trains_every_parameter():
    vae = tiny_vae(num_latent_layers=2)
    x = mnist_like_pixels(4)[:, None].float() / 127.5 - 1
    loss = vae.training_loss(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loss, vae(x, generator=torch.Generator().manual_seed(3)).bits_per_dim)
    loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())


def test_bad_configs_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="divisible by 4"):
        GaussianVAE(sample_size=30)
    with pytest.raises(ValueError, match="num_latent_layers must be an integer >= 1, got 0"):
        GaussianVAE(num_latent_layers=0)
    vae = tiny_vae()
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        vae.elbo(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="k / 127.5 - 1"):
        vae.iwae(mnist_like_pixels(2)[:, None])
    with pytest.raises(ValueError, match="num_samples"):
        vae.elbo(torch.zeros(2, 1, 28, 28), num_samples=0)
