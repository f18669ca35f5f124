"""VDMPipeline: sampling from a continuous-time variational diffusion model (Kingma et al. 2021) and the bound of
images; :class:`VDMModel`, the network and the noise schedule as the one module that training optimises."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..evaluation import BatchBound, BoundOptions, evaluate_bound
from ..hub.registration import HFDDPMRegistrationMixin
from ..image_utils import ImageInput, check_output_type, model_range_to_output
from ..models.unet import DenoisingUNet
from ..probability_flow import ProbabilityFlow
from ..vdm.elbo import (
    VDMLossTerms,
    clipped_estimate_model,
    continuous_time_bound_estimate,
    discrete_time_bound,
    vdm_loss_terms,
)
from ..vdm.noise_schedule import VDM_SCHEDULE_INTERIOR_OBJECTIVES, DeferredGradientScale, NoiseSchedule
from ..vdm.scheduler import VDMContinuousScheduler

#: T of the discrete-time bound that ``BoundOptions(exact=True)`` computes (one network evaluation per step).
VDM_EXACT_BOUND_STEPS = 1000
#: The network is conditioned on 1000 t: the scale of the integer timesteps its sinusoidal embedding was made for.
VDM_TIME_SCALE = 1000.0


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


class VDMPipeline(HFDDPMRegistrationMixin, DiffusionPipeline):
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
    >>> pipe.elbo(images).total
    ```
    """

    model_cpu_offload_seq = "noise_schedule->unet"

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
        """
        check_output_type(output_type)
        config = self.unet.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device, noise_schedule=self.noise_schedule)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = vdm_epsilon(self.unet, image, t)
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
        size = self.unet.config.sample_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"Images must be {size}x{size}, got {tuple(images.shape[-2:])}.")
        x = images.to(device=self._execution_device, dtype=torch.float64)

        def model_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return vdm_epsilon(self.unet, z_t, t)

        if options.clip_denoised:
            model_fn = clipped_estimate_model(self.noise_schedule, model_fn)
        if options.exact:
            terms = discrete_time_bound(self.noise_schedule, model_fn, x, VDM_EXACT_BOUND_STEPS, generator=generator)
            estimator = (
                f"discrete-time bound with all T={VDM_EXACT_BOUND_STEPS} steps summed (one noise draw per step) "
                "+ exact prior and one-sample reconstruction terms"
            )
        else:
            k = options.timesteps_per_image
            terms = continuous_time_bound_estimate(self.noise_schedule, model_fn, x, k, generator=generator).terms
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
    def elbo(self, images: ImageInput, batch_size: int = 64, generator: torch.Generator | None = None) -> VDMLossTerms:
        r"""The negative ELBO of each image in bits/dim, float64 (N,) terms: the discrete-time bound with all
        T = 1000 steps summed (``bound_terms`` with ``BoundOptions(exact=True)``); ``total`` is the bound.

        Costs T network evaluations per image. :func:`hf_ddpm.evaluation.evaluate_bound` gives the same numbers
        summarised, or the cheaper estimate of the continuous-time bound.

        Args:
            images: a float tensor (N, C, H, W) in [-1, 1] on the 8-bit grid, uint8 arrays, or PIL images.
            batch_size (`int`): images per forward pass.
            generator (`torch.Generator`, *optional*): for the z_t ~ q(z_t | x) draws.
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
        return VDMLossTerms(prior=terms["prior"], diffusion=terms["diffusion"], reconstruction=terms["reconstruction"])

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
