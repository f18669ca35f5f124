"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): sampling steered
away from what a weaker model of the same data predicts.

The guide is the same network less trained (train.py keeps the EMA weights of an earlier step): it errs where the
model errs, only more, so extrapolating from the guide's prediction through the model's pushes each reverse step
further from both models' shared mistakes. Unlike classifier-free guidance it needs no labels and no
unconditional branch. It changes sampling only: the likelihood bound is the model's own, not the guided sampler's.
"""

from __future__ import annotations

import math

import torch


def check_guidance_scale(guidance_scale: object) -> None:
    """Raise ``ValueError`` (one line) unless ``guidance_scale`` is a finite real number (not a bool): w = 1 is the
    model alone, w > 1 guides away from the guide, 0 <= w < 1 interpolates toward it."""
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
    ):
        raise ValueError(f"guidance_scale must be a finite number (1: no guidance), got {guidance_scale!r}.")


def autoguided_output(
    model_output: torch.Tensor, guide_output: torch.Tensor, guidance_scale: float, channels: int
) -> torch.Tensor:
    r"""The autoguided network output: its first ``channels`` (the prediction: the noise, x_0 or v)

    D_w(x_t, t) = D_guide(x_t, t) + w (D(x_t, t) - D_guide(x_t, t)) = w D(x_t, t) + (1 - w) D_guide(x_t, t),

    and the rest of the model's own output unchanged (a learned variance's channels: the guide's variance is not
    used). At fixed x_t and t the noise, x_0 and v predictions are affine images of one another with the same
    coefficients for both networks, so guiding any of them moves x_0 and the reverse step's mean alike. w = 1 gives
    ``model_output`` itself.

    Args:
        model_output: the model's output (B, C or 2C, H, W).
        guide_output: the guide's output at the same (x_t, t), of the same shape.
        guidance_scale: w.
        channels: C, the prediction's channels.
    """
    if guide_output.shape != model_output.shape:
        raise ValueError(
            f"the guide's output has shape {tuple(guide_output.shape)}, the model's {tuple(model_output.shape)}: "
            "a guide must be the same network (layout and variance) as the model."
        )
    prediction = torch.lerp(guide_output[:, :channels], model_output[:, :channels], guidance_scale)
    return torch.cat([prediction, model_output[:, channels:]], dim=1)
