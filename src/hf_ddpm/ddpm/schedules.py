"""Noise schedules: the variances beta_1..beta_T of the fixed Gaussian encoder q(x_t | x_{t-1}).

Every function returns a float64 numpy array of shape (T,). Nothing else lives here: the scheduler turns the
betas into alphas, cumulative products and posterior coefficients (all in float64), and casts at use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config_checks import is_integer

#: Names accepted for ``beta_schedule``; ``squaredcos_cap_v2`` is diffusers' name for ``cosine``.
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sigmoid")
#: The largest T accepted, 25x the 4,000 steps of Nichol & Dhariwal (2021): a cosine HFDDPMScheduler of 100,000
#: steps builds in 24 ms with 9.6 MB of float64 constants (measured); anything larger is a typo or a hostile config.
MAX_TRAIN_TIMESTEPS = 100_000


def check_num_train_timesteps(num_timesteps: object) -> None:
    """Raise ``ValueError`` (one line) unless ``num_timesteps`` is an integer (not a bool, not a string such as
    ``"50"`` from a hand-edited config) in [1, :data:`MAX_TRAIN_TIMESTEPS`]."""
    if not is_integer(num_timesteps) or not 1 <= num_timesteps <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(
            f"num_train_timesteps must be an integer in [1, {MAX_TRAIN_TIMESTEPS:,}], got {num_timesteps!r} "
            f"(a {type(num_timesteps).__name__})."
        )


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. (2020): beta_t = beta_start + (beta_end - beta_start) (t - 1) / (T - 1), for t = 1..T."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Latent-diffusion schedule: sqrt(beta_t) linear in t, i.e. beta_t = linspace(sqrt(b0), sqrt(b1), T)_t^2."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, max_beta: float = 0.999, offset: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal (2021): alpha_bar(s) = cos^2(((s + offset) / (1 + offset)) * pi / 2), s in [0, 1],

    beta_t = min(1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), max_beta), for t = 1..T,

    computed for all t at once (numpy's cosine, which agrees with Python's ``math.cos`` to 1 ulp).
    """

    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def sigmoid_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """GeoDiff's schedule (diffusers' ``beta_schedule="sigmoid"``): beta_t = beta_start + (beta_end - beta_start)
    sigmoid(s_t), with s = linspace(-6, 6, T) and sigmoid(s) = 1 / (1 + e^-s)."""
    s = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-s)) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2023), Algorithm 1 (diffusers' ``rescale_betas_zero_snr``): shift and scale sqrt(abar_t) so that
    the last one is 0 and the first is unchanged,

    sqrt(abar'_t) = (sqrt(abar_t) - sqrt(abar_T)) sqrt(abar_1) / (sqrt(abar_1) - sqrt(abar_T)),
    beta'_t = 1 - abar'_t / abar'_{t-1} (abar'_0 = 1),

    in float64, so abar'_T = 0 and beta'_T = 1 exactly: the terminal SNR abar_T / (1 - abar_T) is zero and
    q(x_T | x_0) = N(0, I) for every x_0.
    """
    abar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar = ((abar_sqrt - last) * (first / (first - last))) ** 2
    return 1.0 - abar / np.append(1.0, abar[:-1])


def make_betas(
    beta_schedule: str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    trained_betas: Sequence[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """The betas of a named schedule (or the explicit ``trained_betas``), validated, as float64 of shape (T,),
    rescaled to zero terminal SNR (:func:`rescale_zero_terminal_snr`) with ``rescale_betas_zero_snr``."""
    check_num_train_timesteps(num_timesteps)
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) != num_timesteps:
            raise ValueError(
                f"trained_betas must be a 1-D sequence of num_train_timesteps={num_timesteps} values, "
                f"got shape {betas.shape}."
            )
    elif beta_schedule == "linear":
        betas = linear_betas(num_timesteps, beta_start, beta_end)
    elif beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(num_timesteps, beta_start, beta_end)
    elif beta_schedule in ("cosine", "squaredcos_cap_v2"):
        betas = cosine_betas(num_timesteps)
    elif beta_schedule == "sigmoid":
        betas = sigmoid_betas(num_timesteps, beta_start, beta_end)
    else:
        raise ValueError(
            f"Unknown beta_schedule {beta_schedule!r}: choose one of {', '.join(BETA_SCHEDULES)} "
            "or pass trained_betas."
        )
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError(
            "Every beta_t must lie in (0, 1) so that q(x_t | x_{t-1}) is a proper Gaussian "
            f"(got values in [{betas.min():.3g}, {betas.max():.3g}])."
        )
    if rescale_betas_zero_snr:
        if num_timesteps < 2:
            raise ValueError(
                "rescale_betas_zero_snr needs num_train_timesteps >= 2: one abar cannot both keep its value and be 0."
            )
        betas = rescale_zero_terminal_snr(betas)  # beta_T = 1 exactly: its x_T carries no signal
    return betas


def betas_from_config(config: Mapping[str, Any]) -> np.ndarray:
    """The betas that a scheduler config (a :class:`hf_ddpm.HFDDPMScheduler`'s or diffusers' ``DDPMScheduler``'s)
    describes: :func:`make_betas` of its ``beta_schedule``, ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``trained_betas`` and ``rescale_betas_zero_snr``, with diffusers' defaults for missing keys."""
    return make_betas(
        config.get("beta_schedule", "linear"),
        config["num_train_timesteps"],
        config.get("beta_start", 1e-4),
        config.get("beta_end", 0.02),
        config.get("trained_betas"),
        bool(config.get("rescale_betas_zero_snr", False)),
    )
