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
    """p(t) = 1 / T for t = 0..T-1; every weight is 1.

    Draws on the device the batch is on, from p(t) kept there: a training step copies nothing from the host and
    reads nothing back (on a GPU each such copy or read waits for the work queued before it)."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps
        self._probabilities_on: dict[str, torch.Tensor] = {}  # device -> p(t) there (a fixed p: copied once)

    def probabilities(self) -> np.ndarray:
        """p(t), float64 of shape (T,)."""
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps)

    def probability_tensor(self, device: torch.device | str) -> torch.Tensor:
        """p(t) as a tensor on ``device``: float64 (float32 on MPS, which has none)."""
        device = torch.device(device)
        if str(device) not in self._probabilities_on:
            p = torch.from_numpy(self.probabilities())
            self._probabilities_on[str(device)] = p.to(device, torch.float32 if device.type == "mps" else None)
        return self._probabilities_on[str(device)]

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (timesteps (B,) long, weights w_t = 1 / (T p(t)) (B,) float32) on ``device`` (``generator``, if
        given, is one of that device)."""
        p = self.probability_tensor(device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t, weights.float()

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the losses seen at ``timesteps`` (nothing to record for uniform sampling)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LossSecondMomentSampler(UniformTimestepSampler):
    """p(t) proportional to sqrt(mean of the last ``history`` squared losses at t), mixed with ``uniform_prob`` of
    uniform; uniform until every t has a full history (improved-diffusion's LossSecondMomentResampler).

    The history (``losses`` (T, history) float64, oldest first, and ``counts`` (T,)) lives on the device of the
    timesteps it is given and is updated there in a few batched operations, so neither :meth:`update` nor
    :meth:`sample` waits for the device. In multi-process training pass the losses of all processes
    (``accelerator.gather``) to :meth:`update` so every process keeps the same history and draws from the same p(t).
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64)

    def warmed_up(self) -> bool:
        """True once every timestep has ``history`` recorded losses (reads the device)."""
        return bool((self.counts == self.history).all())

    def probabilities(self) -> np.ndarray:
        return self.probability_tensor(self.losses.device).double().cpu().numpy()

    def probability_tensor(self, device: torch.device | str) -> torch.Tensor:
        """p(t) on ``device`` from the history, computed there: uniform until every t is warm (chosen on the device,
        not read back)."""
        self._move_history(device)
        weights = self.losses.pow(2).mean(dim=-1).sqrt()
        weights = weights / weights.sum()
        importance = weights * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        uniform = torch.full_like(importance, 1.0 / self.num_timesteps)
        p = torch.where((self.counts == self.history).all(), importance, uniform)
        return p.float() if p.device.type == "mps" else p

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each image's loss to its timestep's history in batch order, keeping the last ``history``: the
        same history as appending them one by one, computed without a loop or a read of the device."""
        self._move_history(timesteps.device)
        t = timesteps.detach().long().reshape(-1)
        new = losses.detach().reshape(-1).to(self.losses)
        T, H, B = self.num_timesteps, self.history, t.numel()
        order = torch.sort(t, stable=True).indices  # each timestep's losses together, in batch order
        t_sorted = t[order]
        first = torch.searchsorted(t_sorted, t_sorted)  # where each timestep's run starts
        rank = torch.arange(B, device=t.device) - first  # the loss's place among its timestep's new ones
        arrivals = torch.zeros(T, B, dtype=self.losses.dtype, device=t.device)
        arrivals[t_sorted, rank] = new[order]
        had = self.counts
        total = had.index_add(0, t, torch.ones_like(t))  # old and new losses per timestep (bincount would read back)
        kept = total.clamp(max=H)
        # slot j of the new history holds loss number m = total - kept + j of the old-then-new sequence
        m = (total - kept).unsqueeze(1) + torch.arange(H, device=t.device)
        old = self.losses.gather(1, m.clamp(max=H - 1))
        fresh = arrivals.gather(1, (m - had.unsqueeze(1)).clamp(0, B - 1))
        history = torch.where(m < had.unsqueeze(1), old, fresh)
        self.losses = torch.where(torch.arange(H, device=t.device) < kept.unsqueeze(1), history, 0.0)
        self.counts = kept

    def _move_history(self, device: torch.device | str) -> None:
        device = torch.device(device)
        if self.losses.device != device:
            float_type = torch.float32 if device.type == "mps" else torch.float64
            self.losses, self.counts = self.losses.to(device, float_type), self.counts.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.double().cpu().clone(), "counts": self.counts.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.losses.device
        self.losses, self.counts = state["losses"].double().clone(), state["counts"].long().clone()
        self._move_history(device)


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
