"""Where a diffusion model's bound goes, and how its training went, as data and as images.

:func:`bound_by_time` splits the negative ELBO of a few images along the diffusion's time axis:

* ``HFDDPMPipeline``: the T terms of the full training chain (:func:`hf_ddpm.ddpm.elbo.full_elbo`), one per timestep,
  in bits/dim; t = 0 is the reconstruction term -log p(x_0 | x_1), t >= 1 the denoising KLs (by default with the
  x_0 estimate clipped to [-1, 1], as ``BoundOptions`` computes them). With the prior term they add up to the whole
  bound.
* ``VDMPipeline``: the integrand of the continuous-time diffusion loss,
  ``1/2 gamma'(t) E||eps - eps_hat(z_t, t)||^2 / (D ln 2)``, bits/dim per unit of t (by default eps_hat of the
  data estimate clipped to [-1, 1], as ``BoundOptions`` computes it), on a grid of t: its integral
  over [0, 1] is the diffusion term L_inf; the prior and reconstruction terms have no time and are in the label.

:func:`plot_bound_by_time` and :func:`plot_loss_curve` draw them (matplotlib, the ``train`` extra) as PIL images:
``train.py`` writes them as ``bound_by_time.png`` and ``loss_curve.png`` and the model card shows them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor

from .ddpm.elbo import full_elbo, prior_term
from .distributions import nats_to_bits_per_dim
from .image_utils import ImageInput, check_image_size, images_to_tensor
from .pipelines.ddpm import HFDDPMPipeline
from .pipelines.vdm import VDMPipeline, vdm_epsilon
from .vdm.elbo import clipped_estimate_model, continuous_diffusion_loss, prior_loss, reconstruction_loss

#: Where train.py writes the plots, next to ``samples.png`` (and where the card links them).
LOSS_CURVE_PATH = "loss_curve.png"
BOUND_BY_TIME_PATH = "bound_by_time.png"
#: Images (of those given) the bound is split for, by default.
BOUND_BY_TIME_IMAGES = 16
#: The VDM's grid of t: midpoints (i + 1/2) / n, i = 0..n-1, with a few noise draws per image at each.
BOUND_BY_TIME_VDM_TIMES = 200
BOUND_BY_TIME_VDM_DRAWS = 4
PLOTS_EXTRA_MESSAGE = "Plots need matplotlib: pip install 'hf_ddpm[train]'"


class BoundByTime(NamedTuple):
    """The bound along the time axis, averaged over the images (it unpacks as ``x, bits_per_dim, label``).

    Attributes:
        x: the times, (K,): integer timesteps 0..T-1 of a DDPM's chain, or continuous t in (0, 1) of a VDM.
        bits_per_dim: float64 (K,): a DDPM's term at each timestep (bits/dim), or a VDM's diffusion-loss density
            (bits/dim per unit of t).
        label: the whole bound and the terms not on the time axis, in words.
    """

    x: torch.Tensor
    bits_per_dim: torch.Tensor
    label: str


def _images(pipeline: Any, images: ImageInput, num_images: int | None) -> torch.Tensor:
    x = images_to_tensor(images, pipeline.image_channels)
    if num_images is not None:
        x = x[:num_images]
    check_image_size(x, pipeline.unet.config.sample_size)
    return x.to(device=pipeline._execution_device, dtype=torch.float64)


@torch.no_grad()
def _ddpm_bound_by_time(
    pipeline: HFDDPMPipeline, x: torch.Tensor, generator: torch.Generator | None, clip_denoised: bool
) -> BoundByTime:
    chain = pipeline.train_chain
    unet = pipeline.unet

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x_t.to(unet.dtype), t).sample

    out = full_elbo(chain, model_fn, x, generator=generator, keep_per_timestep=True, clip_denoised=clip_denoised)
    terms = out.per_timestep.mean(dim=0).cpu()
    prior = nats_to_bits_per_dim(prior_term(chain, x), x[0].numel()).mean().item()
    label = (
        f"negative ELBO {out.bits_per_dim.mean().item():.4f} bits/dim = sum of the {len(terms)} terms shown "
        f"(t = 0: reconstruction {terms[0].item():.4f}) + prior {prior:.2e}; mean of {x.shape[0]} images"
    )
    return BoundByTime(torch.as_tensor(chain.timesteps, dtype=torch.long), terms, label)


@torch.no_grad()
def _vdm_bound_by_time(
    pipeline: VDMPipeline,
    x: torch.Tensor,
    generator: torch.Generator | None,
    num_times: int,
    draws: int,
    clip_denoised: bool,
) -> BoundByTime:
    schedule, unet = pipeline.noise_schedule, pipeline.unet

    def network_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return vdm_epsilon(unet, z_t, t)

    model_fn = clipped_estimate_model(schedule, network_fn) if clip_denoised else network_fn
    num_dims = x[0].numel()
    repeated = x.repeat(draws, *([1] * (x.dim() - 1)))  # (draws * N, ...): every image ``draws`` times
    times = (torch.arange(num_times, dtype=torch.float64) + 0.5) / num_times
    density = torch.zeros(num_times, dtype=torch.float64)
    for i, t in enumerate(times.tolist()):
        noise = randn_tensor(repeated.shape, generator=generator, device=x.device, dtype=x.dtype)
        t_batch = torch.full((repeated.shape[0],), t, dtype=x.dtype, device=x.device)
        nats = continuous_diffusion_loss(schedule, model_fn, repeated, t_batch, noise)
        density[i] = nats_to_bits_per_dim(nats, num_dims).mean().cpu()
    reconstruction_noise = randn_tensor(repeated.shape, generator=generator, device=x.device, dtype=x.dtype)
    reconstruction = nats_to_bits_per_dim(reconstruction_loss(schedule, repeated, reconstruction_noise), num_dims)
    prior = nats_to_bits_per_dim(prior_loss(schedule, x), num_dims).mean().item()
    diffusion = density.mean().item()  # the midpoint rule on [0, 1]
    label = (
        f"negative ELBO {prior + diffusion + reconstruction.mean().item():.4f} bits/dim = diffusion "
        f"{diffusion:.4f} (area under the curve) + reconstruction {reconstruction.mean().item():.4f} "
        f"+ prior {prior:.2e}; mean of {x.shape[0]} images"
    )
    return BoundByTime(times, density, label)


def has_time_axis(pipeline: Any) -> bool:
    """Whether :func:`bound_by_time` splits ``pipeline``'s bound in time: a DDPM or a VDM (not the VAE)."""
    return isinstance(pipeline, (HFDDPMPipeline, VDMPipeline))


