"""VDMScheduler: the fixed encoder of the variational diffusion model and the decoder it induces.

The variational diffusion model is a Markovian hierarchical VAE with three restrictions: latents x_1..x_T of the
data's size, a fixed Gaussian encoder q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I), and
q(x_T) ~= N(0, I). This file holds every equation of that encoder and of the decoder p_theta(x_{t-1} | x_t) it
induces, one method each:

=========================================  ==========================================
equation                                   method
=========================================  ==========================================
q(x_t | x_{t-1})                           :meth:`VDMScheduler.q_step`
q(x_t | x_0)                               :meth:`VDMScheduler.q_mean_variance`, :meth:`VDMScheduler.add_noise`
q(x_{t-1} | x_t, x_0)                      :meth:`VDMScheduler.q_posterior_mean_variance`
x_0 from the model output                  :meth:`VDMScheduler.predict_original_sample`
p_theta(x_{t-1} | x_t)                     :meth:`VDMScheduler.p_mean_variance`
ancestral sampling x_t -> x_{t-1}          :meth:`VDMScheduler.step`
respacing to a sub-chain                   :meth:`VDMScheduler.set_timesteps`
=========================================  ==========================================

Timesteps are 0-based as in diffusers and improved-diffusion: timestep ``t`` is the latent x_{t+1} of the maths,
so timestep 0 is x_1 (whose decoder gives x_0) and timestep T-1 is x_T.

All schedule constants are float64 (see :class:`ChainConstants`); they are cast to the sample's dtype when used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .schedules import make_betas

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


@dataclass
class VDMSchedulerOutput(SchedulerOutput):
    """Output of :meth:`VDMScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of shape (B, C, H, W)): x_{t-1}, the input of the next step.
        pred_original_sample (`torch.Tensor` of shape (B, C, H, W)): the model's estimate of x_0.
    """

    pred_original_sample: torch.Tensor | None = None


@dataclass(frozen=True)
class ChainConstants:
    """Float64 constants of one Markov chain x_0 -> x_{t_1} -> ... -> x_{t_K} (K = len(timesteps)).

    Built from the marginals alpha_bar_t = prod_{s<=t} alpha_s alone, so a sub-sequence of timesteps (respacing)
    is again a valid Markov chain with betas recomputed as beta_k = 1 - alpha_bar_{t_k} / alpha_bar_{t_{k-1}}.
    Every array has shape (K,) and is indexed by the position k in the chain (0 = the step that decodes x_0).
    """

    timesteps: np.ndarray  # (K,) increasing original timesteps
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    betas: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> "ChainConstants":
        """beta_k = 1 - abar_k / abar_{k-1};  beta~_k = beta_k (1 - abar_{k-1}) / (1 - abar_k);

        mu~_k(x_t, x_0) = coef1_k x_0 + coef2_k x_t with coef1_k = beta_k sqrt(abar_{k-1}) / (1 - abar_k) and
        coef2_k = sqrt(1 - beta_k) (1 - abar_{k-1}) / (1 - abar_k). log beta~ is clipped at k = 0 (where beta~ = 0)
        to log beta~_1, as improved-diffusion does, so the decoder p(x_0 | x_1) has a finite variance.
        """
        abar = alphas_cumprod[timesteps].astype(np.float64)
        abar_prev = np.append(1.0, abar[:-1])
        betas = 1.0 - abar / abar_prev
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        clip_value = posterior_variance[1] if len(timesteps) > 1 else betas[0]
        return cls(
            timesteps=timesteps,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            betas=betas,
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(np.append(clip_value, posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=np.sqrt(1.0 - betas) * (1.0 - abar_prev) / (1.0 - abar),
        )


def _broadcast(values: np.ndarray, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[index] cast to like's dtype and device, shaped (B, 1, ..., 1) to broadcast against like."""
    picked = torch.from_numpy(values)[index.detach().cpu().long().reshape(-1)]
    if like.device.type == "mps":  # MPS has no float64
        picked = picked.float()
    picked = picked.to(device=like.device, dtype=like.dtype)
    if picked.numel() == 1:
        return picked.reshape([1] * like.dim())
    return picked.reshape([-1] + [1] * (like.dim() - 1))


class VDMScheduler(SchedulerMixin, ConfigMixin):
    r"""The fixed Gaussian encoder of a variational diffusion model, its reverse posterior, and ancestral sampling.

    A drop-in for diffusers' ``DDPMScheduler`` (same config keys, ``step``/``add_noise``/``set_timesteps``
    signatures and outputs), with float64 schedule constants, learned-variance respacing that keeps a valid
    Markov chain, and the closed-form quantities the ELBO needs (:mod:`hf_ddpm.losses`).

    Args:
        num_train_timesteps (`int`): T, the number of latents x_1..x_T.
        beta_start (`float`), beta_end (`float`): end points of the ``linear``/``scaled_linear`` schedules.
        beta_schedule (`str`): ``linear`` (Ho et al.), ``cosine`` (Nichol & Dhariwal; diffusers'
            ``squaredcos_cap_v2`` is the same), or ``scaled_linear``.
        trained_betas (`np.ndarray` or list, *optional*): explicit betas, overriding ``beta_schedule``.
        variance_type (`str`): variance of p_theta(x_{t-1} | x_t): ``fixed_small`` (the posterior variance
            beta~_t), ``fixed_large`` (beta_t), or ``learned_range`` (the model emits 2C channels; the last C give
            v in [-1, 1] and log sigma^2 = (v+1)/2 log beta_t + (1-v)/2 log beta~_t).
        clip_sample (`bool`), clip_sample_range (`float`): clip the predicted x_0 to [-range, range] when sampling.
        prediction_type (`str`): what the model predicts: ``epsilon`` (the noise), ``sample`` (x_0) or
            ``v_prediction`` (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0).
        timestep_spacing (`str`): how :meth:`set_timesteps` picks a sub-chain: ``linspace`` (includes 0 and
            T-1, as improved-diffusion respaces), ``leading`` or ``trailing`` (as diffusers).
        steps_offset (`int`): added to ``leading`` timesteps, as in diffusers.
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
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction_type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}.")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"Unknown variance_type {variance_type!r}: choose one of {', '.join(VARIANCE_TYPES)}.")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"Unknown timestep_spacing {timestep_spacing!r}: choose one of {', '.join(TIMESTEP_SPACINGS)}."
            )
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}.")
        betas64 = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if beta_schedule == "cosine":  # recorded under diffusers' name, so every diffusers scheduler reads the config
            self.register_to_config(beta_schedule="squaredcos_cap_v2")
        self.alphas_cumprod64 = np.cumprod(1.0 - betas64)
        #: float64 tensors, for users and for diffusers-style code that reads them.
        self.betas = torch.from_numpy(betas64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(self.alphas_cumprod64)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._use_chain(np.arange(num_train_timesteps))

    # ------------------------------------------------------------------ the chain in use
    def _use_chain(self, timesteps: np.ndarray) -> None:
        """Make the chain over the increasing ``timesteps`` the one that every method below uses."""
        self.chain = ChainConstants.from_alphas_cumprod(self.alphas_cumprod64, np.asarray(timesteps, dtype=np.int64))
        position = np.full(self.config.num_train_timesteps, -1, dtype=np.int64)
        position[self.chain.timesteps] = np.arange(len(self.chain.timesteps))
        self._position = torch.from_numpy(position)
        self.timesteps = torch.from_numpy(self.chain.timesteps[::-1].copy())

    def chain_position(self, timesteps: torch.Tensor | int) -> torch.Tensor:
        """Position k of each timestep in the current chain (0 = the decoding step); errors if one is not in it."""
        t = torch.as_tensor(timesteps).detach().cpu().long().reshape(-1)
        if t.numel() and (t.min() < 0 or t.max() >= self.config.num_train_timesteps):
            raise ValueError(f"Timesteps must lie in [0, {self.config.num_train_timesteps - 1}], got {t.tolist()[:8]}.")
        k = self._position[t]
        if (k < 0).any():
            raise ValueError(
                f"Timestep(s) {t[k < 0].tolist()[:8]} are not in the current chain {self.timesteps.tolist()[:8]}...; "
                "call set_timesteps() with the chain you sample or evaluate on."
            )
        return k

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Respace the reverse process to ``num_inference_steps`` timesteps (or the explicit descending ``timesteps``).

        The sub-chain keeps the marginals q(x_t | x_0) and recomputes beta_k = 1 - abar_{t_k} / abar_{t_{k-1}}, so
        posterior variances and learned-range variances are those of a valid shorter Markov chain.
        ``set_timesteps(num_train_timesteps)`` restores the full chain.
        """
        T = self.config.num_train_timesteps
        if timesteps is not None:
            chosen = np.asarray(list(timesteps), dtype=np.int64)
            if np.any(chosen[1:] >= chosen[:-1]):
                raise ValueError("`timesteps` must be strictly descending.")
            if chosen[0] >= T or chosen[-1] < 0:
                raise ValueError(f"`timesteps` must lie in [0, {T - 1}].")
            self.num_inference_steps = len(chosen)
        else:
            if num_inference_steps is None or not 1 <= num_inference_steps <= T:
                raise ValueError(f"num_inference_steps must be between 1 and num_train_timesteps={T}, got {num_inference_steps}.")
            self.num_inference_steps = num_inference_steps
            spacing = self.config.timestep_spacing
            if spacing == "linspace":
                chosen = np.linspace(0, T - 1, num_inference_steps).round()
            elif spacing == "leading":
                chosen = np.arange(num_inference_steps) * (T // num_inference_steps) + self.config.steps_offset
            else:  # trailing
                chosen = np.round(np.arange(T, 0, -T / num_inference_steps)) - 1
            chosen = np.unique(chosen.astype(np.int64))[::-1]
        self._use_chain(chosen[::-1].copy())
        self.timesteps = self.timesteps.to(device) if device is not None else self.timesteps

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity: DDPM does not scale the model input (kept for interchangeability with other schedulers)."""
        return sample

    # ------------------------------------------------------------------ the forward process
    def q_step(self, previous_sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """One encoder step of the current chain, x_{t_k} = sqrt(1 - beta_k) x_{t_{k-1}} + sqrt(beta_k) noise.

        This is a sample of q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I) with alpha_t = 1 - beta_t;
        ``previous_sample`` is x_{t-1} (x_0 when t is the first timestep), all tensors of shape (B, C, H, W).
        """
        k = self.chain_position(timesteps)
        beta = _broadcast(self.chain.betas, k, previous_sample)
        return torch.sqrt(1.0 - beta) * previous_sample + torch.sqrt(beta) * noise

    def q_mean_variance(self, original_samples: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The marginal q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): (mean, variance, log_variance)."""
        abar = _broadcast(self.alphas_cumprod64, torch.as_tensor(timesteps), original_samples)
        return torch.sqrt(abar) * original_samples, (1.0 - abar).expand_as(original_samples), torch.log1p(-abar).expand_as(original_samples)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """Sample the marginal q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (diffusers' signature)."""
        abar = _broadcast(self.alphas_cumprod64, torch.as_tensor(timesteps), original_samples)
        return torch.sqrt(abar) * original_samples + torch.sqrt(1.0 - abar) * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (``sample`` is x_0)."""
        abar = _broadcast(self.alphas_cumprod64, torch.as_tensor(timesteps), sample)
        return torch.sqrt(abar) * noise - torch.sqrt(1.0 - abar) * sample

    # ------------------------------------------------------------------ the reverse posterior
    def q_posterior_mean_variance(
        self, original_samples: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I), the reverse posterior, in closed form:

        mu~_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
        beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).

        Returns (mean, variance, log_variance_clipped), each shaped like ``sample``.
        """
        k = self.chain_position(timesteps)
        c1 = _broadcast(self.chain.posterior_mean_coef1, k, sample)
        c2 = _broadcast(self.chain.posterior_mean_coef2, k, sample)
        variance = _broadcast(self.chain.posterior_variance, k, sample)
        log_variance = _broadcast(self.chain.posterior_log_variance_clipped, k, sample)
        return c1 * original_samples + c2 * sample, variance.expand_as(sample), log_variance.expand_as(sample)

    # ------------------------------------------------------------------ the decoder p_theta
    def split_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a (B, 2C, H, W) learned-variance output into (prediction, v); v is None for fixed variances."""
        channels = sample.shape[1]
        if self.config.variance_type == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"variance_type='learned_range' needs a model with 2*C = {2 * channels} output channels "
                    f"(prediction and variance), got {model_output.shape[1]}."
                )
            return model_output[:, :channels], model_output[:, channels:]
        if model_output.shape[1] != channels:
            raise ValueError(
                f"variance_type={self.config.variance_type!r} needs a model with C = {channels} output channels, "
                f"got {model_output.shape[1]}; a 2C-channel model needs variance_type='learned_range'."
            )
        return model_output, None

    def predict_original_sample(self, prediction: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_0 from the model's prediction at x_t (``sample``):

        epsilon: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);  sample: x_0 = prediction;
        v_prediction: x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v.
        """
        abar = _broadcast(self.alphas_cumprod64, torch.as_tensor(timesteps), sample)
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - torch.sqrt(1.0 - abar) * prediction) / torch.sqrt(abar)
        if kind == "sample":
            return prediction
        return torch.sqrt(abar) * sample - torch.sqrt(1.0 - abar) * prediction

    def model_log_variance(self, variance_output: torch.Tensor | None, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """log sigma_t^2 of p_theta(x_{t-1} | x_t) on the current chain, shaped like ``sample``:

        fixed_small: log beta~_t (clipped at the first step); fixed_large: log beta_t (log beta~_1 at the first
        step, as improved-diffusion does, so the decoder's variance is that of the next step);
        learned_range: (v + 1)/2 log beta_t + (1 - v)/2 log beta~_t with v the model's variance output, at every
        step including the first (between the clipped log beta~_1 and log beta_1 there, as improved-diffusion does,
        so the decoder's variance is learned too).
        """
        k = self.chain_position(timesteps)
        min_log = _broadcast(self.chain.posterior_log_variance_clipped, k, sample)
        variance_type = self.config.variance_type
        if variance_type == "fixed_small":
            return min_log.expand_as(sample)
        if variance_type == "fixed_large":
            chain = self.chain
            large = chain.betas if len(chain.timesteps) == 1 else np.append(chain.posterior_variance[1], chain.betas[1:])
            return _broadcast(np.log(large), k, sample).expand_as(sample)
        max_log = _broadcast(np.log(self.chain.betas), k, sample)
        frac = (variance_output + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(
        self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor, clip_denoised: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I) with mu_theta = mu~_t(x_t, x0_theta(x_t, t)).

        The model's x_0 estimate is plugged into the closed-form posterior mean (the parameterisation that makes
        each denoising-matching KL a weighted squared error). Returns (mean, log_variance, pred_original_sample).
        """
        prediction, variance_output = self.split_model_output(model_output, sample)
        pred_original = self.predict_original_sample(prediction, sample, timesteps)
        if clip_denoised:
            limit = self.config.clip_sample_range
            pred_original = pred_original.clamp(-limit, limit)
        mean, _, _ = self.q_posterior_mean_variance(pred_original, sample, timesteps)
        return mean, self.model_log_variance(variance_output, sample, timesteps), pred_original

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Ancestral sampling: draw x_{t-1} ~ p_theta(x_{t-1} | x_t) on the current chain.

        Args:
            model_output (`torch.Tensor`): the model's output at (``sample``, ``timestep``), (B, C or 2C, H, W).
            timestep (`int`): the current timestep t, an element of ``self.timesteps``.
            sample (`torch.Tensor`): x_t, (B, C, H, W).
            generator (`torch.Generator`, *optional*): for the noise; drawn as diffusers' DDPMScheduler draws it.
            return_dict (`bool`): return a ``SchedulerOutput`` rather than a tuple.

        Returns:
            ``SchedulerOutput(prev_sample, pred_original_sample)``: x_{t-1} and the model's x_0 estimate (clipped if
            ``clip_sample``). No noise is added at the last step of the chain.
        """
        t = torch.as_tensor(timestep).reshape(-1)[:1]
        mean, log_variance, pred_original = self.p_mean_variance(model_output, sample, t, clip_denoised=self.config.clip_sample)
        prev_sample = mean
        if int(self.chain_position(t)[0]) > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = mean + torch.exp(0.5 * log_variance) * noise
        if not return_dict:
            return prev_sample, pred_original
        return VDMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)
