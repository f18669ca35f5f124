"""Which timesteps a training batch sees: uniform, or importance sampling by each term's loss (improved-diffusion).

The bound is a sum over t of terms whose sizes differ by orders of magnitude, so a uniform draw of t gives a noisy
estimate of it. Drawing t with p(t) proportional to sqrt(E[L_t^2]) and weighting by w_t = 1 / (T p(t)) keeps the
estimate unbiased and lowers its variance (Nichol & Dhariwal, 2021, section 3.3).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment", "decoder-oversampled")
#: The reconstruction term's share of DecoderOversampler's draws where --decoder_share is not given.
DEFAULT_DECODER_SHARE = 1 / 32


class UniformTimestepSampler:
    """p(t) = 1 / T for t = 0..T-1; every weight is 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def probabilities(self) -> np.ndarray:
        """p(t), float64 of shape (T,)."""
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps)

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (timesteps (B,) long, weights w_t = 1 / (T p(t)) (B,) float32) on ``device``."""
        p = torch.from_numpy(self.probabilities())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the losses seen at ``timesteps`` (nothing to record for uniform sampling)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LossSecondMomentSampler(UniformTimestepSampler):
    """p(t) proportional to sqrt(mean of the last ``history`` squared losses at t), mixed with ``uniform_prob`` of
    uniform; uniform until every t has a full history (improved-diffusion's LossSecondMomentResampler).

    In multi-process training pass the losses of all processes (``accelerator.gather``) to :meth:`update` so every
    process keeps the same history and draws from the same p(t).
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.losses = np.zeros((num_timesteps, history), dtype=np.float64)
        self.counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        """True once every timestep has ``history`` recorded losses."""
        return bool((self.counts == self.history).all())

    def probabilities(self) -> np.ndarray:
        if not self.warmed_up():
            return super().probabilities()
        weights = np.sqrt(np.mean(self.losses**2, axis=-1))
        weights /= weights.sum()
        return weights * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        for t, loss in zip(timesteps.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[t] == self.history:
                self.losses[t, :-1] = self.losses[t, 1:]
                self.losses[t, -1] = loss
            else:
                self.losses[t, self.counts[t]] = loss
                self.counts[t] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"losses": torch.from_numpy(self.losses.copy()), "counts": torch.from_numpy(self.counts.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = state["losses"].numpy().copy()
        self.counts = state["counts"].numpy().copy()


class DecoderOversampler(UniformTimestepSampler):
    """p(0) = share + (1 - share) / T, p(t) = (1 - share) / T for t > 0: the reconstruction term L_0 (the decoder,
    timestep 0) drawn ``share`` of the time on top of uniform, every loss weighted by w_t = 1 / (T p(t)), so each
    is still an unbiased estimate of its expectation under uniform t. A uniform draw reaches L_0 once in T images."""

    def __init__(self, num_timesteps: int, share: float = DEFAULT_DECODER_SHARE):
        super().__init__(num_timesteps)
        if not 0 <= share < 1:
            raise ValueError(f"share must be in [0, 1), got {share}")
        self.share = share

    def probabilities(self) -> np.ndarray:
        p = np.full(self.num_timesteps, (1 - self.share) / self.num_timesteps)
        p[0] += self.share
        return p


def resolve_timestep_sampler(name: str, loss_type: str = "hybrid") -> str:
    """``auto`` -> importance sampling by the loss's second moment for the ``vlb`` loss (improved-diffusion's choice
    for it), the decoder oversampled for ``hybrid_decoder`` (whose decoder term trains the mean), uniform for the
    others; any other name as it is."""
    if name != "auto":
        return name
    return {"vlb": "loss-second-moment", "hybrid_decoder": "decoder-oversampled"}.get(loss_type, "uniform")


def make_timestep_sampler(
    name: str, num_timesteps: int, loss_type: str = "hybrid", decoder_share: float = DEFAULT_DECODER_SHARE
) -> UniformTimestepSampler:
    """The sampler called ``name`` (one of :data:`TIMESTEP_SAMPLERS`, or ``auto``: :func:`resolve_timestep_sampler`);
    ``decoder_share`` is the decoder-oversampled sampler's share of draws at timestep 0."""
    name = resolve_timestep_sampler(name, loss_type)
    if name == "uniform":
        return UniformTimestepSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentSampler(num_timesteps)
    if name == "decoder-oversampled":
        return DecoderOversampler(num_timesteps, decoder_share)
    raise ValueError(f"Unknown timestep sampler {name!r}: choose one of {', '.join(TIMESTEP_SAMPLERS)}.")
