"""GaussianVAE: the source's first model, a VAE with a Gaussian encoder, a standard normal prior and the ELBO

    log p(x) >= ELBO = E_q(z|x)[log p_theta(x|z)] - KL(q_phi(z|x) || p(z)),

and, with ``num_latent_layers = L > 1``, the Markovian hierarchical VAE: latents z_1..z_L with
q(z_1|x) prod_l q(z_{l+1}|z_l) and p(z_L) prod_l p(z_l|z_{l+1}) p(x|z_1), whose ELBO splits into a reconstruction
term, one term per intermediate layer, E_q[log q(z_l|z_{l-1}) - log p(z_l|z_{l+1})], and the top prior-matching
KL(q(z_L|z_{L-1}) || N(0, I)). The decoder p_theta(x|z_1) is the discretized Gaussian over the 256 levels of 8-bit
data that the diffusion model's reconstruction term uses, so bits/dim are comparable between the two models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from torch.nn import functional as F

from ..losses import discretized_gaussian_log_likelihood, gaussian_log_density, nats_to_bits_per_dim, normal_kl, sum_over_pixels

#: Bounds of the decoder's per-pixel log standard deviation (e^-7 is far below one 8-bit bin, 2/255).
LOG_SCALE_RANGE = (-7.0, 2.0)


@dataclass
class VAEELBOOutput(BaseOutput):
    """The ELBO of each image and its terms; per-image tensors of shape (N,), as non-negative contributions to the
    negative ELBO, in nats (``*_nats``) and the whole in bits/dim.

    Args:
        reconstruction_nats: -E_q[log p_theta(x | z_1)], Monte-Carlo average over the samples of z.
        kl_nats: the top prior-matching term KL(q(z_L | z_{L-1}) || N(0, I)) in closed form (z_0 = x), averaged
            over the samples of z_{L-1} (exact for L = 1).
        layer_nats: (N, L-1), E_q[log q(z_l | z_{l-1}) - log p(z_l | z_{l+1})] for l = 1..L-1 (empty for L = 1).
        negative_elbo_nats: the sum of the above.
        bits_per_dim: negative_elbo_nats in bits/dim.
    """

    reconstruction_nats: torch.Tensor
    kl_nats: torch.Tensor = None  # defaults: diffusers' BaseOutput can then be rebuilt from a dict (accelerate does)
    layer_nats: torch.Tensor = None
    negative_elbo_nats: torch.Tensor = None
    bits_per_dim: torch.Tensor = None


@dataclass
class IWAEOutput(BaseOutput):
    """The importance-weighted bound -log (1/K sum_k p(x, z_k) / q(z_k | x)) of each image: nats and bits/dim, (N,)."""

    negative_bound_nats: torch.Tensor
    bits_per_dim: torch.Tensor = None


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, out_features))


class GaussianVAE(ModelMixin, ConfigMixin):
    r"""Convolutional VAE with a Gaussian encoder q_phi(z|x) = N(mu_phi(x), diag sigma_phi(x)^2), prior N(0, I) and a
    discretized Gaussian decoder; optionally a Markovian hierarchy of ``num_latent_layers`` latents.

    Args:
        sample_size (`int`): image height and width, divisible by 4.
        in_channels (`int`): C.
        latent_dim (`int`): dimension of every latent z_l.
        block_out_channels (`tuple[int, int]`): encoder channels at H/2 and H/4 (the decoder mirrors them).
        hidden_dim (`int`): width of the MLPs between latent layers.
        num_latent_layers (`int`): L; 1 is the plain VAE.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        latent_dim: int = 32,
        block_out_channels: tuple[int, int] = (32, 64),
        hidden_dim: int = 256,
        num_latent_layers: int = 1,
    ):
        super().__init__()
        if sample_size % 4:
            raise ValueError(f"GaussianVAE halves the image twice: sample_size must be divisible by 4, got {sample_size}.")
        if num_latent_layers < 1:
            raise ValueError(f"num_latent_layers must be at least 1, got {num_latent_layers}.")
        c1, c2 = block_out_channels
        self.coarse = sample_size // 4
        flat = c2 * self.coarse * self.coarse
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(flat, 2 * latent_dim),
        )
        self.decoder_in = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.SiLU(), nn.Upsample(scale_factor=2), nn.Conv2d(c2, c1, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(c1, 2 * in_channels, 3, padding=1),
        )
        # q(z_{l+1} | z_l) and p(z_l | z_{l+1}) for l = 1..L-1
        self.up_transitions = nn.ModuleList([_mlp(latent_dim, hidden_dim, 2 * latent_dim) for _ in range(num_latent_layers - 1)])
        self.down_transitions = nn.ModuleList([_mlp(latent_dim, hidden_dim, 2 * latent_dim) for _ in range(num_latent_layers - 1)])

    # ------------------------------------------------------------------ the distributions
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_phi(z_1 | x) = N(mu, diag e^logvar): (mean, logvar), each (N, latent_dim), in at least float32 (the
        bound's terms are never computed in a mixed-precision network's bf16/fp16)."""
        return self.encoder(x).to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=1)

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + e^(logvar/2) * eps, eps ~ N(0, I): a sample of N(mean, e^logvar) differentiable in both."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype) if generator is not None else torch.randn_like(mean)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p_theta(x | z_1): the discretized Gaussian's per-pixel (mean, log_scale), each (N, C, H, W)."""
        h = self.decoder_in(z).view(len(z), -1, self.coarse, self.coarse)
        mean, log_scale = self.decoder(h).to(torch.promote_types(z.dtype, torch.float32)).chunk(2, dim=1)
        return mean, log_scale.clamp(*LOG_SCALE_RANGE)

    def reconstruction_log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p_theta(x | z_1) per image, nats: the discretized Gaussian summed over pixels, (N,)."""
        mean, log_scale = self.decode(z)
        return sum_over_pixels(discretized_gaussian_log_likelihood(x, mean, log_scale))

    @staticmethod
    def kl_to_prior(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, e^logvar) || N(0, I)) in closed form, = 1/2 sum(mean^2 + e^logvar - 1 - logvar), (N,)."""
        zeros = torch.zeros_like(mean)
        return sum_over_pixels(normal_kl(mean, logvar, zeros, zeros))

    def encode_chain(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One draw z_1..z_L ~ q: [(mean_l, logvar_l, z_l)] for l = 1..L, each parameter of q(z_l | z_{l-1})."""
        mean, logvar = self.encode(x)
        chain = [(mean, logvar, self.reparameterize(mean, logvar, generator))]
        for transition in self.up_transitions:
            mean, logvar = transition(chain[-1][2]).to(mean.dtype).chunk(2, dim=1)
            chain.append((mean, logvar, self.reparameterize(mean, logvar, generator)))
        return chain

    def prior_transition(self, layer: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_layer | z_{layer+1}) = N(mean, diag e^logvar) for layer = 1..L-1 (1-based): (mean, logvar)."""
        return self.down_transitions[layer - 1](z_above).to(z_above.dtype).chunk(2, dim=1)

    # ------------------------------------------------------------------ the bounds
    def _terms(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """One-sample terms: (-log p(x|z_1), top KL, (N, L-1) layer terms, the chain)."""
        chain = self.encode_chain(x, generator)
        reconstruction = -self.reconstruction_log_likelihood(x, chain[0][2])
        top_mean, top_logvar, _ = chain[-1]
        kl = self.kl_to_prior(top_mean, top_logvar)
        layers = [
            sum_over_pixels(gaussian_log_density(z, mean, logvar) - gaussian_log_density(z, *self.prior_transition(l + 1, chain[l + 1][2])))
            for l, (mean, logvar, z) in enumerate(chain[:-1])
        ]
        layer_terms = torch.stack(layers, dim=1) if layers else x.new_zeros(len(x), 0)
        return reconstruction, kl, layer_terms, chain

    def elbo(self, x: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None) -> VAEELBOOutput:
        """The ELBO of each image (N, C, H, W) in [-1, 1] on the 8-bit grid, the reconstruction term averaged over
        ``num_samples`` draws of z (Monte Carlo), the top KL in closed form."""
        draws = [self._terms(x, generator)[:3] for _ in range(num_samples)]
        reconstruction, kl, layers = (torch.stack([d[i] for d in draws]).mean(0) for i in range(3))
        total = reconstruction + kl + layers.sum(dim=1)
        return VAEELBOOutput(
            reconstruction_nats=reconstruction, kl_nats=kl, layer_nats=layers, negative_elbo_nats=total,
            bits_per_dim=nats_to_bits_per_dim(total, x[0].numel()),
        )

    def log_importance_weight(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """log p(x, z_1:L) - log q(z_1:L | x) for one draw of z ~ q, per image, (N,)."""
        chain = self.encode_chain(x, generator)
        log_p = self.reconstruction_log_likelihood(x, chain[0][2])
        top = chain[-1][2]
        log_p = log_p + sum_over_pixels(gaussian_log_density(top, torch.zeros_like(top), torch.zeros_like(top)))
        for l in range(len(chain) - 1):
            log_p = log_p + sum_over_pixels(gaussian_log_density(chain[l][2], *self.prior_transition(l + 1, chain[l + 1][2])))
        log_q = sum(sum_over_pixels(gaussian_log_density(z, mean, logvar)) for mean, logvar, z in chain)
        return log_p - log_q

    def iwae(self, x: torch.Tensor, num_samples: int = 16, generator: torch.Generator | None = None) -> IWAEOutput:
        """The importance-weighted bound log (1/K sum_k w_k), w_k = p(x, z_k) / q(z_k | x), K = ``num_samples``:
        ELBO <= IWAE_K <= log p(x), non-decreasing in K (Burda et al., 2016). Returned as its negative."""
        log_weights = torch.stack([self.log_importance_weight(x, generator) for _ in range(num_samples)])
        bound = torch.logsumexp(log_weights, dim=0) - math.log(num_samples)
        return IWAEOutput(negative_bound_nats=-bound, bits_per_dim=nats_to_bits_per_dim(-bound, x[0].numel()))

    def forward(self, sample: torch.Tensor, generator: torch.Generator | None = None) -> VAEELBOOutput:
        """The one-sample ELBO of a batch (what training minimises: ``output.bits_per_dim.mean()``)."""
        return self.elbo(sample, num_samples=1, generator=generator)

    @torch.no_grad()
    def sample_prior(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sample z_L ~ N(0, I), z_l ~ p(z_l | z_{l+1}), x = the decoder's mean; (N, C, H, W)."""
        device = self.decoder_in.weight.device
        z = torch.randn((batch_size, self.config.latent_dim), generator=generator, device=device if generator is None else generator.device).to(device)
        for layer in range(self.config.num_latent_layers - 1, 0, -1):
            z = self.reparameterize(*self.prior_transition(layer, z), generator)
        return self.decode(z)[0]
