"""The one way to measure a model's likelihood bound on a set of images, the one type its result has, and the
pipeline protocol around it.

:func:`evaluate_bound` takes any hf_ddpm pipeline and a set of images and returns a :class:`BoundResult`: the
per-image bound in bits/dim and its terms, the estimator in words, and (for VAEs) the tighter importance-weighted
bound. The pipelines' ``elbo`` (:class:`BoundMixin`, one signature for every model kind), ``training/train.py``,
the ``hf_ddpm evaluate`` command and every benchmark call it. A pipeline takes part by implementing
``bound_terms(images, options, generator) -> BatchBound`` for one batch (its model's equations live in the model's
own modules); this module only batches, concatenates and summarises. A diffusion pipeline also splits its bound
along its time axis, ``bound_by_time(images, ...) -> BoundByTime`` (:func:`has_time_axis`), which
:func:`hf_ddpm.plots.plot_bound_by_time` draws.
With ``BoundOptions(estimator="ode")`` a diffusion pipeline gives its ``probability_flow()`` instead, and
:func:`probability_flow_terms` computes the ODE's NLL of the dequantized images (:mod:`hf_ddpm.probability_flow`).

Each per-image value is an unbiased estimate of that image's bound (exact when every term is computed), so the
standard error of the mean over N images, sd / sqrt(N), covers both the spread of the images and the randomness
of the estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from .distributions import nats_to_bits_per_dim
from .image_utils import ImageInput, images_to_tensor
from .probability_flow import (
    DIVERGENCE_METHODS,
    PROBE_KINDS,
    SOLVER_METHODS,
    ProbabilityFlow,
    bin_truncation,
    dequantized_bits_per_dim,
    ode_log_likelihood,
    truncated_normal_dequantize,
    truncated_normal_dequantized_bits_per_dim,
    uniform_dequantize,
)

#: What :func:`evaluate_bound` computes: ``bound`` (each model's variational bound) or ``ode`` (a diffusion model's
#: probability-flow ODE log-likelihood of dequantized images).
ESTIMATORS = ("bound", "ode")
#: How the ODE turns 8-bit images into points of a density (:func:`probability_flow_terms`).
DEQUANTIZATIONS = ("uniform", "truncated_normal")


@dataclass(frozen=True)
class BoundOptions:
    """How to compute a bound; each model kind reads the options that apply to it.

    Attributes:
        exact: diffusion models: every one of the T terms (T network evaluations per image) instead of the
            stratified estimate.
        timesteps_per_image: diffusion models: K stratified timesteps per image of the unbiased estimate (plus the
            exact reconstruction and prior terms: K + 1 network evaluations per image).
        elbo_samples: VAEs: Monte-Carlo samples of z per image for the ELBO.
        iwae_samples: VAEs: K of the importance-weighted bound reported beside the ELBO (0: none).
        clip_denoised: diffusion models: the model's data estimate clipped to [-1, 1] in the denoising-matching
            (DDPM, :func:`hf_ddpm.ddpm.elbo.variational_terms`) or diffusion (VDM,
            :func:`hf_ddpm.vdm.elbo.clipped_estimate_model`) terms, as the samplers clip it: the bound of
            the model as sampled, and never larger than the unclipped one, term by term.
    """

    exact: bool = False
    timesteps_per_image: int = 8
    elbo_samples: int = 1
    iwae_samples: int = 64
    clip_denoised: bool = True
    # the probability-flow ODE (estimator="ode"; diffusion models): see probability_flow_terms
    estimator: str = "bound"
    ode_divergence: str = "hutchinson"
    hutchinson_probes: int = 1
    hutchinson_probe: str = "rademacher"
    ode_method: str = "dopri5"
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    ode_steps: int = 100
    ode_t_min: float | None = None
    ode_dequantization: str = "uniform"


@dataclass
class BatchBound:
    """A pipeline's bound on one batch: per-image terms in bits/dim (they add up to the bound), the estimator in
    words, optionally the per-image importance-weighted bound, and for the ODE its function evaluations."""

    terms: dict[str, torch.Tensor]
    estimator: str
    iwae: torch.Tensor | None = None
    nfe: int | None = None


class SupportsBound(Protocol):
    """What :func:`evaluate_bound` needs of a pipeline."""

    def bound_terms(
        self, images: torch.Tensor, options: BoundOptions, generator: torch.Generator | None
    ) -> BatchBound: ...

    @property
    def image_channels(self) -> int: ...


def mean_and_standard_error(values: torch.Tensor) -> tuple[float, float]:
    """(mean, sd / sqrt(N)) of N values (float64); the standard error is NaN for a single value."""
    values = values.double()
    spread = values.std().item() if len(values) > 1 else float("nan")
    return values.mean().item(), spread / math.sqrt(len(values))


@dataclass
class BoundResult:
    """A negative log-likelihood bound on a set of images, in bits/dim, per image and summarised.

    Attributes:
        per_image_terms: term name -> (N,) float64 bits/dim; the terms add up to the bound of each image
            (diffusion: ``prior``, ``denoising``, ``reconstruction``; VAE: ``reconstruction``, ``kl``).
        estimator: how it was computed, in words (shown in the model card and the CLI).
        per_image_iwae: (N,) the importance-weighted bound of each image (VAEs), or None.
        per_image_nfe: (N,) the ODE's function evaluations for each image's batch (``estimator="ode"``), or None.
    """

    per_image_terms: dict[str, torch.Tensor]
    estimator: str
    per_image_iwae: torch.Tensor | None = field(default=None)
    per_image_nfe: torch.Tensor | None = field(default=None)

    @property
    def per_image(self) -> torch.Tensor:
        """(N,) the bound of each image, the sum of its terms."""
        return sum(self.per_image_terms.values())

    @property
    def num_images(self) -> int:
        return len(self.per_image)

    @property
    def bits_per_dim(self) -> float:
        """The mean bound over the images."""
        return mean_and_standard_error(self.per_image)[0]

    @property
    def standard_error(self) -> float:
        """Standard error of :attr:`bits_per_dim` as an estimate of the data set's mean bound."""
        return mean_and_standard_error(self.per_image)[1]

    @property
    def terms(self) -> dict[str, float]:
        """The mean of each term (they add up to :attr:`bits_per_dim`)."""
        return {name: mean_and_standard_error(values)[0] for name, values in self.per_image_terms.items()}

    @property
    def iwae_bits_per_dim(self) -> float | None:
        """The mean importance-weighted bound over the images (VAEs with ``BoundOptions.iwae_samples``), or None."""
        return None if self.per_image_iwae is None else mean_and_standard_error(self.per_image_iwae)[0]

    @property
    def iwae_standard_error(self) -> float | None:
        """Standard error of :attr:`iwae_bits_per_dim`, or None."""
        return None if self.per_image_iwae is None else mean_and_standard_error(self.per_image_iwae)[1]

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-able values: ``bits_per_dim``, ``standard_error``, ``terms``, ``estimator``,
        ``num_images`` and, for VAEs, ``iwae_bits_per_dim`` and ``iwae_standard_error``; for the ODE ``ode_nfe``,
        the mean function evaluations per batch."""
        summary = {
            "bits_per_dim": self.bits_per_dim,
            "standard_error": self.standard_error,
            "terms": self.terms,
            "estimator": self.estimator,
            "num_images": self.num_images,
        }
        if self.per_image_iwae is not None:
            summary["iwae_bits_per_dim"] = self.iwae_bits_per_dim
            summary["iwae_standard_error"] = self.iwae_standard_error
        if self.per_image_nfe is not None:
            summary["ode_nfe"] = mean_and_standard_error(self.per_image_nfe)[0]
        return summary


def evaluate_bound(
    pipeline: SupportsBound,
    images: ImageInput,
    options: BoundOptions = BoundOptions(),
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> BoundResult:
    """The bound of ``pipeline``'s model on ``images``, batch by batch.

    Args:
        pipeline: an hf_ddpm pipeline (:class:`~hf_ddpm.HFDDPMPipeline`, :class:`~hf_ddpm.VAEPipeline`, ...).
        images: a float tensor (N, C, H, W) in [-1, 1] on the 8-bit grid, uint8 arrays, or PIL images.
        options: which estimator (:class:`BoundOptions`).
        batch_size: images per batch.
        generator: for every random draw (noise, timesteps, latents); seed it for a reproducible estimate.
        progress: wraps the iterable of batches (e.g. ``tqdm``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    x = images_to_tensor(images, pipeline.image_channels)
    if len(x) == 0:
        raise ValueError("No images given: the bound of an empty set is undefined.")
    batches = x.split(batch_size)
    if options.estimator not in ESTIMATORS:
        raise ValueError(f"estimator={options.estimator!r} is not one of {', '.join(ESTIMATORS)}.")
    if options.estimator == "ode":
        flow = checked_probability_flow(pipeline, options)
        parts = [probability_flow_terms(flow, batch, options, generator) for batch in (progress or iter)(batches)]
    else:
        parts = [pipeline.bound_terms(batch, options, generator) for batch in (progress or iter)(batches)]
    names = parts[0].terms
    iwae = [part.iwae for part in parts]
    return BoundResult(
        per_image_terms={name: torch.cat([p.terms[name].double().cpu() for p in parts]) for name in names},
        estimator=parts[0].estimator,
        per_image_iwae=None if iwae[0] is None else torch.cat([v.double().cpu() for v in iwae]),
        per_image_nfe=None
        if parts[0].nfe is None
        else torch.cat([torch.full((len(b),), float(p.nfe), dtype=torch.float64) for p, b in zip(parts, batches)]),
    )


class BoundMixin:
    """The pipelines' ``elbo``: one signature and one result type for every model kind, a thin call of
    :func:`evaluate_bound` with the pipeline's own :attr:`default_bound_options`.

    A pipeline class using it sets ``default_bound_options`` and implements ``bound_terms`` and ``image_channels``
    (:class:`SupportsBound`); ``progress_bar`` comes from diffusers' ``DiffusionPipeline``.
    """

    #: The options of ``elbo`` when none are given: each pipeline's most precise bound of a few images.
    default_bound_options: ClassVar[BoundOptions]

    @torch.no_grad()
    def elbo(
        self,
        images: ImageInput,
        *,
        options: BoundOptions | None = None,
        batch_size: int = 64,
        generator: torch.Generator | None = None,
    ) -> BoundResult:
        r"""The negative ELBO of each image in bits/dim, with its terms: :func:`evaluate_bound` with ``options``
        (None: the pipeline's :attr:`default_bound_options`: for a diffusion model every term of its bound, T network
        evaluations per image; for a VAE one draw of z per image and no importance-weighted bound).

        Args:
            images: a float tensor (N, C, H, W) in [-1, 1] on the 8-bit grid, uint8 arrays, or PIL images.
            options: which estimator (:class:`BoundOptions`); e.g. ``BoundOptions(iwae_samples=64)`` adds a VAE's
                IWAE bound (:attr:`BoundResult.per_image_iwae`).
            batch_size: images per forward pass.
            generator: for every random draw (noise, timesteps, latents); seed it for a reproducible value.
        """
        chosen = self.default_bound_options if options is None else options
        return evaluate_bound(
            self, images, chosen, batch_size=batch_size, generator=generator, progress=self.progress_bar
        )


#: Images (of those given) a pipeline's ``bound_by_time`` splits the bound for, by default.
BOUND_BY_TIME_IMAGES = 16

#: Images per network call of a bound on a CUDA device (several timesteps or draws of a batch evaluated together:
#: :func:`draws_per_forward`); small enough for any GPU at MNIST size (a 28x28 UNet's activations: a few GB).
GPU_FORWARD_IMAGES = 4096


def draws_per_forward(device: torch.device, batch: int) -> int:
    """How many timesteps (or noise draws) of a batch of ``batch`` images a bound evaluates in one network call on
    ``device``: about :data:`GPU_FORWARD_IMAGES` images on a CUDA device, one elsewhere (a CPU gains nothing from
    wider calls). The draws are the same either way."""
    return max(1, GPU_FORWARD_IMAGES // batch) if device.type == "cuda" else 1


class BoundByTime(NamedTuple):
    """Where the bound goes along a diffusion's time axis, averaged over the images (it unpacks as
    ``x, bits_per_dim, label``): what a pipeline's ``bound_by_time`` returns and
    :func:`hf_ddpm.plots.plot_bound_by_time` draws.

    Attributes:
        x: the times, (K,): integer timesteps 0..T-1 of a DDPM's chain, or continuous t in (0, 1) of a VDM.
        bits_per_dim: float64 (K,): a DDPM's term at each timestep (bits/dim), or a VDM's diffusion-loss density
            (bits/dim per unit of t).
        label: the whole bound and the terms not on the time axis, in words.
    """

    x: torch.Tensor
    bits_per_dim: torch.Tensor
    label: str


def has_time_axis(pipeline: Any) -> bool:
    """Whether ``pipeline`` splits its bound in time (has ``bound_by_time``): a DDPM or a VDM, not a VAE."""
    return callable(getattr(pipeline, "bound_by_time", None))


def checked_probability_flow(pipeline: Any, options: BoundOptions) -> ProbabilityFlow:
    """``pipeline.probability_flow()``, after checking the ODE options, each error in one line before any work."""
    if not hasattr(pipeline, "probability_flow"):
        raise ValueError(
            f"estimator='ode' needs a diffusion pipeline (HFDDPMPipeline or VDMPipeline), got "
            f"{type(pipeline).__name__}: use estimator='bound'."
        )
    for name, value, choices in (
        ("ode_divergence", options.ode_divergence, DIVERGENCE_METHODS),
        ("hutchinson_probe", options.hutchinson_probe, PROBE_KINDS),
        ("ode_method", options.ode_method, SOLVER_METHODS),
        ("ode_dequantization", options.ode_dequantization, DEQUANTIZATIONS),
    ):
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}.")
    if options.hutchinson_probes < 1 or options.ode_steps < 1:
        raise ValueError(
            f"hutchinson_probes and ode_steps must be at least 1, got {options.hutchinson_probes} and "
            f"{options.ode_steps}."
        )
    if not (options.ode_rtol > 0 and options.ode_atol > 0):
        raise ValueError(f"ode_rtol and ode_atol must be positive, got {options.ode_rtol} and {options.ode_atol}.")
    flow = pipeline.probability_flow()
    t_min = options.ode_t_min
    if t_min is not None and not flow.earliest_time <= t_min < 1.0:
        raise ValueError(
            f"ode_t_min={t_min} is outside [{flow.earliest_time:g}, 1) where this model's ODE is defined "
            "(a DDPM's starts at 1/T, its first latent)."
        )
    return flow


def probability_flow_terms(
    flow: ProbabilityFlow, images: torch.Tensor, options: BoundOptions, generator: torch.Generator | None
) -> BatchBound:
    """The probability-flow ODE's negative log-likelihood of one batch of 8-bit images, per image in bits/dim, as
    terms that add up to it: ``dequantization`` + ``prior`` + ``flow`` with, for ``ode_dequantization="uniform"``,

        y = x + u, u ~ U(bin of x), one draw per image    (:func:`~hf_ddpm.probability_flow.uniform_dequantize`),
        -log P(x) <= E_u[-log p(y)] - D log(2/255)        (:func:`~hf_ddpm.probability_flow.dequantized_bits_per_dim`),
        -log p(y) = -log N(y_1; 0, I) - int_{t_min}^1 div drift dt
                                                          (:func:`~hf_ddpm.probability_flow.ode_log_likelihood`),

        dequantization = log2(255/2) = 6.9944 bits/dim, prior = -log N(y_1; 0, I) / (D ln 2),
        flow = -(the mean over the K probes of the divergence integral) / (D ln 2);

    for ``"truncated_normal"``, y = alpha x + sigma e with the noise of gamma(t_min) cut to x's bin
    (:func:`~hf_ddpm.probability_flow.truncated_normal_dequantize`) and dequantization = -(H(tau) + log sigma) / ln 2
    (:func:`~hf_ddpm.probability_flow.truncated_normal_dequantized_bits_per_dim`): the data as the model saw them at
    t_min in training, noisy around the grid, where the uniform draw lands between the modes of a density that
    learned them.

    Each image's value is an unbiased estimate (one u, K probes; exact in the probes with the exact trace) of an upper
    bound on the discrete NLL of the model "y_1 ~ N(0, I), the ODE back to t_min, y rounded to its bin", to the
    solver's tolerance; the standard error over images covers u and the probes. Solved in float64 (float32 on MPS).
    """
    dtype = torch.float32 if flow.device.type == "mps" else torch.float64
    x = images.to(device=flow.device, dtype=dtype)
    t_min = flow.earliest_time if options.ode_t_min is None else options.ode_t_min
    num_dims = x[0].numel()
    zeros = torch.zeros(len(x), dtype=dtype, device=x.device)
    if options.ode_dequantization == "truncated_normal":
        gamma_min = float(flow.gamma(torch.tensor([t_min], dtype=torch.float64, device=flow.device)).item())
        y = truncated_normal_dequantize(x, gamma_min, generator)
        dequantization = truncated_normal_dequantized_bits_per_dim(zeros, gamma_min, num_dims)
        dequantized = (
            f"truncated-normal dequantized (noise of gamma(t_min) = {gamma_min:.3f} cut to the bin, "
            f"tau = {bin_truncation(gamma_min):.3f})"
        )
    else:
        y = uniform_dequantize(x, generator)
        dequantization, dequantized = dequantized_bits_per_dim(zeros, num_dims), "uniformly dequantized"
    out = ode_log_likelihood(
        y,
        flow.eps_model,
        flow.gamma,
        flow.gamma_rate,
        t_min=t_min,
        divergence=options.ode_divergence,
        probes=options.hutchinson_probes,
        probe_kind=options.hutchinson_probe,
        method=options.ode_method,
        rtol=options.ode_rtol,
        atol=options.ode_atol,
        num_steps=options.ode_steps,
        generator=generator,
    )
    terms = {
        "dequantization": dequantization,
        "prior": nats_to_bits_per_dim(-out.prior_log_density, num_dims),
        "flow": nats_to_bits_per_dim(-out.divergence_integral.mean(dim=1), num_dims),
    }
    if options.ode_divergence == "exact":
        divergence = "exact divergence"
    else:
        k = options.hutchinson_probes
        divergence = f"Hutchinson-Skilling divergence, {k} {options.hutchinson_probe} probe{'s' if k > 1 else ''}"
    if options.ode_method == "dopri5":
        solver = f"adaptive Dormand-Prince, rtol={options.ode_rtol:g}, atol={options.ode_atol:g}"
    else:
        solver = f"{options.ode_steps} fixed Dormand-Prince steps"
    estimator = (
        f"probability-flow ODE log-likelihood of {dequantized} 8-bit data (t_min={t_min:g}, N(0, I) prior, "
        f"{divergence}, {solver}): an unbiased estimate of an upper bound on the discrete NLL of the ODE's model "
        "(unclipped)"
    )
    return BatchBound(terms=terms, estimator=estimator, nfe=out.nfe)
