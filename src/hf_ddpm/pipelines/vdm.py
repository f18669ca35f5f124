"""VDMPipeline: sampling from a continuous-time variational diffusion model (Kingma et al. 2021) and the bound of
images; :class:`VDMModel`, the network and the noise schedule as the one module that training optimises."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..distributions import nats_to_bits_per_dim
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
from ..probability_flow import ProbabilityFlow
from ..vdm.elbo import (
    VDMEpsilonModel,
    VDMLossTerms,
    clipped_estimate_model,
    continuous_diffusion_loss,
    continuous_time_bound_estimate,
    discrete_time_bound,
    prior_loss,
    reconstruction_loss,
    vdm_loss_terms,
)
from ..vdm.noise_schedule import VDM_SCHEDULE_INTERIOR_OBJECTIVES, DeferredGradientScale, NoiseSchedule
from ..vdm.scheduler import VDM_STEP_TYPES, VDMContinuousScheduler
from .callbacks import StepEndCallback, callback_tensor_names, run_step_end_callback

#: T of the discrete-time bound that ``BoundOptions(exact=True)`` computes (one network evaluation per step).
VDM_EXACT_BOUND_STEPS = 1000
#: The network is conditioned on 1000 t: the scale of the integer timesteps its sinusoidal embedding was made for.
VDM_TIME_SCALE = 1000.0
#: ``bound_by_time``'s grid of t, the midpoints (i + 1/2) / n, i = 0..n-1, and its noise draws per image at each.
VDM_BOUND_BY_TIME_TIMES = 200
VDM_BOUND_BY_TIME_DRAWS = 4


def vdm_epsilon(unet: DenoisingUNet, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps_hat(z_t, t) = unet(z_t, 1000 t), computed in the network's dtype and returned in that of ``z_t``.

    t is continuous in [0, 1], shape (B,) or a scalar. (VDM conditions its network on the normalised
    (gamma(t) - gamma_min) / (gamma_max - gamma_min) instead; with a fixed schedule the two differ only by a
    monotone change of variable.)
    """
    return unet(z_t.to(unet.dtype), VDM_TIME_SCALE * t).sample.to(z_t.dtype)


class VDMModel(nn.Module):
    r"""The trainable parts of a continuous-time VDM in one module: the noise-prediction network and the noise
    schedule gamma(t), so that one optimizer (and DDP, through :meth:`forward`) trains both.

    Args:
        unet (:class:`DenoisingUNet`): eps_hat(z_t, t), called as ``unet(z_t, 1000 t)``; ``learn_variance=False``.
        noise_schedule (:class:`NoiseSchedule`): gamma(t) = -log SNR(t); its endpoints gamma_0, gamma_1 (when
            learned) are trained on the same bound as the network.
        schedule_interior (`str`): what a ``learned`` schedule's interior (its shape between the endpoints) is
            trained on. ``bound``: the bound, like everything else (VDM's released code). ``variance``: the
            variance of the one-sample diffusion term, as the VDM paper's appendix describes: in continuous time
            the bound does not depend on the interior, only the estimator's noise does, so its gradient is
            replaced by d/d eta mean_i L_i^2 = mean_i 2 L_i dL_i/d eta (L_i in bits/dim).
    """

    def __init__(self, unet: DenoisingUNet, noise_schedule: NoiseSchedule, schedule_interior: str = "bound"):
        super().__init__()
        if unet.config.learn_variance:
            raise ValueError("A VDM's network predicts the noise only: use a DenoisingUNet with learn_variance=False.")
        if schedule_interior not in VDM_SCHEDULE_INTERIOR_OBJECTIVES:
            choices = " or ".join(VDM_SCHEDULE_INTERIOR_OBJECTIVES)
            raise ValueError(f"schedule_interior must be {choices}, got {schedule_interior!r}.")
        self.unet = unet
        self.noise_schedule = noise_schedule
        self.schedule_interior = schedule_interior

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> VDMLossTerms:
        r"""VDM's one-sample training objective per image in bits/dim: the terms of
        :func:`~hf_ddpm.vdm.elbo.vdm_loss_terms` (with L_inf) divided by D ln 2, D = C H W,

            L(x) = KL(q(z_1 | x) || N(0, I)) + 1/2 gamma'(t) ||eps - eps_hat(z_t, t)||^2 - log p(x | z_0),

        with low-discrepancy times t over the batch; ``total.mean()`` is an unbiased estimate of the batch's mean
        bound, differentiable in the network's and the schedule's parameters.

        Under autocast (mixed precision) only the network runs in the reduced precision: gamma, its derivative and
        the three terms are computed in float32, since gamma_0 = -13.3 and the decoder's 256 logits need more than
        bf16's 3 significant digits.
        """
        device_type = images.device.type
        autocast_enabled = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type)

        def model_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
                return vdm_epsilon(self.unet, z_t, t)

        x = images.float()
        interior_gradient = DeferredGradientScale() if self.schedule_interior == "variance" else None
        with torch.autocast(device_type, enabled=False):
            terms = vdm_loss_terms(self.noise_schedule, model_fn, x, generator, interior_gradient=interior_gradient)
        terms = terms.in_bits_per_dim(x[0].numel())
        if interior_gradient is not None:
            interior_gradient.scale = 2.0 * terms.diffusion.detach()
        return terms


