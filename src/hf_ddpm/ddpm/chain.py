"""The frozen constants of a diffusion chain and every closed-form equation of its encoder and decoder.

The variational diffusion model is a Markovian hierarchical VAE with three restrictions: latents x_1..x_T of the
data's size, a fixed Gaussian encoder q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I), and
q(x_T) ~= N(0, I). A :class:`DiffusionChain` holds the float64 constants of one such chain (the full training
chain, or a respaced sub-chain) and the parameterisation of the decoder p_theta(x_{t-1} | x_t); it never changes
after it is built, so the ELBO (:mod:`hf_ddpm.ddpm.elbo`) takes it as an explicit argument and the scheduler's
mutable sampling state (:class:`hf_ddpm.HFDDPMScheduler`) never reaches the maths.

=========================================  ==============================================================
equation                                   method
=========================================  ==============================================================
q(x_t | x_{t-1})                           :meth:`DiffusionChain.q_step`
q(x_t | x_0)                               :meth:`DiffusionChain.q_mean_variance`, :meth:`DiffusionChain.add_noise`
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0  :meth:`DiffusionChain.get_velocity`
q(x_{t-1} | x_t, x_0)                      :meth:`DiffusionChain.q_posterior_mean_variance`
x_0 from the model output                  :meth:`DiffusionChain.predict_original_sample`
log sigma_t^2 of p_theta                   :meth:`DiffusionChain.model_log_variance`
p_theta(x_{t-1} | x_t)                     :meth:`DiffusionChain.p_mean_variance`
=========================================  ==============================================================

Timesteps are 0-based as in diffusers and improved-diffusion: timestep ``t`` is the latent x_{t+1} of the maths,
so timestep 0 is x_1 (whose decoder gives x_0) and timestep T-1 is x_T. Constants are cast to the sample's dtype
and device when used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .schedules import betas_from_config

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
#: diffusers' ``DDPMScheduler`` variance types that a chain refuses, and why (one line each).
REFUSED_VARIANCE_TYPES = {
    "fixed_small_log": "it samples exactly as 'fixed_small' (e^(log beta~ / 2) = sqrt(beta~)): use 'fixed_small'",
    "fixed_large_log": "diffusers' step takes the square root of log beta_t < 0 (NaN samples): use 'fixed_large'",
    "learned": "an unbounded raw variance output gives no valid decoder or bound: use 'learned_range'",
}
#: The decoder p(x_0 | x_1)'s smallest standard deviation under ``learned_range`` that hf_ddpm trains with (the
#: data in [-1, 1]): a quarter of half an 8-bit bin, 1/255 / 4. A pixel at the edge of the range decoded with its
#: mean at the edge then keeps Phi(4) of its probability in its bin (4.6e-5 bits lost), where improved-diffusion's
#: floor sqrt(beta~_2) (0.0047 for the cosine schedule) keeps Phi(0.84): 0.32 bits.
DECODER_MIN_STD = 1 / 1020


def broadcast_constant(values: np.ndarray, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[index] cast to like's dtype and device, shaped (B, 1, ..., 1) to broadcast against like.

    An index on an accelerator is looked up in a copy of ``values`` kept on that device, so a training step reads
    no timestep back to the host (each such read waits for the device to finish its queued work)."""
    index = index.detach().long().reshape(-1)
    if index.device.type == "cpu":
        picked = torch.from_numpy(values)[index]
    else:
        picked = _on_device(values, index.device)[index]
    if like.device.type == "mps":  # MPS has no float64
        picked = picked.float()
    picked = picked.to(device=like.device, dtype=like.dtype)
    if picked.numel() == 1:
        return picked.reshape([1] * like.dim())
    return picked.reshape([-1] + [1] * (like.dim() - 1))


#: (id of a constant's array, device) -> (the array, its copy on the device). Holding the array keeps its id from
#: being reused while the entry lives; cleared when full, so arrays made on the fly cannot grow it without bound.
_DEVICE_COPIES: dict[tuple[int, str], tuple[np.ndarray, torch.Tensor]] = {}


