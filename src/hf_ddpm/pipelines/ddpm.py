"""HFDDPMPipeline: ancestral sampling from p_theta and the ELBO of images, as a diffusers pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..ddpm.chain import DiffusionChain
from ..ddpm.elbo import full_elbo, stratified_elbo
from ..ddpm.guidance import autoguided_output, check_guidance_scale
from ..ddpm.scheduler import HFDDPMScheduler, scheduler_from_config
from ..evaluation import (
    BOUND_BY_TIME_IMAGES,
    BatchBound,
    BoundByTime,
    BoundMixin,
    BoundOptions,
    draws_per_forward,
)
from ..hub.registration import HFDDPMRegistrationMixin
from ..image_utils import ImageInput, check_image_size, check_output_type, images_to_tensor, model_range_to_output
from ..models.unet import DenoisingUNet
from ..probability_flow import InterpolatedGamma, ProbabilityFlow, epsilon_from_prediction
from .callbacks import StepEndCallback, callback_tensor_names, run_step_end_callback

#: The samplers of an HFDDPMPipeline by name, each built from its scheduler config (``from_config``): "vdm", its own
#: HFDDPMScheduler (named so since 0.1), first; diffusers' DDPM, DDIM and DPM-Solver++ schedulers.
DDPM_SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "vdm": HFDDPMScheduler,
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
}


def network_layout(network: DenoisingUNet) -> dict:
    """A network's config without diffusers' bookkeeping keys (``_name_or_path``, ``_diffusers_version``, ...):
    what two networks must share to be the same network with other weights."""
    return {key: value for key, value in network.config.items() if not key.startswith("_")}


class HFDDPMPipeline(BoundMixin, HFDDPMRegistrationMixin, DiffusionPipeline):
    r"""Unconditional image generation with a :class:`DenoisingUNet`, and the exact likelihood bound of images.

    Args:
        unet (:class:`DenoisingUNet`): predicts the noise (or x_0, or v) and, with a learned variance, v.
        scheduler (:class:`HFDDPMScheduler` or any diffusers scheduler): the reverse process. Any diffusers scheduler
            (DDIM, DPM-Solver, ...) can be swapped in; it receives the model's first C channels. For a model with
            a learned variance, keep the :class:`HFDDPMScheduler` and pass fewer ``num_inference_steps`` instead: its
            respacing keeps the learned variances meaningful.
        guide_unet (:class:`DenoisingUNet`, *optional*): a weaker version of ``unet`` (train.py: the EMA weights of
            an earlier step of the same run) for autoguidance (:func:`~hf_ddpm.ddpm.guidance.autoguided_output`).
            Sampling only: the bound is ``unet``'s.
        guidance_scale (`float`): the default w of ``__call__`` (1: no guidance), saved in ``model_index.json``.

    Example:

    ```py
    >>> from hf_ddpm import HFDDPMPipeline
    >>> pipe = HFDDPMPipeline.from_pretrained("org/ddpm-mnist", revision="main")
    >>> images = pipe(batch_size=16, num_inference_steps=100).images
    >>> pipe.elbo(images).bits_per_dim
    ```

    ``elbo`` (:class:`~hf_ddpm.evaluation.BoundMixin`) computes, by default, all T terms of the bound of the full
    training chain, summed exactly, in float64 with the model's own variance type and prediction type (from the
    scheduler's config, which must carry a :class:`HFDDPMScheduler`'s keys), the x_0 estimate clipped to [-1, 1]
    in the denoising terms as the sampler clips it; ``BoundOptions(timesteps_per_image=K)`` gives the cheaper
    stratified estimate.
    """

    model_cpu_offload_seq = "unet->guide_unet"
    default_bound_options = BoundOptions(exact=True)
    _callback_tensor_inputs = ["latents", "sample", "pred_original_sample"]
    _optional_components = ["guide_unet"]

    def __init__(
        self,
        unet: DenoisingUNet,
        scheduler: HFDDPMScheduler,
        guide_unet: DenoisingUNet | None = None,
        guidance_scale: float = 1.0,
    ):
        super().__init__()
        if guide_unet is not None and network_layout(guide_unet) != network_layout(unet):
            raise ValueError(
                "guide_unet must be the same network as unet (the same config: layout, channels, variance); "
                "autoguidance takes a weaker version of the model, such as an earlier EMA of its training."
            )
        self.register_modules(unet=unet, scheduler=scheduler, guide_unet=guide_unet)
        self.check_guidance(guidance_scale)
        self.register_to_config(guidance_scale=float(guidance_scale))

    def check_guidance(self, guidance_scale: float) -> None:
        """Raise ``ValueError`` (one line) unless ``guidance_scale`` is finite and, where it is not 1, this
        pipeline has a ``guide_unet``."""
        check_guidance_scale(guidance_scale)
        if guidance_scale != 1 and self.guide_unet is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a guide_unet (autoguidance); this pipeline has none: "
                "pass guidance_scale=1."
            )

    def guided_output(self, model_input: torch.Tensor, t: torch.Tensor | int, guidance_scale: float) -> torch.Tensor:
        """The network output the sampler steps with: ``unet``'s, autoguided by ``guide_unet`` where
        ``guidance_scale`` is not 1 (:func:`~hf_ddpm.ddpm.guidance.autoguided_output`)."""
        self.check_guidance(guidance_scale)
        output = self.unet(model_input, t).sample
        if guidance_scale == 1:
            return output
        guide = self.guide_unet(model_input, t).sample
        return autoguided_output(output, guide, guidance_scale, self.unet.config.in_channels)

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
        callback_on_step_end: StepEndCallback | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guidance_scale: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Draw images by ancestral sampling x_T ~ N(0, I), x_{t-1} ~ p_theta(x_{t-1} | x_t).

        Args:
            batch_size (`int`): number of images.
            generator (`torch.Generator`, *optional*): makes sampling deterministic.
            num_inference_steps (`int`): length of the (respaced) reverse chain; 1000 = every training step.
            output_type (`str`): ``"pil"`` (list of PIL images), ``"np"`` (N, H, W, C) floats in [0, 1], or
                ``"pt"`` (N, C, H, W) floats in [0, 1].
            return_dict (`bool`): return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): diffusers' step-end callback, called after each step as
                ``callback_on_step_end(self, step_index, timestep, callback_kwargs)``; a ``"latents"`` entry in the
                dict it returns replaces x_{t-1} (see :mod:`hf_ddpm.pipelines.callbacks`).
            callback_on_step_end_tensor_inputs (`list[str]`): the tensors in ``callback_kwargs``, of
                ``_callback_tensor_inputs``: ``"latents"`` (x_{t-1}, the step's result), ``"sample"`` (x_t, its
                input) and ``"pred_original_sample"`` (the scheduler's x_0 estimate; for a scheduler that gives none,
                such as DPM-Solver, the training chain's x_0 from the network's prediction).
            guidance_scale (`float`, *optional*): autoguidance's w with ``guide_unet`` (1: the model alone); default
                the pipeline's ``config.guidance_scale``.
        """
        check_output_type(output_type)
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        self.check_guidance(scale)
        names = callback_tensor_names(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        config = self.unet.config
        channels = config.in_channels
        shape = (batch_size, channels, config.sample_size, config.sample_size)
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        for index, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(image, t)
            model_output = self._model_output_for(self.guided_output(model_input, t, scale), channels)
            step = self.scheduler.step(model_output, t, image, generator=generator)
            if callback_on_step_end is None:
                image = step.prev_sample
                continue
            pred_original = getattr(step, "pred_original_sample", None)
            if pred_original is None and "pred_original_sample" in names:  # DPM-Solver's step gives no x_0
                pred_original = self.train_chain.predict_original_sample(model_output[:, :channels], image, t)
            tensors = {"latents": step.prev_sample, "sample": image, "pred_original_sample": pred_original}
            image = run_step_end_callback(self, callback_on_step_end, index, t, tensors, names)
        image = model_range_to_output(image, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    @property
    def scheduler_choices(self) -> dict[str, Callable[[], SchedulerMixin]]:
        """The samplers this pipeline can be given by name (:func:`hf_ddpm.pipelines.auto.with_scheduler`), each
        a factory of a new scheduler built from this one's config by :func:`scheduler_from_config`:
        :data:`DDPM_SCHEDULERS`, the model's own first."""
        return {
            name: partial(scheduler_from_config, cls, self.scheduler.config) for name, cls in DDPM_SCHEDULERS.items()
        }

    @property
    def image_channels(self) -> int:
        """C, the channels of the images the model generates and scores."""
        return self.unet.config.in_channels

    @property
    def image_size(self) -> int:
        """H = W, the side of the images the model generates and scores."""
        return self.unet.config.sample_size

    @property
    def train_chain(self) -> DiffusionChain:
        """The frozen constants of the full chain the model was trained on, from the scheduler's config: whatever
        the scheduler was respaced or swapped to for sampling, the bound is that of the training chain."""
        return DiffusionChain.from_config(self.scheduler.config)

    def _model_output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output at (x_t, t), x_t cast to the network's dtype: the ``model_fn`` of every bound."""
        return self.unet(x_t.to(self.unet.dtype), t).sample

    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` on the execution device, once their size is checked against the network's."""
        check_image_size(images, self.unet.config.sample_size)
        return images.to(self._execution_device)

    def bound_terms(
        self, images: torch.Tensor, options: BoundOptions, generator: torch.Generator | None = None
    ) -> BatchBound:
        """The negative ELBO of one batch (N, C, H, W) in [-1, 1], per image and term, bits/dim: every term
        (``options.exact``, T network evaluations per image) or the unbiased stratified estimate from
        ``options.timesteps_per_image`` timesteps plus the exact reconstruction and prior terms. Float64. Called
        by :func:`hf_ddpm.evaluation.evaluate_bound`, the one entry point for a bound on a set of images."""
        x = self._checked(images)
        chain = self.train_chain
        T = chain.num_train_timesteps
        clip = options.clip_denoised
        if options.exact:
            out = full_elbo(
                chain,
                self._model_output,
                x,
                generator=generator,
                clip_denoised=clip,
                timesteps_per_forward=draws_per_forward(x.device, len(x)),
            )
            estimator = f"exact: all {T} terms"
        else:
            k = options.timesteps_per_image
            out = stratified_elbo(
                chain,
                self._model_output,
                x,
                timesteps_per_image=k,
                generator=generator,
                clip_denoised=clip,
                timesteps_per_forward=draws_per_forward(x.device, len(x)),
            )
            estimator = (
                f"unbiased stratified estimate of the full {T}-term bound, {k} timesteps per image "
                "+ exact reconstruction and prior terms"
            )
        if clip:
            estimator += "; x_0 estimate clipped to [-1, 1] in the denoising terms"
        terms = {"prior": out.prior_term, "denoising": out.denoising_terms, "reconstruction": out.reconstruction_term}
        return BatchBound(terms=terms, estimator=estimator)

    @torch.no_grad()
    def bound_by_time(
        self,
        images: ImageInput,
        *,
        num_images: int | None = BOUND_BY_TIME_IMAGES,
        clip_denoised: bool = True,
        generator: torch.Generator | None = None,
    ) -> BoundByTime:
        """Where the negative ELBO of the first ``num_images`` of ``images`` (None: all) goes along the chain: the T
        terms of the exact bound (:func:`~hf_ddpm.ddpm.elbo.full_elbo`, the terms ``elbo`` sums), one per timestep,
        in bits/dim, averaged over the images, float64. t = 0 is the reconstruction term -log p(x_0 | x_1), t >= 1
        the denoising KLs; with the prior term (in the label) they add up to the whole bound. T network evaluations
        per image.

        Args:
            images: a float tensor (N, C, H, W) in [-1, 1] on the 8-bit grid, uint8 arrays, or PIL images.
            num_images: how many of the images (None: all).
            clip_denoised: the x_0 estimate clipped to [-1, 1] in the denoising terms, as ``BoundOptions`` (default)
                and the sampler clip it.
            generator: for the x_t ~ q(x_t | x_0) draws.
        """
        x = self._checked(images_to_tensor(images, self.image_channels)[:num_images]).double()
        chain = self.train_chain
        out = full_elbo(
            chain,
            self._model_output,
            x,
            generator=generator,
            keep_per_timestep=True,
            clip_denoised=clip_denoised,
            timesteps_per_forward=draws_per_forward(x.device, len(x)),
        )
        terms = out.per_timestep.mean(dim=0).cpu()
        label = (
            f"negative ELBO {out.bits_per_dim.mean().item():.4f} bits/dim = sum of the {len(terms)} terms shown "
            f"(t = 0: reconstruction {terms[0].item():.4f}) + prior {out.prior_term.mean().item():.2e}; "
            f"mean of {x.shape[0]} images"
        )
        return BoundByTime(torch.as_tensor(chain.timesteps, dtype=torch.long), terms, label)

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
