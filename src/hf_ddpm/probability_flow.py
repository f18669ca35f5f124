"""The probability-flow ODE of a variance-preserving diffusion model and its exact log-likelihood, one function per
equation (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Sec. 4.3 and App. D.2).

The forward process is written in the log-SNR view of VDM (Kingma et al. 2021): for t in [0, 1],

    x_t = alpha_t x + sigma_t eps,   alpha_t^2 = sigmoid(-gamma(t)),   sigma_t^2 = sigmoid(gamma(t)),

with gamma = -log SNR increasing. It is the marginal of the SDE dx = f(t) x dt + g(t) dW with

    f(t) = d log alpha_t / dt = -1/2 sigma_t^2 gamma'(t),
    g^2(t) = d sigma_t^2 / dt - 2 f(t) sigma_t^2 = sigma_t^2 gamma'(t)   (alpha_t^2 + sigma_t^2 = 1),

whose probability flow dx/dt = f(t) x - 1/2 g^2(t) score(x, t), with the model's score -eps_hat(x, t) / sigma_t, is

    dx/dt = 1/2 gamma'(t) sigma_t (eps_hat(x, t) - sigma_t x)                         (:func:`probability_flow_drift`)

which, with the true score in place of the model's, moves the forward process's marginals p_t along exactly. With
the model's, it defines the model's own densities p_t, and the change of variables along it gives, for a point x
taken as the state at t_min and x_1 its image at t = 1,

    log p_{t_min}(x) = log p_1(x_1) + int_{t_min}^1 div_x drift(x_t, t) dt,           (:func:`ode_log_likelihood`)
    div_x drift = 1/2 gamma'(t) sigma_t (div_x eps_hat(x, t) - sigma_t D)           (:func:`drift_divergence`)

with D the number of dimensions. Here p_1 is N(0, I), the prior the samplers draw x_1 from (pass another
``prior_log_density``, such as the exact Gaussian marginal of a known data distribution, to replace it): with it
the result is the exact log-density of the model "draw x_1 ~ N(0, I), integrate the ODE back to t_min", a proper
continuous density, computed to the solver's tolerance (exact divergence) or without bias (Hutchinson-Skilling).

The model enters as two callables, as the ELBO functions take them: ``gamma(t)`` (and its derivative, or autograd
computes it) and ``eps_model(x_t, t) -> eps_hat`` with continuous t of shape (B,), so a network, the discrete-time
DDPM's continuous-time view, or an analytic oracle plug in alike.

8-bit data: :func:`uniform_dequantize` and :func:`dequantized_bits_per_dim` turn a density on R^D into a bound on
the discrete NLL of data on the grid k / 127.5 - 1; :func:`truncated_normal_dequantize` and
:func:`truncated_normal_dequantized_bits_per_dim` do it with the diffusion's own noise at t_min, cut to the bin
(the truncated-normal dequantization of i-DODE, Zheng et al. 2023, Sec. 4.2), for a model whose density at t_min
was trained on noisy data on the grid and gives little to the points between.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .distributions import gaussian_log_density, sum_over_pixels

#: gamma(t) = -log SNR(t), elementwise on t of shape (B,).
GammaFunction = Callable[[torch.Tensor], torch.Tensor]
#: eps_hat = eps_model(x_t, t), x_t of shape (B, ...) and continuous t of shape (B,).
EpsilonModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: The right-hand side dy/dt = fn(t, y) of an ODE on a batch of states y of shape (B, N), t a float.
ODEFunction = Callable[[float, torch.Tensor], torch.Tensor]
PROBE_KINDS = ("rademacher", "gaussian")
DIVERGENCE_METHODS = ("hutchinson", "exact")
SOLVER_METHODS = ("dopri5", "fixed")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
#: Width of one bin of 8-bit data on the grid k / 127.5 - 1 (k = 0..255): 2 / 255.
EIGHT_BIT_BIN_WIDTH = 2.0 / 255.0

# Dormand-Prince 5(4) (Dormand & Prince 1980; Hairer, Norsett & Wanner, Solving ODEs I, Table II.5.2).
_DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DOPRI_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DOPRI_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DOPRI_ERROR = tuple(b5 - b4 for b5, b4 in zip(_DOPRI_B5, _DOPRI_B4, strict=True))


def _image_shaped(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1), to broadcast against ``like`` of shape (B, ...)."""
    return values.reshape([-1] + [1] * (like.dim() - 1))


