"""Where a diffusion model's bound goes, and how its training went, as images (matplotlib, the ``train`` extra).

:func:`plot_bound_by_time` draws what a diffusion pipeline's ``bound_by_time`` returns
(:class:`hf_ddpm.evaluation.BoundByTime`: :meth:`hf_ddpm.HFDDPMPipeline.bound_by_time`, the T terms of the
exact bound, one per timestep; :meth:`hf_ddpm.VDMPipeline.bound_by_time`, the density of the continuous-time
diffusion loss on a grid of t), and :func:`plot_loss_curve` the training loss; both return PIL images.
``train.py`` writes them as ``bound_by_time.png`` and ``loss_curve.png`` and the model card shows them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch

#: Where train.py writes the plots, next to ``samples.png`` (and where the card links them).
LOSS_CURVE_PATH = "loss_curve.png"
BOUND_BY_TIME_PATH = "bound_by_time.png"
PLOTS_EXTRA_MESSAGE = "Plots need matplotlib: pip install 'hf_ddpm[train]'"


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
    """Draw a pipeline's ``bound_by_time`` (``plot_bound_by_time(*pipeline.bound_by_time(images))``) as an image.

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
