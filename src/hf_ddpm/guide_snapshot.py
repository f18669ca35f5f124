"""The autoguidance guide of a training run: the EMA weights of one earlier step of the same run.

Autoguidance (:mod:`hf_ddpm.ddpm.guidance`) steers sampling away from a weaker version of the model. A training run
has one for free: its own EMA at an earlier step, the same network with less training. :class:`GuideSnapshot` keeps
a copy of those weights at the step :func:`guide_step` names (a quarter of the run's steps by default: the earliest
guide measured, 12.5% to 75%, guided best but one), is checkpointed with the run (a resumed run gets the same guide),
and turns the final pipeline into an autoguided one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import DiffusionPipeline

from .training_budget import decay_start_step


def guide_step(total_steps: int, guide_fraction: float) -> int:
    """The optimizer step S of a run of N = ``total_steps`` steps whose EMA weights become the guide:

        S = max(1, N - ceil((1 - F) N)),   F = ``guide_fraction`` in (0, 1]

    (:func:`~hf_ddpm.training_budget.decay_start_step` with decay fraction 1 - F: about F N, at least 1)."""
    check_guide_fraction(guide_fraction)
    return max(1, decay_start_step(total_steps, 1 - guide_fraction))


def check_guide_fraction(guide_fraction: float) -> None:
    """Raise ``ValueError`` (one line) unless ``guide_fraction`` is in (0, 1]."""
    if not 0 < guide_fraction <= 1:
        raise ValueError(f"guide_fraction must be in (0, 1], got {guide_fraction}.")


class GuideSnapshot:
    """The weights of the network at the guide's step (taken by :meth:`take`, on the CPU), checkpointed with the
    run through ``state_dict``/``load_state_dict`` (``accelerator.register_for_checkpointing``).

    Args:
        guide_fraction: F of :func:`guide_step`.
        fixed_step: the guide's step itself instead (train.py's ``--guide_step``, which repeats a run's guide).
    """

    def __init__(self, guide_fraction: float, fixed_step: int | None = None):
        check_guide_fraction(guide_fraction)
        self.guide_fraction, self.fixed_step = guide_fraction, fixed_step
        self.step: int | None = None  # the step the weights are of, once taken
        self.weights: dict[str, torch.Tensor] | None = None

    def due(self, step: int, total_steps: int) -> bool:
        """True where the weights are not taken yet and optimizer step ``step`` has reached the guide's step of a
        run of ``total_steps`` steps, which may still be an estimate (a ``--train_minutes`` run re-estimates its
        steps until its decay starts): the guide is then the EMA of the first step at or past F times the steps
        planned at that moment."""
        if self.weights is not None:  # taken: nothing to compute on the steps after it
            return False
        target = self.fixed_step if self.fixed_step is not None else guide_step(total_steps, self.guide_fraction)
        return step >= target

    def take(self, network: torch.nn.Module, step: int) -> None:
        """Keep a CPU copy of ``network``'s weights (call it inside ``ema_weights`` for the EMA's) as of ``step``."""
        self.weights = {name: value.detach().to("cpu", copy=True) for name, value in network.state_dict().items()}
        self.step = step

    def network(self, like: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``like`` holding the guide's weights, in eval mode, on ``like``'s device."""
        if self.weights is None:
            raise RuntimeError("the guide's weights were not taken: the run never reached its guide step.")
        guide = copy.deepcopy(like)
        guide.load_state_dict(self.weights)
        return guide.eval()

    def guided_pipeline(self, pipeline: DiffusionPipeline, guidance_scale: float) -> DiffusionPipeline:
        """``pipeline`` (an :class:`~hf_ddpm.HFDDPMPipeline`) with this guide as its ``guide_unet`` and
        ``guidance_scale`` as the w it samples with by default."""
        components = {**pipeline.components, "guide_unet": self.network(pipeline.unet)}
        return type(pipeline)(**components, guidance_scale=guidance_scale)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.weights = state["step"], state["weights"]