def probability_flow_drift(
    x: torch.Tensor, eps_hat: torch.Tensor, gamma: torch.Tensor, gamma_rate: torch.Tensor
) -> torch.Tensor:
    """The drift of the variance-preserving probability-flow ODE in the log-SNR view,

        dx/dt = f(t) x - 1/2 g^2(t) score = 1/2 gamma'(t) sigma_t (eps_hat(x, t) - sigma_t x),

    from f = -1/2 sigma_t^2 gamma', g^2 = sigma_t^2 gamma', score = -eps_hat / sigma_t and sigma_t^2 = sigmoid(gamma).
    ``x``, ``eps_hat``: (B, ...); ``gamma`` = gamma(t) and ``gamma_rate`` = gamma'(t): (B,).
    """
    sigma = _image_shaped(torch.sigmoid(gamma).sqrt(), x)
    return 0.5 * _image_shaped(gamma_rate, x) * sigma * (eps_hat - sigma * x)


def drift_divergence(
    eps_divergence: torch.Tensor, gamma: torch.Tensor, gamma_rate: torch.Tensor, num_dims: int
) -> torch.Tensor:
    """div_x of :func:`probability_flow_drift`, 1/2 gamma'(t) sigma_t (div_x eps_hat - sigma_t D), from the divergence
    of the eps-model (exact or estimated), all (B,); D = ``num_dims``. The -sigma_t D part is exact."""
    sigma = torch.sigmoid(gamma).sqrt()
    return 0.5 * gamma_rate * sigma * (eps_divergence - sigma * num_dims)


