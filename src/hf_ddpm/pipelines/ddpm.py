"""HFDDPMPipeline: ancestral sampling from p_theta and the ELBO of images, as a diffusers pipeline."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..ddpm.chain import DiffusionChain
from ..ddpm.elbo import ELBOOutput, full_elbo, stratified_elbo
from ..ddpm.scheduler import HFDDPMScheduler
from ..evaluation import BatchBound, BoundOptions, evaluate_bound
from ..hub.registration import HFDDPMRegistrationMixin
from ..image_utils import ImageInput, check_output_type, model_range_to_output
from ..models.unet import DenoisingUNet
from ..probability_flow import InterpolatedGamma, ProbabilityFlow, epsilon_from_prediction


class HFDDPMPipeline(HFDDPMRegistrationMixin, DiffusionPipeline):
    r"""Unconditional image generation with a :class:`DenoisingUNet`, and the exact likelihood bound of images.

    Args:
        unet (:class:`DenoisingUNet`): predicts the noise (or x_0, or v) and, with a learned variance, v.
        scheduler (:class:`HFDDPMScheduler` or any diffusers scheduler): the reverse process. Any diffusers scheduler
            (DDIM, DPM-Solver, ...) can be swapped in; it receives the model's first C channels. For a model with
            a learned variance, keep the :class:`HFDDPMScheduler` and pass fewer ``num_inference_steps`` instead: its
            respacing keeps the learned variances meaningful.

    Example:

    ```py
    >>> from hf_ddpm import HFDDPMPipeline
    >>> pipe = HFDDPMPipeline.from_pretrained("org/ddpm-mnist", revision="main")
    >>> images = pipe(batch_size=16, num_inference_steps=100).images
    >>> pipe.elbo(images).bits_per_dim
    ```
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: DenoisingUNet, scheduler: HFDDPMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _model_output_for(self, model_output: torch.Tensor, channels: int) -> torch.Tensor:
        """The part of the model output the scheduler understands: all 2C channels for a HFDDPMScheduler or
        DDPMScheduler with a learned variance, the prediction's C channels for any other scheduler (DDIM, DPM-Solver,
        ... have no use for a variance; their configs may still carry ``variance_type`` from ours)."""
        learned = isinstance(self.scheduler, (HFDDPMScheduler, DDPMScheduler)) and str(
            self.scheduler.config.variance_type
        ).startswith("learned")
        return model_output if learned else model_output[:, :channels]

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""Draw images by ancestral sampling x_T ~ N(0, I), x_{t-1} ~ p_theta(x_{t-1} | x_t).

        Args:
            batch_size (`int`): number of images.
            generator (`torch.Generator`, *optional*): makes sampling deterministic.
            num_inference_steps (`int`): length of the (respaced) reverse chain; 1000 = every training step.
            output_type (`str`): ``"pil"`` (list of PIL images), ``"np"`` (N, H, W, C) floats in [0, 1], or
                ``"pt"`` (N, C, H, W) floats in [0, 1].
            return_dict (`bool`): return an ``ImagePipelineOutput`` rather than a tuple.
        """
        check_output_type(output_type)
        config = self.unet.config
        channels = config.in_channels
        shape = (batch_size, channels, config.sample_size, config.sample_size)
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(image, t)
            model_output = self._model_output_for(self.unet(model_input, t).sample, channels)
            image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample
        image = model_range_to_output(image, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    @property
    def image_channels(self) -> int:
        """C, the channels of the images the model generates and scores."""
        return self.unet.config.in_channels

    @property
    def train_chain(self) -> DiffusionChain:
        """The frozen constants of the full chain the model was trained on, from the scheduler's config: whatever
        the scheduler was respaced or swapped to for sampling, the bound is that of the training chain."""
        return DiffusionChain.from_config(self.scheduler.config)

    def bound_terms(
        self, images: torch.Tensor, options: BoundOptions, generator: torch.Generator | None = None
    ) -> BatchBound:
        """The negative ELBO of one batch (N, C, H, W) in [-1, 1], per image and term, bits/dim: every term
        (``options.exact``, T network evaluations per image) or the unbiased stratified estimate from
        ``options.timesteps_per_image`` timesteps plus the exact reconstruction and prior terms. Float64. Called
        by :func:`hf_ddpm.evaluation.evaluate_bound`, the one entry point for a bound on a set of images."""
        size = self.unet.config.sample_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"Images must be {size}x{size}, got {tuple(images.shape[-2:])}.")
        chain = self.train_chain
        x = images.to(self._execution_device)

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.unet(x_t.to(self.unet.dtype), t).sample

        T = chain.num_train_timesteps
        clip = options.clip_denoised
        if options.exact:
            out = full_elbo(chain, model_fn, x, generator=generator, clip_denoised=clip)
            estimator = f"exact: all {T} terms"
        else:
            k = options.timesteps_per_image
            out = stratified_elbo(chain, model_fn, x, timesteps_per_image=k, generator=generator, clip_denoised=clip)
            estimator = (
                f"unbiased stratified estimate of the full {T}-term bound, {k} timesteps per image "
                "+ exact reconstruction and prior terms"
            )
        if clip:
            estimator += "; x_0 estimate clipped to [-1, 1] in the denoising terms"
        terms = {"prior": out.prior_term, "denoising": out.denoising_terms, "reconstruction": out.reconstruction_term}
        return BatchBound(terms=terms, estimator=estimator)

    @torch.no_grad()
    def elbo(self, images: ImageInput, batch_size: int = 64, generator: torch.Generator | None = None) -> ELBOOutput:
        r"""The negative ELBO of each image in bits/dim: all T terms of the full training chain, summed exactly.

        Costs T network evaluations per image. The bound is computed in float64 with the model's own variance
        type and prediction type (from the scheduler's config, which must carry a :class:`HFDDPMScheduler`'s keys).
        :func:`hf_ddpm.evaluation.evaluate_bound` gives the same numbers summarised, or the cheaper stratified
        estimate.

        Args:
            images: a float tensor (N, C, H, W) in [-1, 1] on the 8-bit grid, uint8 arrays, or PIL images.
            batch_size (`int`): images per forward pass.
            generator (`torch.Generator`, *optional*): for the x_t ~ q(x_t | x_0) draws.
        """
        bound = evaluate_bound(
            self,
            images,
            BoundOptions(exact=True),
            batch_size=batch_size,
            generator=generator,
            progress=self.progress_bar,
        )
        terms = bound.per_image_terms
        return ELBOOutput(
            bits_per_dim=bound.per_image,
            prior_term=terms["prior"],
            denoising_terms=terms["denoising"],
            reconstruction_term=terms["reconstruction"],
        )

    def probability_flow(self) -> ProbabilityFlow:
        r"""The model in continuous time, for the probability-flow ODE's log-likelihood (``evaluate_bound`` with
        ``BoundOptions(estimator="ode")``, :func:`hf_ddpm.probability_flow.ode_log_likelihood`).

        gamma(t) = -log SNR interpolates the training chain's log((1 - abar_i) / abar_i) at t = (i + 1) / T
        (:meth:`~hf_ddpm.probability_flow.InterpolatedGamma.from_alphas_cumprod`: t = k / T is the latent x_k, t = 1
        is x_T), on [1/T, 1]; the network is called at the float timestep t T - 1 (the integer timesteps it was
        trained on, in between them elsewhere), and its prediction (the first C channels; a learned variance is not
        used) is turned into eps_hat for the model's prediction type. The ODE integrates the unclipped model.
        """
        chain = self.train_chain
        gamma = InterpolatedGamma.from_alphas_cumprod(chain.train_alphas_cumprod)
        steps, channels = chain.num_train_timesteps, self.image_channels

        def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            prediction = self.unet(x_t.to(self.unet.dtype), t * steps - 1.0).sample[:, :channels].to(x_t.dtype)
            return epsilon_from_prediction(prediction, x_t, gamma(t), chain.prediction_type)

        return ProbabilityFlow(
            gamma=gamma,
            gamma_rate=gamma.derivative,
            eps_model=eps_model,
            earliest_time=1.0 / steps,
            device=self._execution_device,
        )