def bound_by_time(
    pipeline: Any,
    images: ImageInput,
    generator: torch.Generator | None = None,
    *,
    num_images: int | None = BOUND_BY_TIME_IMAGES,
    num_times: int = BOUND_BY_TIME_VDM_TIMES,
    draws_per_time: int = BOUND_BY_TIME_VDM_DRAWS,
    clip_denoised: bool = True,
) -> BoundByTime:
    """Where the negative ELBO of ``images`` goes along the diffusion's time axis, averaged over the first
    ``num_images`` of them (None: all), float64 under no_grad. See the module docstring for what each pipeline gives.

    Args:
        pipeline: an ``HFDDPMPipeline`` (T network evaluations per image: every term of the full chain) or a
            ``VDMPipeline`` (``num_times * draws_per_time`` evaluations per image).
        images: (N, C, H, W) in [-1, 1] on the 8-bit grid, uint8 arrays, or PIL images.
        generator: for the noise draws.
        num_times: a VDM's grid of t, the midpoints (i + 1/2) / num_times.
        draws_per_time: a VDM's noise draws per image at each t.
        clip_denoised: the model's data estimate clipped to [-1, 1], as ``BoundOptions`` (default) and the
            samplers clip it.

    Returns:
        :class:`BoundByTime`, which unpacks as ``(x, bits_per_dim, label)``.
    """
    if isinstance(pipeline, HFDDPMPipeline):
        return _ddpm_bound_by_time(pipeline, _images(pipeline, images, num_images), generator, clip_denoised)
    if isinstance(pipeline, VDMPipeline):
        if num_times < 1 or draws_per_time < 1:
            raise ValueError(f"num_times={num_times} and draws_per_time={draws_per_time} must be at least 1.")
        x = _images(pipeline, images, num_images)
        return _vdm_bound_by_time(pipeline, x, generator, num_times, draws_per_time, clip_denoised)
    raise TypeError(
        f"{type(pipeline).__name__} has no time axis: bound_by_time takes an HFDDPMPipeline or a VDMPipeline."
    )