def exact_divergence(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """div_x F = sum_d dF_d / dx_d per batch element, exactly: one backward pass per dimension d, (B,).

    ``output`` = F(x) of shape (B, ...) must have been computed from ``x`` (which requires grad) with the batch
    elements independent of each other (no batch statistics), so that the gradient of sum_b F_d(x_b) with respect to
    x_b is row d of image b's Jacobian. Costs D backward passes: for small images and for tests.
    """
    flat_output = output.reshape(output.shape[0], -1)
    divergence = torch.zeros(output.shape[0], dtype=output.dtype, device=output.device)
    for d in range(flat_output.shape[1]):
        (row,) = torch.autograd.grad(flat_output[:, d].sum(), x, retain_graph=True)
        divergence = divergence + row.reshape(row.shape[0], -1)[:, d]
    return divergence


def hutchinson_divergence(output: torch.Tensor, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """The Hutchinson-Skilling estimate of div_x F per batch element, v^T (dF/dx) v, (B,), from one probe v of x's
    shape with E[v v^T] = I (:func:`sample_probes`): unbiased, E_v[v^T J v] = tr J. One backward pass (a
    vector-Jacobian product), whatever D; ``output`` = F(x) as in :func:`exact_divergence`."""
    (vector_jacobian,) = torch.autograd.grad((output * probe).sum(), x)
    return sum_over_pixels(vector_jacobian * probe)


def sample_probes(
    shape: tuple[int, ...],
    kind: str,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Probes v with E[v v^T] = I for :func:`hutchinson_divergence`: ``rademacher`` (each entry +-1 with probability
    1/2; Var = 1/2 sum_{i != j} (J_ij + J_ji)^2, the smallest) or ``gaussian`` (N(0, I); Var = ||J + J^T||_F^2 / 2).
    Drawn on the generator's device (CPU by default) and moved to ``device``."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"Unknown probe kind {kind!r}: choose one of {', '.join(PROBE_KINDS)}.")
    if kind == "gaussian":
        probe = torch.randn(shape, generator=generator, dtype=dtype)
    else:
        probe = torch.randint(0, 2, shape, generator=generator).to(dtype) * 2.0 - 1.0
    return probe.to(device)


@dataclass(frozen=True)
class ODESolution:
    """The state at the end time, y(t1) of shape (B, N), and the cost: ``nfe`` evaluations of the right-hand side,
    ``accepted`` and ``rejected`` steps."""

    y: torch.Tensor
    nfe: int
    accepted: int
    rejected: int


def _dopri_step(
    fn: ODEFunction, t: float, y: torch.Tensor, h: float, k1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Dormand-Prince step from (t, y) with k1 = fn(t, y): (y_new of order 5, the embedded error estimate
    y5 - y4, k7 = fn(t + h, y_new), the next step's k1). Six evaluations of ``fn``."""
    stages = [k1]
    for c, row in zip(_DOPRI_C[1:], _DOPRI_A[1:], strict=True):
        increment = sum(a * k for a, k in zip(row, stages, strict=True) if a != 0.0)
        stages.append(fn(t + c * h, y + h * increment))
    y_new = y + h * sum(b * k for b, k in zip(_DOPRI_B5, stages, strict=True) if b != 0.0)
    error = h * sum(e * k for e, k in zip(_DOPRI_ERROR, stages, strict=True) if e != 0.0)
    return y_new, error, stages[-1]


def _error_norm(error: torch.Tensor, y: torch.Tensor, y_new: torch.Tensor, rtol: float, atol: float) -> float:
    """The batch's error: the largest over its rows of the root-mean-square of error / (atol + rtol max(|y|, |y_new|))
    (Hairer, Norsett & Wanner II.4), so that every element of the batch meets the tolerance."""
    scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
    return (error / scale).pow(2).mean(dim=1).sqrt().max().item()


def dormand_prince(
    fn: ODEFunction,
    y0: torch.Tensor,
    t0: float,
    t1: float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 100_000,
) -> ODESolution:
    """Integrate dy/dt = fn(t, y) from t0 to t1 > t0 with the adaptive Dormand-Prince 5(4) method on a batch of states
    y0 (B, N): one step size for the whole batch, accepted when the error norm of :func:`_error_norm` is at most 1,
    the next step h (0.9 norm^(-1/5), within [0.2, 10] times the last); the first step by Hairer's rule
    (Hairer, Norsett & Wanner II.4, one evaluation), and the first same-as-last stage reused (6 evaluations per
    step). Returns y(t1) of order 5 (local extrapolation) and the number of evaluations of ``fn``."""
    if not t1 > t0:
        raise ValueError(f"The end time t1={t1} must be after the start t0={t0}.")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}.")
    k1 = fn(t0, y0)
    scale = atol + rtol * y0.abs()
    d0, d1 = (y0 / scale).pow(2).mean().sqrt().item(), (k1 / scale).pow(2).mean().sqrt().item()
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, t1 - t0)
    k_probe = fn(t0 + h0, y0 + h0 * k1)
    d2 = ((k_probe - k1) / scale).pow(2).mean().sqrt().item() / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h0, h1, t1 - t0)
    t, y, nfe, accepted, rejected = t0, y0, 2, 0, 0
    while t < t1:
        if accepted + rejected >= max_steps:
            raise RuntimeError(f"dormand_prince took {max_steps} steps before t1={t1} (at t={t}): loosen rtol/atol.")
        h = min(h, t1 - t)
        y_new, error, k7 = _dopri_step(fn, t, y, h, k1)
        nfe += 6
        norm = _error_norm(error, y, y_new, rtol, atol)
        factor = 10.0 if norm == 0 else min(10.0, max(0.2, 0.9 * norm ** (-1 / 5)))
        if norm <= 1.0:
            t = t1 if t + h >= t1 else t + h
            y, k1 = y_new, k7
            accepted += 1
        else:
            rejected += 1
        h *= factor
    return ODESolution(y=y, nfe=nfe, accepted=accepted, rejected=rejected)


def fixed_step_dormand_prince(fn: ODEFunction, y0: torch.Tensor, t0: float, t1: float, num_steps: int) -> ODESolution:
    """Integrate dy/dt = fn(t, y) from t0 to t1 with ``num_steps`` equal Dormand-Prince steps of order 5, h =
    (t1 - t0) / num_steps, no error control: 6 num_steps + 1 evaluations of ``fn``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    if not t1 > t0:
        raise ValueError(f"The end time t1={t1} must be after the start t0={t0}.")
    h = (t1 - t0) / num_steps
    y, k1 = y0, fn(t0, y0)
    for step in range(num_steps):
        y, _, k1 = _dopri_step(fn, t0 + step * h, y, h, k1)
    return ODESolution(y=y, nfe=6 * num_steps + 1, accepted=num_steps, rejected=0)


def standard_normal_log_density(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I) per batch element, -1/2 (D log 2 pi + ||x||^2): the prior p_1 of :func:`ode_log_likelihood`."""
    zeros = torch.zeros_like(x)
    return sum_over_pixels(gaussian_log_density(x, zeros, zeros))


def gamma_rate_by_autograd(gamma: GammaFunction) -> GammaFunction:
    """t -> gamma'(t), elementwise, by differentiating sum_b gamma(t_b) with respect to t (detached)."""

    def rate(t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = t.detach().requires_grad_(True)
            (derivative,) = torch.autograd.grad(gamma(leaf).sum(), leaf)
        return derivative

    return rate


@dataclass(frozen=True)
class ODELikelihood:
    """The probability-flow log-likelihood of a batch, in nats.

    Attributes:
        prior_log_density: (B,) log p_1(x_1) at the ODE's end point x_1.
        divergence_integral: (B, K) int_{t_min}^1 div drift dt, one column per probe (K = 1 with the exact trace).
        latent: (B, ...) x_1, the image of x at t = 1 (the ODE's encoding).
        nfe: evaluations of the ODE's right-hand side (each one network call and its backward passes).
    """

    prior_log_density: torch.Tensor
    divergence_integral: torch.Tensor
    latent: torch.Tensor
    nfe: int

    @property
    def log_likelihood(self) -> torch.Tensor:
        """(B,) log p_{t_min}(x) = log p_1(x_1) + the mean over the probes of the divergence integral."""
        return self.prior_log_density + self.divergence_integral.mean(dim=1)

    @property
    def probe_standard_error(self) -> torch.Tensor:
        """(B,) standard error of :attr:`log_likelihood` over the K probes, sd / sqrt(K) (NaN for K = 1)."""
        k = self.divergence_integral.shape[1]
        if k == 1:
            return torch.full_like(self.prior_log_density, math.nan)
        return self.divergence_integral.std(dim=1) / math.sqrt(k)


def ode_log_likelihood(
    x: torch.Tensor,
    eps_model: EpsilonModel,
    gamma: GammaFunction,
    gamma_rate: GammaFunction | None = None,
    *,
    t_min: float = 0.0,
    divergence: str = "hutchinson",
    probes: int = 1,
    probe_kind: str = "rademacher",
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    num_steps: int = 100,
    prior_log_density: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> ODELikelihood:
    """log p_{t_min}(x) = log p_1(x_1) + int_{t_min}^1 div_x drift(x_t, t) dt along the probability-flow ODE
    (:func:`probability_flow_drift`) started at x_{t_min} = x, the state and the integral solved jointly.

    Args:
        x: (B, ...) points, in the dtype the ODE is solved in (float64 where precision matters).
        eps_model: eps_hat = eps_model(x_t, t), t of shape (B,); its batch elements independent.
        gamma: gamma(t) = -log SNR, elementwise on t of shape (B,).
        gamma_rate: gamma'(t); None differentiates ``gamma`` by autograd (:func:`gamma_rate_by_autograd`).
        t_min: the start time, in [0, 1): x is taken as the state at t_min, where the forward process has already
            added noise of standard deviation sigma_{t_min} (0 for the VDM: gamma(0) = gamma_0).
        divergence: ``exact`` (D backward passes per evaluation) or ``hutchinson`` (one per probe).
        probes: K, the Hutchinson probes per point, each with its own ODE solve (batched as K B states);
            the result's ``divergence_integral`` keeps them apart. 1 with the exact trace.
        probe_kind: ``rademacher`` or ``gaussian`` (:func:`sample_probes`), fixed along each trajectory.
        method: ``dopri5`` (adaptive, ``rtol``/``atol``) or ``fixed`` (``num_steps`` equal steps).
        prior_log_density: log p_1 of the end point, (B, ...) -> (B,); default :func:`standard_normal_log_density`.
        generator: for the probes.
    """
    if divergence not in DIVERGENCE_METHODS:
        raise ValueError(f"Unknown divergence {divergence!r}: choose one of {', '.join(DIVERGENCE_METHODS)}.")
    if method not in SOLVER_METHODS:
        raise ValueError(f"Unknown ODE method {method!r}: choose one of {', '.join(SOLVER_METHODS)}.")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must lie in [0, 1), got {t_min}.")
    if probes < 1:
        raise ValueError(f"probes must be at least 1, got {probes}.")
    if divergence == "hutchinson" and probe_kind not in PROBE_KINDS:
        raise ValueError(f"Unknown probe kind {probe_kind!r}: choose one of {', '.join(PROBE_KINDS)}.")
    rate = gamma_rate or gamma_rate_by_autograd(gamma)
    copies = probes if divergence == "hutchinson" else 1
    batch, shape = x.shape[0], x.shape[1:]
    num_dims = x[0].numel()
    states = x.repeat_interleave(copies, dim=0)
    probe = (
        sample_probes(tuple(states.shape), probe_kind, dtype=x.dtype, device=x.device, generator=generator)
        if divergence == "hutchinson"
        else None
    )

    def dynamics(t: float, y: torch.Tensor) -> torch.Tensor:
        times = torch.full((y.shape[0],), t, dtype=y.dtype, device=y.device)
        g, g_rate = gamma(times).detach(), rate(times).detach()
        with torch.enable_grad():
            leaf = y[:, :-1].reshape(-1, *shape).detach().requires_grad_(True)
            eps_hat = eps_model(leaf, times)
            if eps_hat.shape != leaf.shape:
                raise ValueError(
                    f"eps_model returned shape {tuple(eps_hat.shape)} for points of shape {tuple(leaf.shape)}: it "
                    "must predict the noise of each point (of a learned-variance network, keep the first C channels)."
                )
            if probe is None:
                eps_divergence = exact_divergence(eps_hat, leaf)
            else:
                eps_divergence = hutchinson_divergence(eps_hat, leaf, probe)
        drift = probability_flow_drift(leaf.detach(), eps_hat.detach(), g, g_rate)
        div = drift_divergence(eps_divergence.detach(), g, g_rate, num_dims)
        return torch.cat([drift.reshape(y.shape[0], -1), div[:, None]], dim=1)

    flat = states.reshape(states.shape[0], -1)
    y0 = torch.cat([flat, torch.zeros_like(flat[:, :1])], dim=1)
    if method == "dopri5":
        solution = dormand_prince(dynamics, y0, t_min, 1.0, rtol=rtol, atol=atol)
    else:
        solution = fixed_step_dormand_prince(dynamics, y0, t_min, 1.0, num_steps)
    latent = solution.y[:, :-1].reshape(batch, copies, *shape)[:, 0]
    prior = (prior_log_density or standard_normal_log_density)(latent)
    return ODELikelihood(
        prior_log_density=prior,
        divergence_integral=solution.y[:, -1].reshape(batch, copies),
        latent=latent,
        nfe=solution.nfe,
    )


class InterpolatedGamma:
    """gamma(t) through knots (t_i, gamma_i), t_i increasing, by monotone piecewise-cubic Hermite interpolation
    (PCHIP, Fritsch & Carlson 1980; the weighted harmonic mean of the neighbouring slopes of Fritsch & Butland 1984,
    as scipy's ``PchipInterpolator``, one-sided slopes at the two ends): the continuous-time view of a discrete
    schedule. gamma and gamma' are continuous (a piecewise-linear gamma has a jump in gamma' at every knot, at which
    an adaptive solver's error control stalls: on the Gaussian oracle of the tests, T = 1000 linear-beta knots,
    rtol = atol = 1e-8, 25,088 evaluations piecewise-linear against 758 with this interpolant, measured), and gamma
    is monotone between knots where the knots are. Defined on [t_0, t_last]; ``__call__`` and :meth:`derivative`
    take t of any shape, in the dtype and device of t.
    """

    def __init__(self, times: np.ndarray, gammas: np.ndarray):
        times, gammas = np.asarray(times, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
        if times.ndim != 1 or times.shape != gammas.shape or len(times) < 2:
            raise ValueError("InterpolatedGamma needs two 1-D arrays of at least 2 knots of the same length.")
        if not (np.diff(times) > 0).all():
            raise ValueError("The knots' times must be strictly increasing.")
        widths, slopes = np.diff(times), np.diff(gammas) / np.diff(times)
        rates = np.concatenate([slopes[:1], np.zeros(len(times) - 2), slopes[-1:]])
        left, right = slopes[:-1], slopes[1:]
        weight_left, weight_right = 2 * widths[1:] + widths[:-1], widths[1:] + 2 * widths[:-1]
        same_sign = left * right > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            harmonic = (weight_left + weight_right) / (weight_left / left + weight_right / right)
        rates[1:-1] = np.where(same_sign, harmonic, 0.0)
        self.times, self.gammas, self.rates = times, gammas, rates

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: np.ndarray) -> InterpolatedGamma:
        """The continuous-time view of a discrete chain with T marginals abar_i (timestep i = 0..T-1 is the latent
        x_{i+1}): knots t_i = (i + 1) / T and gamma_i = log((1 - abar_i) / abar_i) = -log SNR_i, so t = k / T is the
        latent x_k of the maths, t = 1 is x_T (where the bound's prior term sits) and the network is conditioned on
        the timestep t T - 1. Defined on [1/T, 1]: below x_1 the chain has no noise level to interpolate."""
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        if not ((abar > 0) & (abar < 1)).all():
            raise ValueError(
                "The probability-flow ODE needs 0 < abar_t < 1 at every step (a finite log-SNR); a zero-terminal-SNR "
                "chain (abar_T = 0) has none at t = 1."
            )
        steps = len(abar)
        return cls(np.arange(1, steps + 1) / steps, np.log1p(-abar) - np.log(abar))

    def _knots(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(s, h, g_i, g_{i+1}, h d_i, h d_{i+1}) packed for t in [t_i, t_{i+1}]: s = (t - t_i) / h, h the width."""
        times = torch.from_numpy(self.times).to(device=t.device, dtype=t.dtype)
        if t.numel() and (t.min() < times[0] - 1e-12 or t.max() > times[-1] + 1e-12):
            raise ValueError(
                f"t must lie in [{self.times[0]}, {self.times[-1]}], got values in "
                f"[{t.min().item()}, {t.max().item()}]."
            )
        index = (torch.searchsorted(times, t.detach().contiguous(), right=True) - 1).clamp(0, len(self.times) - 2)
        gammas = torch.from_numpy(self.gammas).to(device=t.device, dtype=t.dtype)
        rates = torch.from_numpy(self.rates).to(device=t.device, dtype=t.dtype)
        width = times[index + 1] - times[index]
        s = (t - times[index]) / width
        return s, width, gammas[index], gammas[index + 1], width * rates[index], width * rates[index + 1]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """The cubic Hermite interpolant on [t_i, t_{i+1}], s = (t - t_i) / h, d_i the knots' rates:
        gamma = (2s^3 - 3s^2 + 1) g_i + (s^3 - 2s^2 + s) h d_i + (3s^2 - 2s^3) g_{i+1} + (s^3 - s^2) h d_{i+1}."""
        s, _, g0, g1, m0, m1 = self._knots(t)
        return (
            (2 * s**3 - 3 * s**2 + 1) * g0
            + (s**3 - 2 * s**2 + s) * m0
            + (3 * s**2 - 2 * s**3) * g1
            + (s**3 - s**2) * m1
        )

    def derivative(self, t: torch.Tensor) -> torch.Tensor:
        """gamma'(t) = ((6s^2 - 6s) (g_i - g_{i+1}) + (3s^2 - 4s + 1) h d_i + (3s^2 - 2s) h d_{i+1}) / h."""
        s, width, g0, g1, m0, m1 = self._knots(t)
        return ((6 * s**2 - 6 * s) * (g0 - g1) + (3 * s**2 - 4 * s + 1) * m0 + (3 * s**2 - 2 * s) * m1) / width


def epsilon_from_prediction(
    prediction: torch.Tensor, x_t: torch.Tensor, gamma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The eps-model's output from a network that predicts another target at x_t = alpha_t x + sigma_t eps, with
    alpha_t^2 = sigmoid(-gamma), sigma_t^2 = sigmoid(gamma) and ``gamma`` (B,):

    epsilon: eps_hat = prediction;  sample (x_hat): eps_hat = (x_t - alpha_t x_hat) / sigma_t;
    v_prediction (v = alpha_t eps - sigma_t x): eps_hat = sigma_t x_t + alpha_t v.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}.")
    if prediction_type == "epsilon":
        return prediction
    alpha = _image_shaped(torch.sigmoid(-gamma).sqrt(), x_t)
    sigma = _image_shaped(torch.sigmoid(gamma).sqrt(), x_t)
    if prediction_type == "sample":
        return (x_t - alpha * prediction) / sigma
    return sigma * x_t + alpha * prediction


@dataclass(frozen=True)
class ProbabilityFlow:
    """What :func:`ode_log_likelihood` needs of a model, as a pipeline's ``probability_flow()`` gives it.

    Attributes:
        gamma: gamma(t) = -log SNR(t) on [earliest_time, 1].
        gamma_rate: gamma'(t), or None for autograd.
        eps_model: eps_hat(x_t, t), t of shape (B,), in the dtype of x_t.
        earliest_time: the smallest t_min the model defines (0 for the VDM, 1/T for a discrete chain).
        device: where the model runs; the points are moved there.
    """

    gamma: GammaFunction
    gamma_rate: GammaFunction | None
    eps_model: EpsilonModel
    earliest_time: float
    device: torch.device


def uniform_dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """y = x + u, u ~ U(-1/255, 1/255) elementwise: 8-bit data x = k / 127.5 - 1 spread uniformly over their bins
    [x - 1/255, x + 1/255], of width 2/255, which tile [-1 - 1/255, 1 + 1/255]. Drawn on the CPU (from a
    CPU generator's stream) in x's dtype and moved to x's device."""
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x + (noise - 0.5) * EIGHT_BIT_BIN_WIDTH


def dequantized_bits_per_dim(log_density: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Bits/dim of 8-bit data from the log-density of its uniformly dequantized version y (:func:`uniform_dequantize`):

        (-log p(y) - D log(2/255)) / (D ln 2) = -log2 p(y) / D + log2(127.5).

    Derivation: the probability of the 8-bit image x is that of its bin B(x), a cube of side 2/255, so with u
    uniform on it (density (255/2)^D), by Jensen's inequality

        log P(x) = log int_B p(y) dy = log E_u[p(x + u)] + D log(2/255) >= E_u[log p(x + u)] + D log(2/255):

    -log P(x) <= E_u[-log p(x + u)] - D log(2/255), and one draw of u gives an unbiased estimate of that bound.
    (Bins of width 2/256, log2(128) = 7 bits, would belong to data (k + u)/256 on [0, 1] mapped to [-1, 1]; on our
    grid that offset would overstate every result by log2(256/255) = 0.0056 bits/dim.)
    """
    return (-log_density - num_dims * math.log(EIGHT_BIT_BIN_WIDTH)) / (num_dims * math.log(2.0))


def bin_truncation(gamma: float) -> float:
    """tau = (1/255) / exp(gamma / 2): the half-width of an 8-bit bin, 1/255, in units of sigma_t / alpha_t =
    exp(gamma(t) / 2), the standard deviation of the noise the forward process has added to x at t, scaled back to
    the data. Noise cut to [-tau, tau] (:func:`truncated_normal_dequantize`) keeps x_t / alpha_t inside x's bin."""
    return (EIGHT_BIT_BIN_WIDTH / 2.0) * math.exp(-gamma / 2.0)


def truncated_normal_log_normalizer(tau: float) -> float:
    """log Z(tau) = log P(|e| <= tau) = log erf(tau / sqrt 2), e ~ N(0, 1): the log-mass of N(0, 1) on [-tau, tau]."""
    return math.log(math.erf(tau / math.sqrt(2.0)))


def truncated_normal_entropy(tau: float) -> float:
    """H = 1/2 log(2 pi e) + log Z(tau) - tau phi(tau) / Z(tau), in nats: the entropy of N(0, 1) truncated to
    [-tau, tau], per dimension (from -log q(e) = 1/2 log(2 pi) + log Z + e^2 / 2 and E[e^2] = 1 - 2 tau phi(tau) / Z;
    Z by :func:`truncated_normal_log_normalizer`, phi the standard normal density)."""
    log_z = truncated_normal_log_normalizer(tau)
    phi = math.exp(-0.5 * tau**2) / math.sqrt(2.0 * math.pi)
    return 0.5 * math.log(2.0 * math.pi * math.e) + log_z - tau * phi / math.exp(log_z)


def truncated_normal_dequantize(
    x: torch.Tensor, gamma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = alpha x + sigma e, e ~ N(0, I) truncated to [-tau, tau] elementwise, tau = :func:`bin_truncation`(gamma):
    the forward process's x_t at gamma = gamma(t) with its noise cut so that v = z / alpha = x + (sigma / alpha) e
    stays in x's 8-bit bin. e by the inverse CDF of u ~ U(Phi(-tau), Phi(tau)), drawn on the CPU (from a CPU
    generator's stream) in x's dtype and moved to x's device."""
    tau = bin_truncation(gamma)
    low = 0.5 * math.erfc(tau / math.sqrt(2.0))  # Phi(-tau), exact in its tail
    uniform = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    noise = torch.special.ndtri(low + (1.0 - 2.0 * low) * uniform).clamp(-tau, tau).to(x.dtype).to(x.device)
    alpha, sigma = math.sqrt(1.0 / (1.0 + math.exp(gamma))), math.sqrt(1.0 / (1.0 + math.exp(-gamma)))
    return alpha * x + sigma * noise


def truncated_normal_dequantized_bits_per_dim(log_density: torch.Tensor, gamma: float, num_dims: int) -> torch.Tensor:
    """Bits/dim of 8-bit data from the log-density p_t(z) of z = :func:`truncated_normal_dequantize`(x, gamma(t)):

        (-log p_t(z) - D (H(tau) + log sigma_t)) / (D ln 2),   H = :func:`truncated_normal_entropy`.

    Derivation: v = z / alpha = x + s e with s = sigma / alpha lies in x's bin, with density q(v) = q_e(e) / s^D; the
    model's density of v is p_t(alpha v) alpha^D. As for the uniform dequantization (:func:`dequantized_bits_per_dim`),

        log P(x) = log int_bin p_V(v) dv >= E_q[log p_V(v) - log q(v)]
                 = E_e[log p_t(z)] + D log alpha + D H(tau) + D log s = E_e[log p_t(z)] + D (H(tau) + log sigma),

    and one draw of e gives an unbiased estimate of that bound. Where p_t is the forward marginal of a point mass at
    x, N(alpha x, sigma^2 I), the bound is exact: -log2 Z(tau) bits/dim, the bin's mass.
    """
    log_sigma = -0.5 * math.log1p(math.exp(-gamma))
    constant = num_dims * (truncated_normal_entropy(bin_truncation(gamma)) + log_sigma)
    return (-log_density - constant) / (num_dims * math.log(2.0))
