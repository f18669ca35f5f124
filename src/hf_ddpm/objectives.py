"""What ``training/train.py`` needs from a model kind: its loss, its pipeline, and how to measure its bound.

The training loop knows nothing of diffusion or VAEs. It calls, for every batch, ``objective.loss(model, images)``
(an :class:`ObjectiveOutput`: the per-image loss, numbers to log, and feedback for the objective), gathers the
feedback over processes and hands it back with ``objective.observe``; it wraps the model being trained with
``objective.pipeline(model)`` to sample and to evaluate (:func:`hf_ddpm.evaluation.evaluate_bound` with
``objective.bound_options``). A new model kind plugs in by implementing :class:`Objective`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from diffusers import DiffusionPipeline

from .ddpm.chain import DECODER_MIN_STD
from .ddpm.elbo import training_loss
from .ddpm.scheduler import HFDDPMScheduler
from .ddpm.timestep_sampling import DEFAULT_DECODER_SHARE, UniformTimestepSampler, make_timestep_sampler
from .evaluation import BoundOptions
from .models.unet import DenoisingUNet
from .pipelines.ddpm import HFDDPMPipeline
from .pipelines.vae import VAEPipeline
from .pipelines.vdm import VDMModel, VDMPipeline
from .vae.model import GaussianVAE
from .vdm.noise_schedule import NoiseSchedule
from .vdm.scheduler import VDMContinuousScheduler

if TYPE_CHECKING:  # the flags need the train extra; building a model from them does not
    from .training_args import DataArguments, ModelArguments, TrainingArguments


@dataclass
class ObjectiveOutput:
    """One batch's training loss.

    Attributes:
        loss: (B,) per-image loss; the step minimises its mean.
        logs: numbers to log for this step, as 0-dim tensors on the model's device (averaged over the batch; NaN
            where there is nothing to average), read back only when the loop logs (:func:`read_logs`).
        feedback: tensors the objective needs back from every process (``accelerator.gather``), e.g. the timesteps
            and losses an importance sampler learns from.
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    feedback: dict[str, torch.Tensor] = field(default_factory=dict)


