"""VAEPipeline: sampling from the Gaussian VAE's prior, and its ELBO and IWAE bounds of images."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..distributions import nats_to_bits_per_dim
from ..evaluation import BatchBound, BoundOptions
from ..hub.registration import HFDDPMRegistrationMixin
from ..image_utils import ImageInput, check_output_type, images_to_tensor, model_range_to_output
from ..vae.model import GaussianVAE, IWAEOutput, VAEELBOOutput


class VAEPipeline(HFDDPMRegistrationMixin, DiffusionPipeline):
    r"""Unconditional image generation with a :class:`GaussianVAE`, and its likelihood bounds.

    Saved with ``save_pretrained`` (safetensors), the component is recorded as ``["hf_ddpm", "GaussianVAE"]`` in
    ``model_index.json``; ``from_pretrained`` loads a folder or a Hub repo id.

    Args:
        vae (:class:`GaussianVAE`): the encoder, the decoder and (with L > 1) the latent transitions.

    Example:

    ```py
    >>> from hf_ddpm import VAEPipeline
    >>> pipe = VAEPipeline.from_pretrained("org/vae-mnist", revision="main")
    >>> images = pipe(batch_size=16).images
    >>> pipe.elbo(images).bits_per_dim, pipe.iwae(images, num_samples=64).bits_per_dim
    ```
    """

    model_cpu_offload_seq = "vae"

    def __init__(self, vae: GaussianVAE):
        super().__init__()
        self.register_modules(vae=vae)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""Draw z ~ p(z) (ancestrally through the latent chain) and return the decoder's mean images.

        The decoder's mean of p_theta(x | z), clipped to [-1, 1], is shown rather than a draw of the discretized
        Gaussian, whose independent per-pixel noise is what the likelihood needs but not what a picture of the model
        should show.

        Args:
            batch_size (`int`): number of images.
            generator (`torch.Generator`, *optional*): makes sampling deterministic.
            output_type (`str`): ``"pil"`` (list of PIL images), ``"np"`` (N, H, W, C) floats in [0, 1] or ``"pt"``
                (N, C, H, W) floats in [0, 1].
            return_dict (`bool`): return an ``ImagePipelineOutput`` rather than a tuple.
        """
        check_output_type(output_type)
        mean, _ = self.vae.decode(self.vae.sample_prior(batch_size, generator))
        image = model_range_to_output(mean, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    @property
    def scheduler_choices(self) -> dict[str, Callable[[], SchedulerMixin]]:
        """None: a VAE samples in one decoder pass, with no scheduler to choose."""
        return {}

    @property
    def image_channels(self) -> int:
        """C, the channels of the images the model generates and scores."""
        return self.vae.config.in_channels

    @property
    def image_size(self) -> int:
        """H = W, the side of the images the model generates and scores."""
        return self.vae.config.sample_size

    @torch.no_grad()
    def bound_terms(
        self, images: torch.Tensor, options: BoundOptions, generator: torch.Generator | None = None
    ) -> BatchBound:
        """The negative ELBO of one batch (N, C, H, W) in [-1, 1] with ``options.elbo_samples`` draws of z, per
        image and term in bits/dim (``reconstruction``, and ``kl``: the top KL plus the hierarchy's layer terms),
        and the importance-weighted bound with K = ``options.iwae_samples`` (none for 0). Called by
        :func:`hf_ddpm.evaluation.evaluate_bound`, the one entry point for a bound on a set of images."""
        x = images.to(self._execution_device)
        elbo = self.vae.elbo(x, num_samples=options.elbo_samples, generator=generator)
        dims = x[0].numel()
        terms = {
            "reconstruction": nats_to_bits_per_dim(elbo.reconstruction_nats, dims),
            "kl": nats_to_bits_per_dim(elbo.kl_nats + elbo.layer_nats.sum(dim=1), dims),
        }
        iwae = None
        estimator = f"ELBO with {options.elbo_samples} sample(s) of z"
        if options.iwae_samples:
            iwae = self.vae.iwae(x, num_samples=options.iwae_samples, generator=generator).bits_per_dim
            estimator += f"; IWAE with K={options.iwae_samples}"
        return BatchBound(terms=terms, estimator=estimator, iwae=iwae)

    def _to_model_input(self, images: ImageInput) -> torch.Tensor:
        return images_to_tensor(images, self.vae.config.in_channels).to(self._execution_device)

    @torch.no_grad()
    def elbo(
        self, images: ImageInput, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> VAEELBOOutput:
        """The ELBO of each image with ``num_samples`` Monte-Carlo draws of z (see :meth:`GaussianVAE.elbo`).

        Args:
            images: a float tensor (N, C, H, W) in [-1, 1] on the 8-bit grid, uint8 arrays, or PIL images (as for
                :meth:`HFDDPMPipeline.elbo`).
            num_samples (`int`): draws of z per image.
            generator (`torch.Generator`, *optional*): for the draws of z.
        """
        return self.vae.elbo(self._to_model_input(images), num_samples=num_samples, generator=generator)

    @torch.no_grad()
    def iwae(self, images: ImageInput, num_samples: int = 16, generator: torch.Generator | None = None) -> IWAEOutput:
        """The importance-weighted bound with K = ``num_samples`` draws of z (see :meth:`GaussianVAE.iwae`); images
        as for :meth:`elbo`."""
        return self.vae.iwae(self._to_model_input(images), num_samples=num_samples, generator=generator)
