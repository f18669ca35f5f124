"""GaussianVAE: the source's first model, a VAE with a Gaussian encoder, a standard normal prior and the ELBO

    log p(x) >= ELBO = E_q(z|x)[log p_theta(x|z)] - KL(q_phi(z|x) || p(z)),

and, with ``num_latent_layers = L > 1``, the source's Markovian hierarchical VAE: latents z_1..z_L with

    q(z_1:L | x) = q(z_1 | x) prod_{l=2}^{L} q(z_l | z_{l-1}),
    p(x, z_1:L) = p(z_L) prod_{l=1}^{L-1} p(z_l | z_{l+1}) p(x | z_1),

whose ELBO splits, per image, into

    -ELBO = -E_q[log p(x | z_1)]                                           reconstruction term
            + sum_{l=1}^{L-1} E_q[log q(z_l | z_{l-1}) - log p(z_l | z_{l+1})]  one term per intermediate layer
            + E_q[KL(q(z_L | z_{L-1}) || N(0, I))]                          top prior-matching term    (z_0 = x).

The decoder p_theta(x | z_1) is the discretized Gaussian over the 256 levels of 8-bit data that the diffusion model's
reconstruction term uses (:func:`hf_ddpm.distributions.discretized_gaussian_log_likelihood`), so bits/dim are
comparable between the two models. The importance-weighted bound (Burda et al., 2016) with K samples
z^(k) ~ q(z_1:L | x),

    IWAE_K = log (1/K) sum_k p(x, z^(k)) / q(z^(k) | x),    ELBO = E[IWAE_1] <= E[IWAE_K] <= E[IWAE_{K+1}] <= log p(x),

is the tighter estimate of log p(x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..config_checks import check_fits_in_memory, check_integer, check_integer_list
from ..distributions import (
    discretized_gaussian_log_likelihood,
    gaussian_log_density,
    kl_to_standard_normal,
    nats_to_bits_per_dim,
    sum_over_pixels,
)

#: Bounds of the decoder's per-pixel log standard deviation (e^-7 is far below one 8-bit bin, 2/255).
LOG_SCALE_RANGE = (-7.0, 2.0)


@dataclass
class VAEELBOOutput(BaseOutput):
    """The ELBO of each image and its terms, as non-negative contributions to the negative ELBO: tensors of shape (N,)
    in nats per image (``*_nats``), the whole also in bits/dim. ``negative_elbo_nats = reconstruction_nats + kl_nats +
    layer_nats.sum(1)``; :func:`hf_ddpm.distributions.nats_to_bits_per_dim` converts any term.

    Args:
        reconstruction_nats: -E_q[log p_theta(x | z_1)], the Monte-Carlo average over the samples of z.
        kl_nats: the top prior-matching term KL(q(z_L | z_{L-1}) || N(0, I)) in closed form (z_0 = x), averaged over
            the samples of z_{L-1}; for L = 1 it is KL(q(z | x) || p(z)), exact.
        layer_nats: (N, L-1), E_q[log q(z_l | z_{l-1}) - log p(z_l | z_{l+1})] for l = 1..L-1, Monte-Carlo averages
            ((N, 0) for L = 1).
        negative_elbo_nats: -ELBO, the sum of the above.
        bits_per_dim: -ELBO in bits/dim, an upper bound on -log2 p(x) / D (in expectation over the samples).
    """

    reconstruction_nats: torch.Tensor
    # Defaults, so that accelerate can rebuild the output from a dict (diffusers' BaseOutput fills them from it).
    kl_nats: torch.Tensor | None = None
    layer_nats: torch.Tensor | None = None
    negative_elbo_nats: torch.Tensor | None = None
    bits_per_dim: torch.Tensor | None = None


@dataclass
class IWAEOutput(BaseOutput):
    """The negative importance-weighted bound -IWAE_K = -log (1/K sum_k p(x, z_k) / q(z_k | x)) of each image, (N,):
    in nats per image and in bits/dim."""

    negative_bound_nats: torch.Tensor
    bits_per_dim: torch.Tensor | None = None


class LatentSample(NamedTuple):
    """One layer of a draw from q: z_l and the parameters of the Gaussian it was drawn from, each (N, latent_dim)."""

    mean: torch.Tensor
    logvar: torch.Tensor
    sample: torch.Tensor


def log_mean_exp(values: torch.Tensor) -> torch.Tensor:
    """log (1/K sum_k e^values_k) over the first dimension, computed stably: (K, N) -> (N,). With the log importance
    weights log p(x, z_k) - log q(z_k | x) this is the IWAE_K estimate of log p(x)."""
    return torch.logsumexp(values, dim=0) - math.log(values.shape[0])


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """Linear -> SiLU -> linear, (N, in_features) -> (N, out_features): one latent transition's network."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, out_features))


