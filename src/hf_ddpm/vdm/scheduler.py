"""VDMContinuousScheduler: sampling from a continuous-time variational diffusion model, as a diffusers scheduler.

Kingma et al. 2021 sample z_1 ~ N(0, I) and walk the grid t_i = i / n from t = 1 down to 0 with the model's
p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t, t)), s = t - 1/n. Everything is a function of gamma = -log SNR, so the
scheduler needs the (possibly learned) schedule's values on the grid: :meth:`VDMContinuousScheduler.set_timesteps`
takes the :class:`~hf_ddpm.vdm.noise_schedule.NoiseSchedule` and stores gamma(i / n), i = 0..n, as float64. The
config holds only ``step_type``, so ``save_pretrained`` writes a plain JSON config; the schedule itself is a model
component saved with its weights.

Timesteps are the continuous times t in (0, 1], descending: ``timesteps`` = [1, (n-1)/n, ..., 1/n], and
``step(model_output, t, sample)`` takes one of them. The network is trained on the same continuous t
(``model_fn(z_t, t)`` in :mod:`hf_ddpm.vdm.elbo`); a DenoisingUNet, whose sinusoidal embedding was
designed for the integer timesteps 0..999, is called as ``unet(z_t, 1000 * t)`` (VDM also multiplies its
conditioning in [0, 1] by 1000 before the sinusoidal embedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .noise_schedule import NoiseSchedule, alpha_sigma_from_gamma, epsilon_of_clipped_estimate

VDM_STEP_TYPES = ("ancestral", "ddim")


@dataclass
class VDMContinuousSchedulerOutput(SchedulerOutput):
    """Output of :meth:`VDMContinuousScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of shape (B, C, H, W)): z_s, the input of the next step; after the last step
            the image x_hat clipped to [-1, 1].
        pred_original_sample (`torch.Tensor` of shape (B, C, H, W)): x_hat = (z_t - sigma_t eps_hat) / alpha_t
            (clipped to [-1, 1] with ``clip_sample``).
    """

    pred_original_sample: torch.Tensor | None = None


def _vdm_alpha_sigma_scalar(gamma: float) -> tuple[float, float]:
    """(alpha, sigma) of one gamma in float64: alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)."""
    if gamma >= 0:
        sigma_squared = 1.0 / (1.0 + math.exp(-gamma))
        return math.sqrt(1.0 - sigma_squared), math.sqrt(sigma_squared)
    alpha_squared = 1.0 / (1.0 + math.exp(gamma))
    return math.sqrt(alpha_squared), math.sqrt(1.0 - alpha_squared)


class VDMContinuousScheduler(SchedulerMixin, ConfigMixin):
    r"""Ancestral or deterministic (DDIM) sampling on the grid t_i = i / n of a continuous-time VDM.

    With gamma_t = gamma(t), gamma_s = gamma(s), s = t - 1/n, eps_hat = ``model_output`` and
    x_hat = (z_t - sigma_t eps_hat) / alpha_t:

    * ``ancestral`` (VDM's ``sample``): z_s ~ p(z_s | z_t) = N(mu, v I) with
      mu = alpha_s / alpha_t (z_t + sigma_t expm1(gamma_s - gamma_t) eps_hat) and
      v = sigma_s^2 (-expm1(gamma_s - gamma_t)), which is the posterior q(z_s | z_t, x) at x = x_hat.
    * ``ddim``: z_s = alpha_s x_hat + sigma_s eps_hat, deterministic.

    With ``clip_sample`` (the default, as in diffusers' DDPMScheduler) x_hat is first clipped to [-1, 1] and eps_hat
    replaced by the noise of the clipped estimate,
    eps~ = (z_t - alpha_t clip(x_hat)) / sigma_t (:func:`~hf_ddpm.vdm.noise_schedule.epsilon_of_clipped_estimate`),
    in both steps: the ancestral step is then q(z_s | z_t, x = clip(x_hat)), the model whose bound
    ``BoundOptions(clip_denoised=True)`` reports.

    The last step (t = 1/n, s = 0) returns x_hat clipped to [-1, 1] as ``prev_sample``, the image. (z_0 would add
    noise of standard deviation at most sigma_0, 1.3e-3 for gamma_0 = -13.3, below the half-width 1/255 of an
    8-bit bin; for the DDIM step (z_0 - sigma_0 eps_hat) / alpha_0 is exactly x_hat.)

    Args:
        step_type (`str`): ``ancestral`` or ``ddim``.
        clip_sample (`bool`): clip the data estimate x_hat to [-1, 1] in every step.
    """

    order = 1

    @register_to_config
    def __init__(self, step_type: str = "ancestral", clip_sample: bool = True):
        if step_type not in VDM_STEP_TYPES:
            raise ValueError(f"Unknown step_type {step_type!r}: choose one of {', '.join(VDM_STEP_TYPES)}.")
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.gammas: torch.Tensor | None = None

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None, *, noise_schedule: NoiseSchedule
    ) -> None:
        """Sample on the grid t_i = i / n, n = ``num_inference_steps``: ``timesteps`` = [n/n, ..., 1/n] (float32 on
        ``device``) and ``gammas`` = [gamma(0/n), ..., gamma(n/n)] (float64 on the CPU, computed without grad on the
        schedule's device)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be at least 1.")
        grid = torch.arange(num_inference_steps + 1, dtype=torch.float64) / num_inference_steps
        with torch.no_grad():
            self.gammas = noise_schedule(grid.to(noise_schedule.device)).detach().cpu()
        self.num_inference_steps = num_inference_steps
        self.timesteps = grid[1:].flip(0).to(device=device, dtype=torch.float32)

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """The identity: the model takes z_t unscaled."""
        return sample

    def _grid_index(self, timesteps: torch.Tensor, lowest: int) -> torch.Tensor:
        """i = n t for times t on the grid i / n, i = lowest..n, as int64 on the CPU; raises off the grid."""
        if self.gammas is None:
            raise ValueError("Call set_timesteps(num_inference_steps, noise_schedule=...) first.")
        n = self.num_inference_steps
        times = torch.as_tensor(timesteps).detach().cpu().to(torch.float64).reshape(-1)
        index = torch.round(times * n)
        if ((index < lowest) | (index > n) | ((times - index / n).abs() > 1e-3 / n)).any():
            raise ValueError(f"timesteps {times.tolist()} are not on the grid i / {n}, i = {lowest}..{n}.")
        return index.long()

    def _step_gammas(self, timestep: torch.Tensor | float) -> tuple[int, float, float]:
        """(i, gamma_t, gamma_s) for the time t = i / n of one step, s = (i - 1) / n."""
        index = int(self._grid_index(torch.as_tensor(timestep), lowest=1))
        return index, float(self.gammas[index]), float(self.gammas[index - 1])

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | float
    ) -> torch.Tensor:
        """z_t = alpha_t x + sigma_t eps, with alpha_t^2 = sigmoid(-gamma(t)) and sigma_t^2 = sigmoid(gamma(t)), for
        times on the grid i / n, i = 0..n (a scalar or one per image)."""
        gamma = self.gammas[self._grid_index(torch.as_tensor(timesteps), lowest=0)]
        gamma = gamma.to(device=original_samples.device, dtype=original_samples.dtype)
        alpha, sigma = alpha_sigma_from_gamma(gamma.reshape([-1] + [1] * (original_samples.dim() - 1)))
        return alpha * original_samples + sigma * noise

    def predict_original_sample(
        self, model_output: torch.Tensor, timestep: torch.Tensor | float, sample: torch.Tensor
    ) -> torch.Tensor:
        """x_hat = (z_t - sigma_t eps_hat) / alpha_t."""
        alpha_t, sigma_t = _vdm_alpha_sigma_scalar(self._step_gammas(timestep)[1])
        return (sample - sigma_t * model_output) / alpha_t

    def p_mean_variance(
        self, model_output: torch.Tensor, timestep: torch.Tensor | float, sample: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """Mean and variance of p(z_s | z_t), s = t - 1/n:

            mu = alpha_s / alpha_t (z_t + sigma_t expm1(gamma_s - gamma_t) eps_hat),
            v  = sigma_s^2 (-expm1(gamma_s - gamma_t)),

        equal to the mean and variance of q(z_s | z_t, x) at x = x_hat; v is a float64 scalar.
        """
        _, gamma_t, gamma_s = self._step_gammas(timestep)
        alpha_t, sigma_t = _vdm_alpha_sigma_scalar(gamma_t)
        alpha_s, sigma_s = _vdm_alpha_sigma_scalar(gamma_s)
        change = math.expm1(gamma_s - gamma_t)
        return alpha_s / alpha_t * (sample + sigma_t * change * model_output), -(sigma_s**2) * change

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> VDMContinuousSchedulerOutput | tuple:
        """One step z_t -> z_s (s = t - 1/n), ancestral or DDIM per ``step_type``, with x_hat clipped to [-1, 1]
        first under ``clip_sample``; the last step returns x_hat clipped to [-1, 1].

        Args:
            model_output (`torch.Tensor`): eps_hat(z_t, t).
            timestep (`torch.Tensor` or `float`): t, one of ``timesteps``.
            sample (`torch.Tensor`): z_t.
            generator (`torch.Generator`, *optional*): for the noise of the ancestral step.
            return_dict (`bool`): return a :class:`VDMContinuousSchedulerOutput` rather than a tuple.
        """
        index, gamma_t, gamma_s = self._step_gammas(timestep)
        if self.config.clip_sample:
            gamma = torch.tensor(gamma_t, dtype=torch.float64)  # a 0-d tensor: alpha_t, sigma_t in float64, as below
            model_output = epsilon_of_clipped_estimate(sample, model_output, gamma)
        pred_original_sample = self.predict_original_sample(model_output, timestep, sample)
        if index == 1:
            prev_sample = pred_original_sample.clamp(-1.0, 1.0)
        elif self.config.step_type == "ddim":
            alpha_s, sigma_s = _vdm_alpha_sigma_scalar(gamma_s)
            prev_sample = alpha_s * pred_original_sample + sigma_s * model_output
        else:
            mean, variance = self.p_mean_variance(model_output, timestep, sample)
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = mean + math.sqrt(variance) * noise
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return VDMContinuousSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