def _on_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``, copied once per array and device; float32 on MPS (no float64)."""
    key = (id(values), str(device))
    if key not in _DEVICE_COPIES:
        if len(_DEVICE_COPIES) >= 256:
            _DEVICE_COPIES.clear()
        copy = torch.from_numpy(values.astype(np.float32) if device.type == "mps" else values).to(device)
        _DEVICE_COPIES[key] = (values, copy)
    return _DEVICE_COPIES[key][1]


def dynamic_threshold(sample: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al., 2022, Imagen), as diffusers' ``_threshold_sample``: per image,

    s = clamp(quantile_ratio(|x|), 1, max_value),  x <- clamp(x, -s, s) / s,

    where the quantile is over all C*H*W values of the image. With s = 1 it is clipping to [-1, 1]; a larger s
    pulls saturated pixels inwards instead of clipping them. Computed in float32 for half-precision inputs and
    returned in the input's dtype.
    """
    dtype = sample.dtype
    flat = sample.reshape(sample.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile and CPU clamp need float32
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(dtype)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the choices unless ``value`` is one of them (saying why for the variance types
    diffusers accepts and a chain refuses)."""
    if name == "variance_type" and value in REFUSED_VARIANCE_TYPES:
        raise ValueError(f"variance_type={value!r} is not supported: {REFUSED_VARIANCE_TYPES[value]}.")
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}: choose one of {', '.join(choices)}.")


def check_decoder_min_std(decoder_min_std: float | None, variance_type: str, first_beta: float) -> None:
    """Raise ``ValueError`` unless ``decoder_min_std`` is None, or a learned-range decoder's positive smallest
    standard deviation below its largest, sqrt(beta_1) = sqrt(``first_beta``)."""
    if decoder_min_std is None:
        return
    if variance_type != "learned_range":
        raise ValueError(
            f"decoder_min_std applies to variance_type='learned_range' only (got {variance_type!r}): drop it."
        )
    if not 0.0 < decoder_min_std < math.sqrt(first_beta):
        raise ValueError(
            f"decoder_min_std must lie in (0, sqrt(beta_1) = {math.sqrt(first_beta):.4g}), got {decoder_min_std}."
        )


@dataclass(frozen=True)
class DiffusionChain:
    """Float64 constants of one Markov chain x_0 -> x_{t_1} -> ... -> x_{t_K} (K = len(timesteps)), and the decoder's
    parameterisation.

    Built from the marginals alpha_bar_t = prod_{s<=t} alpha_s alone, so a sub-sequence of timesteps (respacing)
    is again a valid Markov chain with betas recomputed as beta_k = 1 - alpha_bar_{t_k} / alpha_bar_{t_{k-1}}.
    The per-step arrays have shape (K,) and are indexed by the position k in the chain (0 = the step that decodes
    x_0); ``train_alphas_cumprod`` (T,) is indexed by the original timestep.

    Args:
        prediction_type: what the model predicts: ``epsilon`` (the noise), ``sample`` (x_0) or ``v_prediction``.
        variance_type: variance of p_theta(x_{t-1} | x_t): ``fixed_small`` (beta~_t), ``fixed_large`` (beta_t) or
            ``learned_range`` (the model emits 2C channels; the last C give v in [-1, 1]).
        decoder_min_std: ``learned_range`` only: the standard deviation of the decoder p(x_0 | x_{t_1}) at v = -1
            (its largest, at v = +1, is sqrt(beta_1)); None: sqrt(beta~_2), improved-diffusion's clip.
    """

    train_alphas_cumprod: np.ndarray
    timesteps: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    betas: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    positions: np.ndarray
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    decoder_min_std: float | None = None

    @classmethod
    def from_alphas_cumprod(
        cls,
        train_alphas_cumprod: np.ndarray,
        timesteps: np.ndarray | None = None,
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        decoder_min_std: float | None = None,
    ) -> DiffusionChain:
        """The chain over the increasing ``timesteps`` (default: all T) of a schedule with cumulative products
        ``train_alphas_cumprod``:

        beta_k = 1 - abar_k / abar_{k-1};  beta~_k = beta_k (1 - abar_{k-1}) / (1 - abar_k);
        mu~_k(x_t, x_0) = coef1_k x_0 + coef2_k x_t with coef1_k = beta_k sqrt(abar_{k-1}) / (1 - abar_k) and
        coef2_k = sqrt(1 - beta_k) (1 - abar_{k-1}) / (1 - abar_k). log beta~ is clipped at k = 0 (where beta~ = 0)
        to log beta~_1, as improved-diffusion does, so the decoder p(x_0 | x_1) has a finite variance.

        A zero terminal SNR (abar_T = 0, beta_T = 1, :func:`~hf_ddpm.ddpm.schedules.rescale_zero_terminal_snr`)
        needs no clamping: q(x_T | x_0) = N(0, I), so the prior term is exactly 0, and log beta_T = 0 and
        log beta~_T = log(1 - abar_{T-1}) are finite. Only epsilon prediction is refused there, since
        x_0 = (x_T - sqrt(1 - abar_T) eps) / sqrt(abar_T) divides by 0 (diffusers returns inf/NaN).

        ``decoder_min_std`` (``learned_range`` only) replaces that clipped log beta~_1 as the smallest
        log-variance of the learned decoder by 2 log decoder_min_std, below log beta_1.
        """
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        train = np.asarray(train_alphas_cumprod, dtype=np.float64)
        if prediction_type == "epsilon" and train[-1] <= 0.0:
            raise ValueError(
                "prediction_type='epsilon' cannot decode at zero terminal SNR (abar_T = 0: x_0 = (x_T - eps) / 0); "
                "use 'v_prediction' (as Lin et al. 2023 do) or 'sample'."
            )
        steps = np.arange(len(train)) if timesteps is None else np.asarray(timesteps, dtype=np.int64)
        abar = train[steps]
        abar_prev = np.append(1.0, abar[:-1])
        betas = 1.0 - abar / abar_prev
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        clip_value = posterior_variance[1] if len(steps) > 1 else betas[0]
        positions = np.full(len(train), -1, dtype=np.int64)
        positions[steps] = np.arange(len(steps))
        check_decoder_min_std(decoder_min_std, variance_type, betas[0])
        return cls(
            train_alphas_cumprod=train,
            timesteps=steps,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            betas=betas,
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(np.append(clip_value, posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=np.sqrt(1.0 - betas) * (1.0 - abar_prev) / (1.0 - abar),
            positions=positions,
            prediction_type=prediction_type,
            variance_type=variance_type,
            decoder_min_std=decoder_min_std,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiffusionChain:
        """The full training chain of a scheduler config (a :class:`hf_ddpm.HFDDPMScheduler`'s, or diffusers'
        ``DDPMScheduler``'s with the same keys): whatever a pipeline's scheduler was respaced to for sampling, the
        bound is always that of the chain the model was trained on."""
        return cls.from_alphas_cumprod(
            np.cumprod(1.0 - betas_from_config(config)),
            prediction_type=config.get("prediction_type", "epsilon"),
            variance_type=config.get("variance_type", "fixed_small"),
            decoder_min_std=config.get("decoder_min_std"),
        )

    def respaced(self, timesteps: np.ndarray) -> DiffusionChain:
        """The sub-chain over the increasing original ``timesteps``, with the same schedule and parameterisation."""
        return DiffusionChain.from_alphas_cumprod(
            self.train_alphas_cumprod, timesteps, self.prediction_type, self.variance_type, self.decoder_min_std
        )

    @property
    def num_train_timesteps(self) -> int:
        """T of the schedule the chain was built from."""
        return len(self.train_alphas_cumprod)

    @functools.cached_property
    def log_betas(self) -> np.ndarray:
        """log beta_k, the largest log-variance of a learned-range decoder (computed once per chain)."""
        return np.log(self.betas)

    @functools.cached_property
    def learned_range_min_log_variance(self) -> np.ndarray:
        """The smallest log-variance of a learned-range decoder at each step: log beta~_k, at the first step
        2 log decoder_min_std where set (else the clipped log beta~_1)."""
        if self.decoder_min_std is None:
            return self.posterior_log_variance_clipped
        return np.append(2.0 * np.log(self.decoder_min_std), self.posterior_log_variance_clipped[1:])

    @functools.cached_property
    def fixed_large_log_variance(self) -> np.ndarray:
        """log beta_k, with log beta~_1 at the first step (log beta_1 for a one-step chain)."""
        first = self.betas[:1] if len(self.timesteps) == 1 else self.posterior_variance[1:2]
        return np.log(np.append(first, self.betas[1:]))

    @property
    def is_full(self) -> bool:
        """True for the chain over all T timesteps."""
        return len(self.timesteps) == self.num_train_timesteps

    def chain_position(self, timesteps: torch.Tensor | int) -> torch.Tensor:
        """Position k of each timestep in this chain (0 = the decoding step); errors if one is not in it."""
        t = torch.as_tensor(timesteps).detach().long().reshape(-1)
        T = self.num_train_timesteps
        if t.device.type != "cpu":  # checked on the device: reading t back would wait for its queued work
            k = _on_device(self.positions, t.device)[t.clamp(0, T - 1)]
            torch._assert_async(((t >= 0) & (t < T) & (k >= 0)).all(), "timesteps outside [0, T) or not in the chain")
            return k
        if t.numel() and (t.min() < 0 or t.max() >= T):
            raise ValueError(f"Timesteps must lie in [0, {T - 1}], got {t.tolist()[:8]}.")
        k = torch.from_numpy(self.positions)[t]
        if (k < 0).any():
            raise ValueError(
                f"Timestep(s) {t[k < 0].tolist()[:8]} are not in the chain {self.timesteps[::-1][:8].tolist()}...; "
                "call set_timesteps() with the chain you sample or evaluate on."
            )
        return k

    # ------------------------------------------------------------------ the forward process
    def q_step(self, previous_sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """One encoder step of this chain, x_{t_k} = sqrt(1 - beta_k) x_{t_{k-1}} + sqrt(beta_k) noise.

        This is a sample of q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I) with alpha_t = 1 - beta_t;
        ``previous_sample`` is x_{t-1} (x_0 when t is the first timestep), all tensors of shape (B, C, H, W).
        """
        beta = broadcast_constant(self.betas, self.chain_position(timesteps), previous_sample)
        return torch.sqrt(1.0 - beta) * previous_sample + torch.sqrt(beta) * noise

    def q_mean_variance(
        self, original_samples: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The marginal q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): (mean, variance, log_variance)."""
        abar = broadcast_constant(self.train_alphas_cumprod, torch.as_tensor(timesteps), original_samples)
        variance = (1.0 - abar).expand_as(original_samples)
        return torch.sqrt(abar) * original_samples, variance, torch.log1p(-abar).expand_as(original_samples)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample the marginal q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        abar = broadcast_constant(self.train_alphas_cumprod, torch.as_tensor(timesteps), original_samples)
        return torch.sqrt(abar) * original_samples + torch.sqrt(1.0 - abar) * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (``sample`` is x_0)."""
        abar = broadcast_constant(self.train_alphas_cumprod, torch.as_tensor(timesteps), sample)
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
        c1 = broadcast_constant(self.posterior_mean_coef1, k, sample)
        c2 = broadcast_constant(self.posterior_mean_coef2, k, sample)
        variance = broadcast_constant(self.posterior_variance, k, sample).expand_as(sample)
        log_variance = broadcast_constant(self.posterior_log_variance_clipped, k, sample).expand_as(sample)
        return c1 * original_samples + c2 * sample, variance, log_variance

    # ------------------------------------------------------------------ the decoder p_theta
    def split_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a (B, 2C, H, W) learned-variance output into (prediction, v); v is None for fixed variances."""
        channels = sample.shape[1]
        if self.variance_type == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"variance_type='learned_range' needs a model with 2*C = {2 * channels} output channels "
                    f"(prediction and variance), got {model_output.shape[1]}."
                )
            return model_output[:, :channels], model_output[:, channels:]
        if model_output.shape[1] != channels:
            raise ValueError(
                f"variance_type={self.variance_type!r} needs a model with C = {channels} output channels, "
                f"got {model_output.shape[1]}; a 2C-channel model needs variance_type='learned_range'."
            )
        return model_output, None

    def predict_original_sample(
        self, prediction: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x_0 from the model's prediction at x_t (``sample``):

        epsilon: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);  sample: x_0 = prediction;
        v_prediction: x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v.
        """
        abar = broadcast_constant(self.train_alphas_cumprod, torch.as_tensor(timesteps), sample)
        if self.prediction_type == "epsilon":
            return (sample - torch.sqrt(1.0 - abar) * prediction) / torch.sqrt(abar)
        if self.prediction_type == "sample":
            return prediction
        return torch.sqrt(abar) * sample - torch.sqrt(1.0 - abar) * prediction

    def model_log_variance(
        self, variance_output: torch.Tensor | None, sample: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """log sigma_t^2 of p_theta(x_{t-1} | x_t) on this chain, shaped like ``sample``:

        fixed_small: log beta~_t (clipped at the first step); fixed_large: log beta_t (log beta~_1 at the first
        step, as improved-diffusion does, so the decoder's variance is that of the next step);
        learned_range: (v + 1)/2 log beta_t + (1 - v)/2 log beta~_t with v the model's variance output, at every
        step including the first (between the clipped log beta~_1 and log beta_1 there, as improved-diffusion does,
        or between 2 log decoder_min_std and log beta_1, so the decoder's variance is learned too).
        """
        k = self.chain_position(timesteps)
        if self.variance_type == "fixed_small":
            return broadcast_constant(self.posterior_log_variance_clipped, k, sample).expand_as(sample)
        if self.variance_type == "fixed_large":
            return broadcast_constant(self.fixed_large_log_variance, k, sample).expand_as(sample)
        min_log = broadcast_constant(self.learned_range_min_log_variance, k, sample)
        max_log = broadcast_constant(self.log_betas, k, sample)
        frac = (variance_output + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        clip_denoised: bool = False,
        clip_range: float = 1.0,
        dynamic_thresholding: tuple[float, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I) with mu_theta = mu~_t(x_t, x0_theta(x_t, t)).

        The model's x_0 estimate (clipped to [-clip_range, clip_range] with ``clip_denoised``, or, taking
        precedence as in diffusers, passed through :func:`dynamic_threshold` with ``dynamic_thresholding`` =
        (ratio, max_value)) is plugged into the closed-form posterior mean (the parameterisation that makes each
        denoising-matching KL a weighted squared error). Returns (mean, log_variance, pred_original_sample).
        """
        prediction, variance_output = self.split_model_output(model_output, sample)
        pred_original = self.predict_original_sample(prediction, sample, timesteps)
        if dynamic_thresholding is not None:
            pred_original = dynamic_threshold(pred_original, *dynamic_thresholding)
        elif clip_denoised:
            pred_original = pred_original.clamp(-clip_range, clip_range)
        mean, _, _ = self.q_posterior_mean_variance(pred_original, sample, timesteps)
        return mean, self.model_log_variance(variance_output, sample, timesteps), pred_original