class VDMPipeline(BoundMixin, HFDDPMRegistrationMixin, DiffusionPipeline):
    r"""Unconditional image generation with a continuous-time variational diffusion model (Kingma et al. 2021), and
    the likelihood bound of images.

    Args:
        unet (:class:`DenoisingUNet`): predicts the noise eps_hat(z_t, t), called as ``unet(z_t, 1000 t)``.
        noise_schedule (:class:`NoiseSchedule`): gamma(t) = -log SNR(t) on t in [0, 1], learned or fixed.
        scheduler (:class:`VDMContinuousScheduler`): ancestral or DDIM steps on the grid t_i = i / n.

    Example:

    ```py
    >>> from hf_ddpm import VDMPipeline
    >>> pipe = VDMPipeline.from_pretrained("org/vdm-mnist", revision="main")
    >>> images = pipe(batch_size=16, num_inference_steps=100).images
    >>> pipe.elbo(images).bits_per_dim
    ```

    ``elbo`` (:class:`~hf_ddpm.evaluation.BoundMixin`) computes, by default, the discrete-time bound with all
    T = 1000 steps summed (``bound_terms`` with ``BoundOptions(exact=True)``, T network evaluations per image);
    ``BoundOptions(timesteps_per_image=K)`` gives the cheaper estimate of the continuous-time bound.
    """

    model_cpu_offload_seq = "noise_schedule->unet"
    default_bound_options = BoundOptions(exact=True)
    _callback_tensor_inputs = ["latents", "sample", "pred_original_sample"]

    def __init__(self, unet: DenoisingUNet, noise_schedule: NoiseSchedule, scheduler: VDMContinuousScheduler):
        super().__init__()
        self.register_modules(unet=unet, noise_schedule=noise_schedule, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 100,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepEndCallback | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Draw images: z_1 ~ N(0, I), then n steps z_t -> z_s, s = t - 1/n, of the scheduler (ancestral:
        z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t, t))), the last of which returns x_hat clipped to [-1, 1].

        Args:
            batch_size (`int`): number of images.
            generator (`torch.Generator`, *optional*): makes sampling deterministic.
            num_inference_steps (`int`): n, the steps of the grid t_i = i / n.
            output_type (`str`): ``"pil"`` (list of PIL images), ``"np"`` (N, H, W, C) floats in [0, 1], or
                ``"pt"`` (N, C, H, W) floats in [0, 1].
            return_dict (`bool`): return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): diffusers' step-end callback, called after each step as
                ``callback_on_step_end(self, step_index, t, callback_kwargs)``; a ``"latents"`` entry in the dict it
                returns replaces z_s (see :mod:`hf_ddpm.pipelines.callbacks`).
            callback_on_step_end_tensor_inputs (`list[str]`): the tensors in ``callback_kwargs``, of
                ``_callback_tensor_inputs``: ``"latents"`` (z_s, the step's result), ``"sample"`` (z_t, its input)
                and ``"pred_original_sample"`` (the scheduler's x_hat(z_t, t)).
        """
        check_output_type(output_type)
        names = callback_tensor_names(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        config = self.unet.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device, noise_schedule=self.noise_schedule)
        for index, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_output = vdm_epsilon(self.unet, image, t)
            step = self.scheduler.step(model_output, t, image, generator=generator)
            if callback_on_step_end is None:
                image = step.prev_sample
                continue
            tensors = {"latents": step.prev_sample, "sample": image, "pred_original_sample": step.pred_original_sample}
            image = run_step_end_callback(self, callback_on_step_end, index, t, tensors, names)
        image = model_range_to_output(image, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    @property
    def scheduler_choices(self) -> dict[str, Callable[[], VDMContinuousScheduler]]:
        """The samplers this pipeline can be given by name (:func:`hf_ddpm.pipelines.auto.with_scheduler`): the
        step types of :class:`VDMContinuousScheduler` (``VDM_STEP_TYPES``), each a factory of a new scheduler with
        this one's config, its own step type first."""
        config = self.scheduler.config
        kinds = [config.step_type, *(kind for kind in VDM_STEP_TYPES if kind != config.step_type)]
        return {kind: partial(VDMContinuousScheduler.from_config, config, step_type=kind) for kind in kinds}

    @property
    def image_channels(self) -> int:
        """C, the channels of the images the model generates and scores."""
        return self.unet.config.in_channels

    def _epsilon_model(self, clip_denoised: bool) -> VDMEpsilonModel:
        """eps_hat(z_t, t) of the network (:func:`vdm_epsilon`), that of the data estimate clipped to [-1, 1]
        (:func:`~hf_ddpm.vdm.elbo.clipped_estimate_model`) with ``clip_denoised``: the ``model_fn`` of every bound."""

        def model_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return vdm_epsilon(self.unet, z_t, t)

        return clipped_estimate_model(self.noise_schedule, model_fn) if clip_denoised else model_fn

    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in float64 on the execution device, once their size is checked against the network's."""
        check_image_size(images, self.unet.config.sample_size)
        return images.to(device=self._execution_device, dtype=torch.float64)

    @property
    def image_size(self) -> int:
        """H = W, the side of the images the model generates and scores."""
        return self.unet.config.sample_size

    @torch.no_grad()
    def bound_terms(
        self, images: torch.Tensor, options: BoundOptions, generator: torch.Generator | None = None
    ) -> BatchBound:
        """The negative ELBO of one batch (N, C, H, W) in [-1, 1], per image and term in bits/dim (``prior``,
        ``diffusion``, ``reconstruction``), in float64. Called by :func:`hf_ddpm.evaluation.evaluate_bound`.

        * ``options.exact``: the discrete-time bound with T = 1000 steps, every step summed
          (:func:`~hf_ddpm.vdm.elbo.discrete_time_bound`: L_T = sum_i 1/2 expm1(gamma(i/T) -
          gamma((i-1)/T)) ||eps_i - eps_hat(z_{i/T}, i/T)||^2, one z per step), T network evaluations per image:
          the bound of the model sampled with 1000 ancestral steps.
        * otherwise: the continuous-time bound L_inf (the T -> inf limit, at most L_T for a good model) estimated
          without bias from K = ``options.timesteps_per_image`` low-discrepancy times per image
          (:func:`~hf_ddpm.vdm.elbo.continuous_time_bound_estimate`), K network evaluations per image.

        The prior term is exact in both; the reconstruction term is a one-sample (per draw) estimate. With
        ``options.clip_denoised`` (the default) the diffusion term is that of the model whose data estimate is
        clipped to [-1, 1] (:func:`~hf_ddpm.vdm.elbo.clipped_estimate_model`), the model the default
        ``VDMContinuousScheduler(clip_sample=True)`` samples; it is never larger than the unclipped one.
        """
        x = self._checked(images)
        model_fn = self._epsilon_model(options.clip_denoised)
        if options.exact:
            terms = discrete_time_bound(
                self.noise_schedule,
                model_fn,
                x,
                VDM_EXACT_BOUND_STEPS,
                generator=generator,
                steps_per_forward=draws_per_forward(x.device, len(x)),
            )
            estimator = (
                f"discrete-time bound with all T={VDM_EXACT_BOUND_STEPS} steps summed (one noise draw per step) "
                "+ exact prior and one-sample reconstruction terms"
            )
        else:
            k = options.timesteps_per_image
            width = draws_per_forward(x.device, len(x))
            terms = continuous_time_bound_estimate(self.noise_schedule, model_fn, x, k, generator, width).terms
            estimator = (
                f"unbiased estimate of the continuous-time bound from {k} low-discrepancy times per image "
                "+ exact prior term"
            )
        if options.clip_denoised:
            estimator += "; x estimate clipped to [-1, 1] in the diffusion term"
        bits = terms.in_bits_per_dim(x[0].numel())
        return BatchBound(
            terms={"prior": bits.prior, "diffusion": bits.diffusion, "reconstruction": bits.reconstruction},
            estimator=estimator,
        )

    @torch.no_grad()
    def bound_by_time(
        self,
        images: ImageInput,
        *,
        num_images: int | None = BOUND_BY_TIME_IMAGES,
        clip_denoised: bool = True,
        generator: torch.Generator | None = None,
        num_times: int = VDM_BOUND_BY_TIME_TIMES,
        draws_per_time: int = VDM_BOUND_BY_TIME_DRAWS,
    ) -> BoundByTime:
        """Where the negative ELBO of the first ``num_images`` of ``images`` (None: all) goes in time: the integrand
        of the continuous-time diffusion loss (:func:`~hf_ddpm.vdm.elbo.continuous_diffusion_loss`, the term the
        estimate of the bound samples), 1/2 gamma'(t) E||eps - eps_hat(z_t, t)||^2 / (D ln 2) in bits/dim per unit
        of t, averaged over the images and ``draws_per_time`` noise draws each, at the midpoints t = (i + 1/2) /
        ``num_times``. Its mean (the midpoint rule on [0, 1]) estimates the diffusion term L_inf; the prior and
        reconstruction terms have no time and are in the label. ``num_times * draws_per_time`` network evaluations
        per image, float64.

        Args:
            images: a float tensor (N, C, H, W) in [-1, 1] on the 8-bit grid, uint8 arrays, or PIL images.
            num_images: how many of the images (None: all).
            clip_denoised: eps_hat of the data estimate clipped to [-1, 1], as ``BoundOptions`` (default) and the
                sampler clip it.
            generator: for the noise draws.
            num_times: the points of the grid of t.
            draws_per_time: noise draws per image at each t.
        """
        if num_times < 1 or draws_per_time < 1:
            raise ValueError(f"num_times={num_times} and draws_per_time={draws_per_time} must be at least 1.")
        x = self._checked(images_to_tensor(images, self.image_channels)[:num_images])
        schedule, model_fn = self.noise_schedule, self._epsilon_model(clip_denoised)
        num_dims = x[0].numel()
        repeated = x.repeat(draws_per_time, *([1] * (x.dim() - 1)))  # (draws * N, ...): every image draws times
        times = (torch.arange(num_times, dtype=torch.float64) + 0.5) / num_times
        density = []  # bits/dim per unit of t at each time, on the device until all are in
        width = draws_per_forward(x.device, len(repeated))  # times per network call
        for first in range(0, num_times, width):
            chunk = times[first : first + width].tolist()
            noise = torch.cat(
                [randn_tensor(repeated.shape, generator=generator, device=x.device, dtype=x.dtype) for _ in chunk]
            )
            t_batch = torch.tensor(chunk, dtype=x.dtype, device=x.device).repeat_interleave(len(repeated))
            nats = continuous_diffusion_loss(schedule, model_fn, repeated.repeat(len(chunk), 1, 1, 1), t_batch, noise)
            density.extend(nats_to_bits_per_dim(nats, num_dims).view(len(chunk), -1).mean(dim=1))
        density = torch.stack(density).to("cpu", torch.float64)
        reconstruction_noise = randn_tensor(repeated.shape, generator=generator, device=x.device, dtype=x.dtype)
        reconstruction = nats_to_bits_per_dim(reconstruction_loss(schedule, repeated, reconstruction_noise), num_dims)
        prior = nats_to_bits_per_dim(prior_loss(schedule, x), num_dims).mean().item()
        diffusion = density.mean().item()  # the midpoint rule on [0, 1]
        label = (
            f"negative ELBO {prior + diffusion + reconstruction.mean().item():.4f} bits/dim = diffusion "
            f"{diffusion:.4f} (area under the curve) + reconstruction {reconstruction.mean().item():.4f} "
            f"+ prior {prior:.2e}; mean of {x.shape[0]} images"
        )
        return BoundByTime(times, density, label)

    def probability_flow(self) -> ProbabilityFlow:
        r"""The model for the probability-flow ODE's log-likelihood (``evaluate_bound`` with
        ``BoundOptions(estimator="ode")``, :func:`hf_ddpm.probability_flow.ode_log_likelihood`): the noise schedule's
        gamma(t) and its closed-form (or, learned, autograd) derivative, eps_hat = unet(z_t, 1000 t)
        (:func:`vdm_epsilon`), on t in [0, 1]. The ODE integrates the unclipped model.
        """
        schedule, unet = self.noise_schedule, self.unet

        def gamma_rate(t: torch.Tensor) -> torch.Tensor:
            return schedule.gamma_and_derivative(t)[1]

        def eps_model(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return vdm_epsilon(unet, z_t, t)

        return ProbabilityFlow(
            gamma=schedule.gamma,
            gamma_rate=gamma_rate,
            eps_model=eps_model,
            earliest_time=0.0,
            device=self._execution_device,
        )
