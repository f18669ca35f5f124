"""VAEPipeline: sampling from the Gaussian VAE's prior, and its ELBO and IWAE bounds of images."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..distributions import nats_to_bits_per_dim
from ..evaluation import BatchBound, BoundMixin, BoundOptions
from ..hub.registration import HFDDPMRegistrationMixin
from ..image_utils import check_output_type, model_range_to_output
from ..vae.model import GaussianVAE


class VAEPipeline(BoundMixin, HFDDPMRegistrationMixin, DiffusionPipeline):
    r"""Unconditional image generation with a :class:`GaussianVAE`, and its likelihood bounds.

    Saved with ``save_pretrained`` (safetensors), the component is recorded as ``["hf_ddpm", "GaussianVAE"]`` in
    ``model_index.json``; ``from_pretrained`` loads a folder or a Hub repo id.

    Args:
        vae (:class:`GaussianVAE`): the encoder, the decoder and (with L > 1) the latent transitions.

    Example:

    ```py
    >>> from hf_ddpm import BoundOptions, VAEPipeline
    >>> pipe = VAEPipeline.from_pretrained("org/vae-mnist", revision="main")
    >>> images = pipe(batch_size=16).images
    >>> pipe.elbo(images).bits_per_dim, pipe.elbo(images, options=BoundOptions(iwae_samples=64)).iwae_bits_per_dim
    ```

    ``elbo`` (:class:`~hf_ddpm.evaluation.BoundMixin`) computes, by default, the ELBO with one draw of z per image
    (:meth:`GaussianVAE.elbo`) and no importance-weighted bound; ``BoundOptions(elbo_samples=S, iwae_samples=K)``
    averages S draws and adds IWAE_K (:meth:`GaussianVAE.iwae`, drawn after the ELBO's draws).
    """

    model_cpu_offload_seq = "vae"
    default_bound_options = BoundOptions(elbo_samples=1, iwae_samples=0)

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
        x = images.to(device=self._execution_device, dtype=self.vae.dtype)  # the network's dtype
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