def vae_size_lower_bounds(
    sample_size: int,
    in_channels: int,
    latent_dim: int,
    block_out_channels: Sequence[int],
    hidden_dim: int,
    num_latent_layers: int,
) -> tuple[int, int]:
    """(parameters, activation values of one image) of a :class:`GaussianVAE` from its config alone, before anything
    is allocated. With S = ``sample_size``, C = ``in_channels``, D = ``latent_dim``, (c_1, c_2) =
    ``block_out_channels``, H = ``hidden_dim``, L = ``num_latent_layers`` and F = c_2 (S/4)^2 (the flattened
    coarsest feature map):

    parameters, exactly: 9 C c_1 + c_1 + 9 c_1 c_2 + c_2 + 2 D F + 2 D (encoder) + D F + F (decoder_in)
    + 9 c_2 c_1 + c_1 + 18 c_1 C + 2 C (decoder) + 2 (L - 1) (3 D H + H + 2 D) (the transitions' MLPs);
    activations >= c_1 (S/2)^2 + c_2 (S/4)^2 (the encoder's feature maps) + c_1 S^2 + 2 C S^2 (the decoder's at
    full resolution).
    """
    (c1, c2), size, channels = block_out_channels, sample_size, in_channels
    flat = c2 * (size // 4) ** 2
    encoder = 9 * channels * c1 + c1 + 9 * c1 * c2 + c2 + 2 * latent_dim * flat + 2 * latent_dim
    decoder = latent_dim * flat + flat + 9 * c2 * c1 + c1 + 18 * c1 * channels + 2 * channels
    transitions = 2 * (num_latent_layers - 1) * (3 * latent_dim * hidden_dim + hidden_dim + 2 * latent_dim)
    activations = c1 * (size // 2) ** 2 + c2 * (size // 4) ** 2 + (c1 + 2 * channels) * size**2
    return encoder + decoder + transitions, activations


def check_vae_config(
    sample_size: object,
    in_channels: object,
    latent_dim: object,
    block_out_channels: object,
    hidden_dim: object,
    num_latent_layers: object,
) -> None:
    """Refuse, in one line (``ValueError``), a :class:`GaussianVAE` config of wrong types or ranges (a hand-edited
    or hostile config.json), and one whose weights and activations at batch 1 (float32,
    :func:`vae_size_lower_bounds`) would not fit in the memory available, before anything is allocated."""
    counts = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "latent_dim": latent_dim,
        "hidden_dim": hidden_dim,
        "num_latent_layers": num_latent_layers,
    }
    for name, value in counts.items():
        check_integer("GaussianVAE", name, value)
    check_integer_list("GaussianVAE", "block_out_channels", block_out_channels)
    if sample_size % 4:
        raise ValueError(f"GaussianVAE halves the image twice: sample_size must be divisible by 4, got {sample_size}.")
    if len(block_out_channels) != 2:
        raise ValueError(
            f"GaussianVAE config: block_out_channels gives the channels at H/2 and H/4: two numbers, got "
            f"{list(block_out_channels)}."
        )
    check_fits_in_memory(
        f"GaussianVAE config (sample_size {sample_size}, block_out_channels {list(block_out_channels)}, latent_dim "
        f"{latent_dim})",
        *vae_size_lower_bounds(
            sample_size, in_channels, latent_dim, block_out_channels, hidden_dim, num_latent_layers
        ),
        "use narrower layers, fewer latent dimensions or smaller images",
    )


def _split_gaussian(parameters: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A network's (N, 2D) output as the (mean, logvar) of a diagonal Gaussian, each (N, D) in ``dtype``."""
    return parameters.to(dtype).chunk(2, dim=1)


class GaussianVAE(ModelMixin, ConfigMixin):
    r"""Convolutional VAE with a Gaussian encoder q_phi(z|x) = N(mu_phi(x), diag sigma_phi(x)^2), prior N(0, I) and a
    discretized Gaussian decoder; optionally a Markovian hierarchy of ``num_latent_layers`` latents.

    The encoder is two stride-2 3x3 convolutions (H -> H/2 -> H/4) and a linear map to (mean, logvar) of z_1; the
    decoder mirrors it (linear map, then nearest upsampling and a 3x3 convolution twice) and outputs 2C channels: the
    per-pixel mean of the discretized Gaussian p_theta(x | z_1) and its per-pixel log standard deviation (learned
    per pixel from the decoder output, clamped to ``LOG_SCALE_RANGE``). With L > 1, each transition q(z_{l+1} | z_l)
    and p(z_l | z_{l+1}) is a diagonal Gaussian whose mean and log-variance come from a one-hidden-layer MLP.

    The default (28x28x1, 32 latent dimensions, L = 1) has 342,114 parameters; each further layer adds two MLPs
    (49,792 parameters at the default sizes).

    Args:
        sample_size (`int`): image height and width, divisible by 4.
        in_channels (`int`): C.
        latent_dim (`int`): dimension of every latent z_l.
        block_out_channels (`tuple[int, int]`): encoder channels at H/2 and H/4 (the decoder mirrors them).
        hidden_dim (`int`): width of the MLPs of the latent transitions (unused for L = 1).
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
        check_vae_config(sample_size, in_channels, latent_dim, block_out_channels, hidden_dim, num_latent_layers)
        c1, c2 = block_out_channels
        self.coarse_size = sample_size // 4
        flat = c2 * self.coarse_size**2
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(flat, 2 * latent_dim),
        )
        self.decoder_in = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c2, c1, 3, padding=1),
            nn.SiLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, 2 * in_channels, 3, padding=1),
        )
        # encoder_transitions[l - 1]: q(z_{l+1} | z_l); decoder_transitions[l - 1]: p(z_l | z_{l+1}); l = 1..L-1
        transitions = range(num_latent_layers - 1)
        self.encoder_transitions = nn.ModuleList(_mlp(latent_dim, hidden_dim, 2 * latent_dim) for _ in transitions)
        self.decoder_transitions = nn.ModuleList(_mlp(latent_dim, hidden_dim, 2 * latent_dim) for _ in transitions)

    def size_lower_bounds(self) -> tuple[int, int]:
        """(parameters, activation values of one image) of this network from its config alone
        (:func:`vae_size_lower_bounds`): what is checked against a device's memory before moving it there."""
        config = self.config
        return vae_size_lower_bounds(
            config.sample_size,
            config.in_channels,
            config.latent_dim,
            config.block_out_channels,
            config.hidden_dim,
            config.num_latent_layers,
        )

    # ------------------------------------------------------------------------------------ the distributions
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_phi(z_1 | x) = N(mean, diag e^logvar), mean = mu_phi(x), logvar = log sigma_phi(x)^2.

        Args:
            x: (N, C, H, W) images in [-1, 1].

        Returns:
            (mean, logvar), each (N, latent_dim), in at least float32 (the bound is never computed in the bf16/fp16
            of a mixed-precision network).
        """
        return _split_gaussian(self.encoder(x), torch.promote_types(x.dtype, torch.float32))

    def encoder_transition(self, layer: int, z_below: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_layer | z_{layer-1}) = N(mean, diag e^logvar) for layer = 2..L: (mean, logvar), each (N, latent_dim)."""
        return _split_gaussian(self.encoder_transitions[layer - 2](z_below), z_below.dtype)

    def decoder_transition(self, layer: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_layer | z_{layer+1}) = N(mean, diag e^logvar) for layer = 1..L-1: (mean, logvar), each
        (N, latent_dim)."""
        return _split_gaussian(self.decoder_transitions[layer - 1](z_above), z_above.dtype)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p_theta(x | z_1): the discretized Gaussian's per-pixel (mean, log_scale), each (N, C, H, W), log_scale =
        log sigma clamped to ``LOG_SCALE_RANGE``; z is (N, latent_dim)."""
        h = self.decoder_in(z).view(len(z), -1, self.coarse_size, self.coarse_size)
        mean, log_scale = self.decoder(h).to(torch.promote_types(z.dtype, torch.float32)).chunk(2, dim=1)
        return mean, log_scale.clamp(*LOG_SCALE_RANGE)

    @staticmethod
    def reparameterize(
        mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z = mean + e^(logvar / 2) * eps, eps ~ N(0, I): a sample of N(mean, diag e^logvar), differentiable in both
        parameters; the shape of ``mean``."""
        eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    @staticmethod
    def prior_log_density(z: torch.Tensor) -> torch.Tensor:
        """log p(z_L) = log N(z_L; 0, I) = -1/2 sum_i (log 2 pi + z_i^2): (N, D) -> (N,) nats."""
        zeros = torch.zeros_like(z)
        return sum_over_pixels(gaussian_log_density(z, zeros, zeros))

    def reconstruction_log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p_theta(x | z_1) = sum over pixels of log P(bin of x | mean, log_scale) from :meth:`decode` (the
        discretized Gaussian): x (N, C, H, W) on the 8-bit grid, z (N, latent_dim) -> (N,) nats."""
        mean, log_scale = self.decode(z)
        return sum_over_pixels(discretized_gaussian_log_likelihood(x, mean, log_scale))

    # ------------------------------------------------------------------------------------ one draw of the chain
    def sample_posterior(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[LatentSample]:
        """One ancestral draw z_1 ~ q(z_1 | x), z_l ~ q(z_l | z_{l-1}) for l = 2..L: L :class:`LatentSample`, layer 1
        first."""
        chain: list[LatentSample] = []
        for layer in range(1, self.config.num_latent_layers + 1):
            mean, logvar = self.encode(x) if layer == 1 else self.encoder_transition(layer, chain[-1].sample)
            chain.append(LatentSample(mean, logvar, self.reparameterize(mean, logvar, generator)))
        return chain

    @staticmethod
    def posterior_log_densities(chain: list[LatentSample]) -> torch.Tensor:
        """log q(z_l | z_{l-1}) of the draw for l = 1..L (z_0 = x), each summed over dimensions: (N, L) nats."""
        return torch.stack([sum_over_pixels(gaussian_log_density(z.sample, z.mean, z.logvar)) for z in chain], dim=1)

    def transition_log_densities(self, chain: list[LatentSample]) -> torch.Tensor:
        """log p(z_l | z_{l+1}) of the draw for l = 1..L-1, each summed over dimensions: (N, L-1) nats."""
        densities = [
            sum_over_pixels(gaussian_log_density(below.sample, *self.decoder_transition(layer, above.sample)))
            for layer, (below, above) in enumerate(zip(chain[:-1], chain[1:]), start=1)
        ]
        return torch.stack(densities, dim=1) if densities else chain[0].mean.new_zeros(len(chain[0].mean), 0)

    def layer_terms(self, chain: list[LatentSample]) -> torch.Tensor:
        """One-draw estimates of E_q[log q(z_l | z_{l-1}) - log p(z_l | z_{l+1})] for l = 1..L-1: (N, L-1) nats."""
        return self.posterior_log_densities(chain)[:, :-1] - self.transition_log_densities(chain)

    def log_joint(self, x: torch.Tensor, chain: list[LatentSample]) -> torch.Tensor:
        """log p(x, z_1:L) = log p(x | z_1) + sum_{l=1}^{L-1} log p(z_l | z_{l+1}) + log N(z_L; 0, I): (N,) nats."""
        return (
            self.reconstruction_log_likelihood(x, chain[0].sample)
            + self.transition_log_densities(chain).sum(dim=1)
            + self.prior_log_density(chain[-1].sample)
        )

    def log_posterior(self, chain: list[LatentSample]) -> torch.Tensor:
        """log q(z_1:L | x) = sum_{l=1}^{L} log q(z_l | z_{l-1}) of the draw (z_0 = x): (N,) nats."""
        return self.posterior_log_densities(chain).sum(dim=1)

    def log_importance_weight(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """log w = log p(x, z_1:L) - log q(z_1:L | x) for one draw z ~ q(z_1:L | x): (N,) nats. E_q[log w] is the
        ELBO; log E_q[w] = log p(x)."""
        chain = self.sample_posterior(x, generator)
        return self.log_joint(x, chain) - self.log_posterior(chain)

    # ------------------------------------------------------------------------------------ the bounds
    def elbo(self, x: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None) -> VAEELBOOutput:
        """The ELBO of each image and its terms (see :class:`VAEELBOOutput`): the reconstruction and layer terms are
        Monte-Carlo averages over ``num_samples`` draws z ~ q(z_1:L | x), (1/S) sum_s log p(x | z_1^(s)); the top KL
        is in closed form.

        Args:
            x: (N, C, H, W) images in [-1, 1] on the 8-bit grid (``hf_ddpm.image_utils.images_to_tensor`` makes
                them from uint8 or PIL images).
            num_samples: S, draws of z per image.
            generator: for the draws of z.
        """
        self._check_images(x, num_samples)
        reconstruction, kl, layers = [], [], []
        for _ in range(num_samples):
            chain = self.sample_posterior(x, generator)
            reconstruction.append(-self.reconstruction_log_likelihood(x, chain[0].sample))
            kl.append(kl_to_standard_normal(chain[-1].mean, chain[-1].logvar))
            layers.append(self.layer_terms(chain))
        reconstruction_nats, kl_nats, layer_nats = (
            torch.stack(draws).mean(0) for draws in (reconstruction, kl, layers)
        )
        total = reconstruction_nats + kl_nats + layer_nats.sum(dim=1)
        return VAEELBOOutput(
            reconstruction_nats=reconstruction_nats,
            kl_nats=kl_nats,
            layer_nats=layer_nats,
            negative_elbo_nats=total,
            bits_per_dim=nats_to_bits_per_dim(total, x[0].numel()),
        )

    def iwae(self, x: torch.Tensor, num_samples: int = 16, generator: torch.Generator | None = None) -> IWAEOutput:
        """The importance-weighted bound IWAE_K = log (1/K) sum_k w_k, log w_k from :meth:`log_importance_weight`,
        K = ``num_samples``, returned as its negative: E[IWAE_1] = ELBO <= E[IWAE_K] <= log p(x), non-decreasing in
        K. ``x`` as for :meth:`elbo`; K network passes, one per draw."""
        self._check_images(x, num_samples)
        log_weights = torch.stack([self.log_importance_weight(x, generator) for _ in range(num_samples)])
        negative_bound = -log_mean_exp(log_weights)
        return IWAEOutput(
            negative_bound_nats=negative_bound, bits_per_dim=nats_to_bits_per_dim(negative_bound, x[0].numel())
        )

    def training_loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What training minimises: the one-sample negative ELBO of each image in bits/dim, (N,) (average it over the
        batch). One encoder and one decoder pass. Under DistributedDataParallel call the wrapped model instead,
        ``model(x).bits_per_dim``: the same number, through ``forward`` so that gradients are synchronised."""
        return self.elbo(x, num_samples=1, generator=generator).bits_per_dim

    def forward(self, sample: torch.Tensor, generator: torch.Generator | None = None) -> VAEELBOOutput:
        """The one-sample ELBO of a batch (N, C, H, W), ``elbo(sample, num_samples=1)``; ``bits_per_dim`` is
        :meth:`training_loss`."""
        return self.elbo(sample, num_samples=1, generator=generator)

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample_prior(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z_1 of one ancestral draw from the prior, z_L ~ N(0, I), z_l ~ p(z_l | z_{l+1}): (batch_size, latent_dim).
        ``decode(z_1)`` gives p_theta(x | z_1)."""
        weight = self.decoder_in.weight
        z = randn_tensor(
            (batch_size, self.config.latent_dim), generator=generator, device=weight.device, dtype=weight.dtype
        )
        for layer in range(self.config.num_latent_layers - 1, 0, -1):
            z = self.reparameterize(*self.decoder_transition(layer, z), generator)
        return z

    def _check_images(self, x: torch.Tensor, num_samples: int) -> None:
        size, channels = self.config.sample_size, self.config.in_channels
        if x.dim() != 4 or tuple(x.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"GaussianVAE expects images of shape (N, {channels}, {size}, {size}), got {tuple(x.shape)}."
            )
        if not x.is_floating_point():
            raise ValueError(
                f"GaussianVAE expects float images in [-1, 1], got {x.dtype}; convert uint8 pixels k with k / 127.5 "
                "- 1 "
                "(hf_ddpm.image_utils.images_to_tensor)."
            )
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
