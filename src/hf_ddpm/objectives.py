"""What ``training/train.py`` needs from a model kind: its loss, its pipeline, and how to measure its bound.

The training loop knows nothing of diffusion or VAEs. It calls, for every batch, ``objective.loss(model, images)``
(an :class:`ObjectiveOutput`: the per-image loss, numbers to log, and feedback for the objective), gathers the
feedback over processes and hands it back with ``objective.observe``; it wraps the model being trained with
``objective.pipeline(model)`` to sample and to evaluate (:func:`hf_ddpm.evaluation.evaluate_bound` with
``objective.bound_options``). A new model kind plugs in by implementing :class:`Objective`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers import DiffusionPipeline

from .ddpm.elbo import training_loss
from .ddpm.scheduler import HFDDPMScheduler
from .ddpm.timestep_sampling import UniformTimestepSampler
from .evaluation import BoundOptions
from .pipelines.ddpm import HFDDPMPipeline
from .pipelines.vae import VAEPipeline
from .pipelines.vdm import VDMModel, VDMPipeline
from .vdm.scheduler import VDMContinuousScheduler


@dataclass
class ObjectiveOutput:
    """One batch's training loss.

    Attributes:
        loss: (B,) per-image loss; the step minimises its mean.
        logs: numbers to log for this step (averaged over the batch).
        feedback: tensors the objective needs back from every process (``accelerator.gather``), e.g. the timesteps
            and losses an importance sampler learns from.
    """

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    feedback: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    """The interface between a model kind and the training loop."""

    bound_options: BoundOptions
    sampling_kwargs: dict[str, Any]

    def loss(self, model: torch.nn.Module, images: torch.Tensor) -> ObjectiveOutput: ...

    def observe(self, feedback: dict[str, torch.Tensor]) -> None: ...

    def pipeline(self, model: torch.nn.Module) -> DiffusionPipeline: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def loss_by_quartile(timesteps: torch.Tensor, losses: torch.Tensor, num_timesteps: int) -> dict[str, float]:
    """Mean loss of the batch's images in each quarter of the timesteps (q0 = least noise), as improved-diffusion
    logs it; quarters with no image are left out."""
    quartile = timesteps.detach().cpu() * 4 // num_timesteps
    values = losses.detach().float().cpu()
    return {f"loss_q{q}": values[quartile == q].mean().item() for q in range(4) if (quartile == q).any()}


class DiffusionObjective:
    """The variational diffusion model: the simple / vlb / hybrid loss at timesteps drawn by ``timestep_sampler``,
    on the scheduler's frozen training chain; the pipeline is an :class:`~hf_ddpm.HFDDPMPipeline`.

    Args:
        scheduler: the model's scheduler. Training reads only its frozen ``train_chain``, so the pipeline can sample
            with (and respace) the same scheduler.
        loss_type: ``simple``, ``vlb`` or ``hybrid`` (:func:`hf_ddpm.ddpm.elbo.training_loss`).
        timestep_sampler: draws each image's timestep and its importance weight.
        snr_gamma: Min-SNR-gamma weighting of the squared error, or None.
        bound_options: how the bound is evaluated during and after training.
        sample_steps: respaced sampling steps of the pipeline's sample grids.
    """

    def __init__(
        self,
        scheduler: HFDDPMScheduler,
        loss_type: str,
        timestep_sampler: UniformTimestepSampler,
        snr_gamma: float | None = None,
        bound_options: BoundOptions = BoundOptions(),
        sample_steps: int = 100,
    ):
        self.scheduler = scheduler
        self.chain = scheduler.train_chain
        self.loss_type = loss_type
        self.timestep_sampler = timestep_sampler
        self.snr_gamma = snr_gamma
        self.bound_options = bound_options
        self.sampling_kwargs = {"num_inference_steps": sample_steps}

    def loss(self, model: torch.nn.Module, images: torch.Tensor) -> ObjectiveOutput:
        """The loss of a batch at freshly drawn timesteps; logs its per-quartile means, the MSE and the bound's
        one-timestep estimate (where the loss type computes them)."""
        timesteps, weights = self.timestep_sampler.sample(images.shape[0], images.device)
        out = training_loss(
            self.loss_type,
            self.chain,
            lambda x, t: model(x, t).sample,
            images,
            timesteps,
            timestep_weights=weights,
            snr_gamma=self.snr_gamma,
        )
        logs = loss_by_quartile(timesteps, out.per_timestep_loss, self.chain.num_train_timesteps)
        if out.vlb_bits_per_dim is not None:
            logs["vlb_bits_per_dim"] = out.vlb_bits_per_dim.mean().item()
        if out.mse is not None:
            logs["mse"] = out.mse.mean().item()
        feedback = {"timesteps": timesteps, "losses": out.per_timestep_loss.detach()}
        return ObjectiveOutput(loss=out.loss, logs=logs, feedback=feedback)

    def observe(self, feedback: dict[str, torch.Tensor]) -> None:
        """Record every process's timesteps and losses in the timestep sampler."""
        self.timestep_sampler.update(feedback["timesteps"], feedback["losses"])

    def pipeline(self, model: torch.nn.Module) -> HFDDPMPipeline:
        """The pipeline around the network being trained (not a copy: it sees the current weights)."""
        return HFDDPMPipeline(unet=model, scheduler=self.scheduler)

    def state_dict(self) -> dict[str, Any]:
        """The timestep sampler's state (checkpointed with the run)."""
        return self.timestep_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.timestep_sampler.load_state_dict(state)


