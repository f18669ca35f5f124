"""HFDDPMScheduler: the sampling state of the variational diffusion model's reverse process, as a diffusers scheduler.

The maths of the fixed encoder and of the decoder it induces lives in :class:`hf_ddpm.ddpm.chain.DiffusionChain`
(frozen float64 constants, one method per equation). The scheduler adds what sampling needs and nothing else: the
config, the chain currently sampled on (:meth:`HFDDPMScheduler.set_timesteps` respaces it) and ancestral sampling
(:meth:`HFDDPMScheduler.step`), with diffusers' ``DDPMScheduler`` signatures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .chain import DiffusionChain, check_choice
from .schedules import betas_from_config, check_num_train_timesteps

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


@dataclass
class HFDDPMSchedulerOutput(SchedulerOutput):
    """Output of :meth:`HFDDPMScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of shape (B, C, H, W)): x_{t-1}, the input of the next step.
        pred_original_sample (`torch.Tensor` of shape (B, C, H, W)): the model's estimate of x_0.
    """

    pred_original_sample: torch.Tensor | None = None


class HFDDPMScheduler(SchedulerMixin, ConfigMixin):
    r"""The reverse process of a variational diffusion model: respacing and ancestral sampling.

    A drop-in for diffusers' ``DDPMScheduler`` (same config keys, ``step``/``add_noise``/``set_timesteps``
    signatures and outputs), with float64 schedule constants and learned-variance respacing that keeps a valid
    Markov chain. ``train_chain`` is the frozen :class:`~hf_ddpm.ddpm.chain.DiffusionChain` of all T steps (what the
    ELBO and training use); ``chain`` is the one sampled on, replaced by :meth:`set_timesteps`.

    Args:
        num_train_timesteps (`int`): T, the number of latents x_1..x_T (at least 2).
        beta_start (`float`), beta_end (`float`): end points of the ``linear``/``scaled_linear``/``sigmoid``
            schedules.
        beta_schedule (`str`): ``linear`` (Ho et al.), ``cosine`` (Nichol & Dhariwal; diffusers'
            ``squaredcos_cap_v2`` is the same), ``scaled_linear`` or ``sigmoid`` (GeoDiff).
        trained_betas (`np.ndarray` or list, *optional*): explicit betas, overriding ``beta_schedule``.
        variance_type (`str`): variance of p_theta(x_{t-1} | x_t): ``fixed_small`` (the posterior variance
            beta~_t), ``fixed_large`` (beta_t), or ``learned_range`` (the model emits 2C channels; the last C give
            v in [-1, 1] and log sigma^2 = (v+1)/2 log beta_t + (1-v)/2 log beta~_t).
        clip_sample (`bool`), clip_sample_range (`float`): clip the predicted x_0 to [-range, range] when sampling.
        prediction_type (`str`): what the model predicts: ``epsilon`` (the noise), ``sample`` (x_0) or
            ``v_prediction`` (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0).
        timestep_spacing (`str`): how :meth:`set_timesteps` picks ``num_inference_steps`` timesteps, exactly as
            diffusers: ``linspace`` (round(linspace(0, T-1, n)): includes 0 and T-1, as improved-diffusion
            respaces; our default, where diffusers' is ``leading``), ``leading`` (k * (T // n) + steps_offset) or
            ``trailing`` (round(T - k T / n) - 1, without the spurious -1 that diffusers appends for some n).
        steps_offset (`int`): added to ``leading`` timesteps, as in diffusers.
        thresholding (`bool`): apply :func:`~hf_ddpm.ddpm.chain.dynamic_threshold` to the predicted x_0 in
            :meth:`step` (instead of ``clip_sample``, as in diffusers).
        dynamic_thresholding_ratio (`float`), sample_max_value (`float`): its quantile and largest threshold s.
        rescale_betas_zero_snr (`bool`): rescale the betas to zero terminal SNR
            (:func:`~hf_ddpm.ddpm.schedules.rescale_zero_terminal_snr`); needs ``v_prediction`` or ``sample``.
        decoder_min_std (`float`, *optional*): ``learned_range`` only: the decoder p(x_0 | x_1)'s standard
            deviation at v = -1 instead of sqrt(beta~_2) (improved-diffusion's clip, and every model saved without
            it); train.py uses :data:`~hf_ddpm.ddpm.chain.DECODER_MIN_STD`. It enters the bound only: the last
            step of sampling adds no noise. diffusers' schedulers ignore the key.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | Sequence[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        rescale_betas_zero_snr: bool = False,
        decoder_min_std: float | None = None,
    ):
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_num_train_timesteps(num_train_timesteps)
        if num_train_timesteps < 2:
            raise ValueError(
                f"num_train_timesteps must be at least 2 (got {num_train_timesteps}): the decoder p(x_0 | x_1) "
                "takes its clipped log-variance from the second step's posterior, log beta~_2."
            )
        betas64 = betas_from_config(self.config)
        if beta_schedule == "cosine":  # recorded under diffusers' name, so every diffusers scheduler reads the config
            self.register_to_config(beta_schedule="squaredcos_cap_v2")
        self.train_chain = DiffusionChain.from_alphas_cumprod(
            np.cumprod(1.0 - betas64),
            prediction_type=prediction_type,
            variance_type=variance_type,
            decoder_min_std=decoder_min_std,
        )
        #: float64 tensors, for users and for diffusers-style code that reads them.
        self.betas = torch.from_numpy(betas64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(self.train_chain.train_alphas_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self._use_chain(self.train_chain)

    def _use_chain(self, chain: DiffusionChain) -> None:
        """Make ``chain`` the one that :meth:`step` samples on."""
        self.chain = chain
        self.timesteps = torch.from_numpy(chain.timesteps[::-1].copy())

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Respace the reverse process to ``num_inference_steps`` timesteps (or the explicit descending ``timesteps``;
        pass one of the two), picked by ``timestep_spacing`` exactly as diffusers' ``DDPMScheduler`` picks them.

        The sub-chain keeps the marginals q(x_t | x_0) and recomputes beta_k = 1 - abar_{t_k} / abar_{t_{k-1}}, so
        posterior variances and learned-range variances are those of a valid shorter Markov chain.
        ``set_timesteps(num_train_timesteps)`` restores the full chain.
        """
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            chosen = np.asarray(list(timesteps), dtype=np.int64)
            if np.any(chosen[1:] >= chosen[:-1]):
                raise ValueError("`custom_timesteps` must be in descending order.")
            if chosen[0] >= T or chosen[-1] < 0:
                raise ValueError(f"`timesteps` must lie in [0, {T - 1}].")
            self.custom_timesteps = True
            self.num_inference_steps = len(chosen)
        else:
            if num_inference_steps is None or not 1 <= num_inference_steps <= T:
                raise ValueError(
                    f"num_inference_steps must be between 1 and num_train_timesteps={T}, got {num_inference_steps}."
                )
            spacing = self.config.timestep_spacing
            if spacing == "linspace":
                chosen = np.linspace(0, T - 1, num_inference_steps).round()
            elif spacing == "leading":
                chosen = np.arange(num_inference_steps) * (T // num_inference_steps) + self.config.steps_offset
            else:  # trailing; diffusers' float arange appends a spurious -1 for some n (e.g. T = 1000, n = 61)
                chosen = np.round(np.arange(T, 0, -T / num_inference_steps)) - 1
                chosen = chosen[chosen >= 0]
            chosen = np.unique(chosen.astype(np.int64))[::-1]
            if chosen[0] >= T or chosen[-1] < 0:
                raise ValueError(
                    f"timestep_spacing={spacing!r} with steps_offset={self.config.steps_offset} gives timesteps in "
                    f"[{chosen[-1]}, {chosen[0]}], outside the chain's [0, {T - 1}]; lower steps_offset."
                )
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
        self._use_chain(self.train_chain.respaced(chosen[::-1].copy()))
        self.timesteps = self.timesteps.to(device) if device is not None else self.timesteps

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep that :meth:`step` at ``timestep`` samples, as diffusers computes it: the next one in
        ``self.timesteps`` (a tensor; -1 after the last) once :meth:`set_timesteps` was called, else timestep - 1."""
        if self.custom_timesteps or self.num_inference_steps:
            index = int(self.chain.chain_position(timestep)[0])
            return torch.tensor(int(self.chain.timesteps[index - 1]) if index > 0 else -1)
        return timestep - 1

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity: DDPM does not scale the model input (kept for interchangeability with other schedulers)."""
        return sample

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Sample q(x_t | x_0) (diffusers' signature): :meth:`DiffusionChain.add_noise` of the training chain."""
        return self.train_chain.add_noise(original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target (diffusers' signature): :meth:`DiffusionChain.get_velocity`."""
        return self.train_chain.get_velocity(sample, noise, timesteps)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> HFDDPMSchedulerOutput | tuple:
        """Ancestral sampling: draw x_{t-1} ~ p_theta(x_{t-1} | x_t) on the current chain.

        Args:
            model_output (`torch.Tensor`): the model's output at (``sample``, ``timestep``), (B, C or 2C, H, W).
            timestep (`int`): the current timestep t, an element of ``self.timesteps``.
            sample (`torch.Tensor`): x_t, (B, C, H, W).
            generator (`torch.Generator`, *optional*): for the noise; drawn as diffusers' DDPMScheduler draws it.
            return_dict (`bool`): return a ``HFDDPMSchedulerOutput`` rather than a tuple.

        Returns:
            ``HFDDPMSchedulerOutput(prev_sample, pred_original_sample)``: x_{t-1} and the model's x_0 estimate
            (thresholded if ``thresholding``, else clipped if ``clip_sample``). No noise is added at the last step of
            the chain, even when its timestep is not 0 (diffusers adds noise whenever t > 0).
        """
        t = torch.as_tensor(timestep).reshape(-1)[:1]
        mean, log_variance, pred_original = self.chain.p_mean_variance(
            model_output,
            sample,
            t,
            clip_denoised=self.config.clip_sample,
            clip_range=self.config.clip_sample_range,
            dynamic_thresholding=(
                (self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
                if self.config.thresholding
                else None
            ),
        )
        prev_sample = mean
        if int(self.chain.chain_position(t)[0]) > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = mean + torch.exp(0.5 * log_variance) * noise
        if not return_dict:
            return prev_sample, pred_original
        return HFDDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)


#: HFDDPMScheduler's config keys that no diffusers scheduler has (see :func:`scheduler_from_config`).
HF_DDPM_ONLY_CONFIG_KEYS = ("decoder_min_std",)


def scheduler_from_config(cls: type[SchedulerMixin], config: Mapping[str, Any]) -> SchedulerMixin:
    """``cls.from_config(config)`` for any scheduler class, whose config keeps :data:`HF_DDPM_ONLY_CONFIG_KEYS` (a
    pipeline's bound reads them whatever it samples with) without diffusers' warning that it ignores them."""
    if issubclass(cls, HFDDPMScheduler):
        return cls.from_config(config)
    scheduler = cls.from_config({key: value for key, value in config.items() if key not in HF_DDPM_ONLY_CONFIG_KEYS})
    scheduler.register_to_config(**{key: config[key] for key in HF_DDPM_ONLY_CONFIG_KEYS if key in config})
    return scheduler