# ------------------------------------------------------------------------------------------------------ drawing
def _figure() -> Any:
    """A matplotlib Figure drawn by the Agg canvas (no pyplot, no global backend change)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(PLOTS_EXTRA_MESSAGE) from None
    figure = Figure(figsize=(7.0, 4.2), dpi=100, layout="constrained")
    return figure, figure.subplots()


def _to_image(figure: Any) -> PIL.Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    with PIL.Image.open(buffer) as image:
        return image.convert("RGB")


def plot_bound_by_time(
    x: torch.Tensor | Sequence[float], bits_per_dim: torch.Tensor | Sequence[float], label: str = "", title: str = ""
) -> PIL.Image.Image:
    """Draw :func:`bound_by_time`'s output (``plot_bound_by_time(*bound_by_time(pipeline, images))``) as an image.

    Integer ``x`` (a DDPM's timesteps) gives bits/dim per timestep on a log-scale time axis (symlog, so t = 0, the
    reconstruction term, is shown) and a log-scale bits axis; float ``x`` (a VDM's t) the density in bits/dim per
    unit of t, on a log-scale density axis when positive.
    """
    xs = torch.as_tensor(x)
    ys = torch.as_tensor(bits_per_dim, dtype=torch.float64)
    discrete = not torch.is_floating_point(xs)
    figure, axes = _figure()
    xv, yv = xs.tolist(), ys.tolist()
    if discrete:
        axes.plot(xv, yv, marker="." if len(xv) <= 100 else None, linewidth=1.2)
        axes.set_xscale("symlog", linthresh=1.0)
        axes.set_xlim(left=0)
        axes.set_xlabel("timestep t (t = 0: reconstruction term; symlog scale)")
        axes.set_ylabel("term of the negative ELBO (bits/dim)")
    else:
        axes.plot(xv, yv, linewidth=1.2)
        axes.fill_between(xv, yv, alpha=0.2)
        axes.set_xlim(0.0, 1.0)
        axes.set_xlabel("time t")
        axes.set_ylabel("diffusion-loss density (bits/dim per unit t)")
    if yv and min(yv) > 0 and max(yv) > 10 * min(yv):
        axes.set_yscale("log")
    axes.grid(True, which="both", alpha=0.3)
    figure.suptitle(title or "Where the bits of the bound go")
    if label:
        axes.set_title(_wrapped(label), fontsize=8)
    return _to_image(figure)


def _wrapped(text: str, width: int = 90) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curve(
    history: list[dict[str, Any]], keys: Sequence[str] = ("loss",), title: str = ""
) -> PIL.Image.Image:
    """The training curve of ``history`` (``train_log.jsonl``'s rows: ``{"step": ..., "loss": ..., ...}``) as an
    image: each of ``keys`` against the optimizer step (rows without it, or with a non-finite value, skipped), with
    a running mean over 1/50 of the run when it has more than 50 points; log-scale values when all are positive and
    span more than a factor of 10. Raises ``ValueError`` when no row has any of ``keys``."""
    figure, axes = _figure()
    drawn = []
    for key in keys:
        points = [
            (row["step"], float(row[key]))
            for row in history
            if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]) and "step" in row
        ]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        drawn.extend(values)
        if len(values) > 50:
            line = axes.plot(steps, values, linewidth=0.6, alpha=0.35)[0]
            smoothed = _running_mean(list(values), max(2, len(values) // 50))
            axes.plot(steps, smoothed, linewidth=1.5, color=line.get_color(), label=f"{key} (running mean)")
        else:
            axes.plot(steps, values, linewidth=1.2, marker=".", label=key)
    if not drawn:
        raise ValueError(f"No row of the history has a finite value of {', '.join(keys)}.")
    if min(drawn) > 0 and max(drawn) > 10 * min(drawn):
        axes.set_yscale("log")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(", ".join(keys) + " (training objective, per image)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    axes.set_title(title or "Training loss")
    return _to_image(figure)