def read_logs(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """``logs`` as floats, read from the device in one transfer; NaN entries (nothing to average) are left out."""
    if not logs:
        return {}
    values = torch.stack([value.detach().float().reshape(()) for value in logs.values()]).tolist()
    return {name: value for name, value in zip(logs, values) if not math.isnan(value)}


class Objective(Protocol):
    """The interface between a model kind and the training loop."""

    bound_options: BoundOptions
    sampling_kwargs: dict[str, Any]

    def loss(self, model: torch.nn.Module, images: torch.Tensor) -> ObjectiveOutput: ...

    def observe(self, feedback: dict[str, torch.Tensor]) -> None: ...

    def pipeline(self, model: torch.nn.Module) -> DiffusionPipeline: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def loss_by_quartile(timesteps: torch.Tensor, losses: torch.Tensor, num_timesteps: int) -> dict[str, torch.Tensor]:
    """Mean loss of the batch's images in each quarter of the timesteps (q0 = least noise), as improved-diffusion
    logs it; NaN for a quarter with no image (:func:`read_logs` leaves it out). Computed on the losses' device."""
    quartile = (timesteps.detach().long() * 4 // num_timesteps).to(losses.device)
    values = losses.detach().float()
    sums = torch.zeros(4, device=values.device).index_add_(0, quartile, values)
    counts = torch.zeros(4, device=values.device).index_add_(0, quartile, torch.ones_like(values))
    means = sums / counts
    return {f"loss_q{q}": means[q] for q in range(4)}


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
            logs["vlb_bits_per_dim"] = out.vlb_bits_per_dim.detach().mean()
        if out.mse is not None:
            logs["mse"] = out.mse.detach().mean()
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
        logs = {"kl_nats": out.kl_nats.detach().mean(), "reconstruction_nats": out.reconstruction_nats.detach().mean()}
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
            "prior_bits_per_dim": terms.prior.detach().mean(),
            "diffusion_bits_per_dim": terms.diffusion.detach().mean(),
            "reconstruction_bits_per_dim": terms.reconstruction.detach().mean(),
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


def build_model_and_objective(
    model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments
) -> tuple[torch.nn.Module, Objective]:
    """The network to train and the objective of its model kind (loss, pipeline, bound), from train.py's resolved
    arguments (:func:`hf_ddpm.training_args.parse_arguments`: the layout rule has filled in the widths and
    attention). The one way train.py, the benchmarks and the tests build a model; seed torch first for the same
    initial weights."""
    options = BoundOptions(
        timesteps_per_image=train_args.eval_timesteps_per_image, iwae_samples=model_args.iwae_samples
    )
    if model_args.model == "vae":
        vae = GaussianVAE(
            sample_size=data_args.resolution,
            in_channels=data_args.channels,
            latent_dim=model_args.latent_dim,
            block_out_channels=tuple(model_args.block_out_channels[:2]),
            num_latent_layers=model_args.num_latent_layers,
        )
        return vae, VAEObjective(options)
    unet_layout = dict(
        sample_size=data_args.resolution,
        in_channels=data_args.channels,
        block_out_channels=tuple(model_args.block_out_channels),
        layers_per_block=model_args.layers_per_block,
        attention_resolutions=tuple(model_args.attention_resolutions),
        dropout=model_args.dropout,
    )
    if model_args.model == "vdm":
        unet = DenoisingUNet(**unet_layout, learn_variance=False, fourier_features=tuple(model_args.fourier_features))
        model = VDMModel(unet, NoiseSchedule(schedule_type=model_args.noise_schedule), model_args.schedule_interior)
        return model, VDMObjective(options, sample_steps=train_args.sample_steps)
    scheduler = HFDDPMScheduler(
        num_train_timesteps=model_args.num_train_timesteps,
        beta_schedule=model_args.beta_schedule,
        variance_type=model_args.variance_type,
        prediction_type=model_args.prediction_type,
        decoder_min_std=(
            (DECODER_MIN_STD if model_args.decoder_min_std is None else model_args.decoder_min_std)
            if model_args.variance_type == "learned_range"
            else None
        ),
    )
    objective = DiffusionObjective(
        scheduler,
        model_args.loss_type,
        make_timestep_sampler(
            model_args.timestep_sampler,
            model_args.num_train_timesteps,
            model_args.loss_type,
            DEFAULT_DECODER_SHARE if model_args.decoder_share is None else model_args.decoder_share,
        ),
        snr_gamma=model_args.snr_gamma,
        bound_options=options,
        sample_steps=train_args.sample_steps,
    )
    learn_variance, features = model_args.variance_type == "learned_range", tuple(model_args.fourier_features)
    if model_args.architecture == "diffusers_unet2d":
        return diffusers_unet2d(unet_layout, out_channels=data_args.channels * (2 if learn_variance else 1)), objective
    if model_args.model_config_name_or_path is None:
        return DenoisingUNet(**unet_layout, learn_variance=learn_variance, fourier_features=features), objective
    try:  # diffusers' flag: the network from a saved config
        unet = DenoisingUNet.from_config(DenoisingUNet.load_config(model_args.model_config_name_or_path))
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise SystemExit(f"--model_config_name_or_path {model_args.model_config_name_or_path}: {reason}") from None
    given = (unet.config.sample_size, unet.config.in_channels, unet.config.learn_variance)
    wanted = (data_args.resolution, data_args.channels, learn_variance)
    if given != wanted:
        raise SystemExit(
            f"--model_config_name_or_path {model_args.model_config_name_or_path}: its (sample_size, in_channels, "
            f"learn_variance) {given} do not fit --resolution, --channels and --variance_type {wanted}."
        )
    return unet, objective


def diffusers_unet2d(unet_layout: dict[str, Any], out_channels: int) -> torch.nn.Module:
    """diffusers' ``UNet2DModel`` with a :class:`DenoisingUNet`'s layout (levels, widths, attention at the same
    resolutions, 8 groups per GroupNorm), for ``--architecture diffusers_unet2d``."""
    from diffusers import UNet2DModel

    size = unet_layout["sample_size"]
    widths = unet_layout["block_out_channels"]
    attention = [size // 2**level in unet_layout["attention_resolutions"] for level in range(len(widths))]
    return UNet2DModel(
        sample_size=size,
        in_channels=unet_layout["in_channels"],
        out_channels=out_channels,
        block_out_channels=widths,
        layers_per_block=unet_layout["layers_per_block"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        norm_num_groups=8,
        dropout=unet_layout["dropout"],
    )