class VAEObjective:
    """The Gaussian VAE: the one-sample negative ELBO in bits/dim; the pipeline is a :class:`~hf_ddpm.VAEPipeline`.

    Args:
        bound_options: how the bound is evaluated (``iwae_samples``: K of the IWAE bound beside the ELBO).
    """

    def __init__(self, bound_options: BoundOptions = BoundOptions()):
        self.bound_options = bound_options
        self.sampling_kwargs: dict[str, Any] = {}

    def loss(self, model: torch.nn.Module, images: torch.Tensor) -> ObjectiveOutput:
        """The one-sample negative ELBO of each image, through ``forward`` so that DDP synchronises gradients;
        logs its KL and reconstruction terms in nats."""
        out = model(images)
        logs = {"kl_nats": out.kl_nats.mean().item(), "reconstruction_nats": out.reconstruction_nats.mean().item()}
        return ObjectiveOutput(loss=out.bits_per_dim, logs=logs)

    def observe(self, feedback: dict[str, torch.Tensor]) -> None:
        """Nothing to learn from other processes."""

    def pipeline(self, model: torch.nn.Module) -> VAEPipeline:
        return VAEPipeline(vae=model)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """No state."""


class VDMObjective:
    """The continuous-time variational diffusion model (Kingma et al. 2021): VDM's one-sample bound in bits/dim,
    prior + 1/2 gamma'(t) ||eps - eps_hat(z_t, t)||^2 + reconstruction at low-discrepancy times t over the batch
    (:meth:`~hf_ddpm.pipelines.vdm.VDMModel.forward`); the pipeline is a :class:`~hf_ddpm.VDMPipeline`.

    The model is a :class:`~hf_ddpm.pipelines.vdm.VDMModel`, so the one optimizer trains the network and every
    parameter of the noise schedule (a ``learned`` schedule's network and endpoints gamma_0, gamma_1): on the bound,
    as VDM's released training code does, or, with ``VDMModel(..., schedule_interior="variance")``, the interior on
    the variance of the loss as the paper's appendix describes (the endpoints always on the bound).

    Args:
        bound_options: how the bound is evaluated (``exact``: the T = 1000 discrete-time bound; otherwise the
            continuous-time bound estimated from ``timesteps_per_image`` times per image).
        sample_steps: ancestral steps of the pipeline's sample grids (the grid t_i = i / n).
    """

    def __init__(self, bound_options: BoundOptions = BoundOptions(), sample_steps: int = 100):
        self.bound_options = bound_options
        self.sampling_kwargs = {"num_inference_steps": sample_steps}
        self.scheduler = VDMContinuousScheduler()

    def loss(self, model: torch.nn.Module, images: torch.Tensor) -> ObjectiveOutput:
        """The one-sample bound of each image, through ``forward`` so that DDP synchronises gradients; logs its
        three terms in bits/dim."""
        terms = model(images)
        logs = {
            "prior_bits_per_dim": terms.prior.mean().item(),
            "diffusion_bits_per_dim": terms.diffusion.mean().item(),
            "reconstruction_bits_per_dim": terms.reconstruction.mean().item(),
        }
        return ObjectiveOutput(loss=terms.total, logs=logs)

    def observe(self, feedback: dict[str, torch.Tensor]) -> None:
        """Nothing to learn from other processes."""

    def pipeline(self, model: VDMModel) -> VDMPipeline:
        """The pipeline around the network and schedule being trained (not copies: it sees the current weights)."""
        return VDMPipeline(unet=model.unet, noise_schedule=model.noise_schedule, scheduler=self.scheduler)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """No state."""
