#!/usr/bin/env python
"""Train hf_ddpm's diffusion model (or its Gaussian VAE, --model vae) with Accelerate, from one CPU process to many GPUs.

    accelerate launch training/train.py                      # the default recipe on the 60,000 MNIST digits, ~15 min on 2 CPU cores
    accelerate launch training/train.py --config run.yaml    # any flag below, from a YAML or JSON file
    accelerate launch --config_file training/configs/cpu_2proc.yaml training/train.py --max_train_steps 100

Read it top to bottom: arguments -> data -> model + objective -> the accelerate loop (checkpoints, EMA, logging) ->
outputs (pipeline, sample grid, NLL, model card) -> push to the Hub. What a model kind does (its loss, pipeline and
bound) comes from hf_ddpm.objectives; what any run needs (checkpoints, grids, precision) from hf_ddpm.training_utils.
Flags that exist in diffusers' examples/unconditional_image_generation/train_unconditional.py keep their names and
meanings there.

Batch sizes: ``--train_batch_size`` is per process; one optimizer step sees
``train_batch_size * num_processes * gradient_accumulation_steps`` images (logged at start). Only the main process
writes files, logs and pushes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from hf_ddpm import DenoisingUNet, GaussianVAE, NoiseSchedule, VDMScheduler
from hf_ddpm.data import ImageData, ImageTensorDataset, load_images, split_holdout
from hf_ddpm.evaluation import BoundOptions, BoundResult, evaluate_bound
from hf_ddpm.hub.card import NLLResult, TrainingReport, render_model_card
from hf_ddpm.hub.push import push_pipeline_to_hub, save_pipeline_repo
from hf_ddpm.objectives import DiffusionObjective, Objective, VAEObjective, VDMObjective
from hf_ddpm.pipelines.vdm import VDMModel
from hf_ddpm.training_utils import (
    TrainLog,
    check_checkpoint_compatible,
    check_output_dir,
    checkpoint_step,
    clear_output_dir,
    ema_weights,
    hardware_description,
    has_accelerator_device,
    list_checkpoints,
    log_sample_grid,
    remove_partial_checkpoints,
    resolve_mixed_precision,
    resolve_resume_path,
    sample_grid,
    save_checkpoint,
    use_all_cores,
)
from hf_ddpm.vdm.chain import PREDICTION_TYPES, VARIANCE_TYPES
from hf_ddpm.vdm.elbo import LOSS_TYPES
from hf_ddpm.vdm.noise_schedule import VDM_SCHEDULE_TYPES
from hf_ddpm.vdm.schedules import BETA_SCHEDULES
from hf_ddpm.vdm.timestep_sampling import TIMESTEP_SAMPLERS, make_timestep_sampler

logger = get_logger(__name__, log_level="INFO")
MODELS = ("ddpm", "vae", "vdm")
ARCHITECTURES = ("hf_ddpm", "diffusers_unet2d")
MIN_RESOLUTION, MAX_RESOLUTION = 4, 512
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")


# ================================================================================================ arguments
@dataclass
class ModelArguments:
    """What to train. The defaults are the recipe tuned for quality per CPU-minute on 28x28 digits."""

    model: str = field(
        default="ddpm",
        metadata={
            "help": f"{' | '.join(MODELS)}: the diffusion model, the Gaussian VAE, or the continuous-time VDM "
            "(Kingma et al. 2021: the UNet below with Fourier features (7, 8) and the --noise_schedule, trained on "
            "the bound; the same CPU recipe as ddpm: lr 1e-3, batch 32; --sample_steps ancestral steps)."
        },
    )
    architecture: str = field(
        default="hf_ddpm",
        metadata={"help": f"DDPM network: {' | '.join(ARCHITECTURES)} (diffusers' UNet2DModel with the same levels and attention)."},
    )
    loss_type: str = field(default="hybrid", metadata={"help": f"DDPM loss: {' | '.join(LOSS_TYPES)}."})
    prediction_type: str = field(default="epsilon", metadata={"help": f"{' | '.join(PREDICTION_TYPES)}."})
    variance_type: str = field(default="learned_range", metadata={"help": f"{' | '.join(VARIANCE_TYPES)}."})
    beta_schedule: str = field(default="cosine", metadata={"help": f"{' | '.join(BETA_SCHEDULES)}."})
    num_train_timesteps: int = field(default=1000, metadata={"help": "T, the number of diffusion steps."})
    timestep_sampler: str = field(
        default="auto",
        metadata={
            "help": f"auto | {' | '.join(TIMESTEP_SAMPLERS)}; auto = loss-second-moment for vlb (where improved-diffusion "
            "found it pays), uniform for simple and hybrid (whose squared error dominates the per-t loss)."
        },
    )
    snr_gamma: float | None = field(
        default=None, metadata={"help": "Min-SNR-gamma weighting of the squared error (as diffusers' --snr_gamma); 5 is the paper's value."}
    )
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64], metadata={"help": "UNet channels per level."})
    layers_per_block: int = field(default=1, metadata={"help": "Residual blocks per UNet level."})
    attention_resolutions: list[int] = field(default_factory=lambda: [7], metadata={"help": "Feature sizes with self-attention."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout in the residual blocks."})
    latent_dim: int = field(default=32, metadata={"help": "VAE only: dimension of each latent layer."})
    num_latent_layers: int = field(default=1, metadata={"help": "VAE only: >1 trains a Markovian hierarchical VAE."})
    iwae_samples: int = field(default=64, metadata={"help": "VAE only: K of the held-out importance-weighted bound."})
    noise_schedule: str = field(
        default="learned",
        metadata={
            "help": f"VDM only: gamma(t) = -log SNR(t), {' | '.join(VDM_SCHEDULE_TYPES)} "
            "(learned: trained with the network)."
        },
    )


@dataclass
class DataArguments:
    """Where the images come from. With neither --dataset_name nor --train_data_dir: the 60,000 official MNIST training
    digits embedded in hf_ddpm, evaluated on the official test digits."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset (e.g. ylecun/mnist) or a local dataset path."})
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_data_dir: str | None = field(default=None, metadata={"help": "A folder of images, or of MNIST IDX files."})
    image_column: str | None = field(default=None, metadata={"help": "The image column (auto-detected if not given)."})
    resolution: int = field(default=28, metadata={"help": "Images are resized (and cropped) to this size."})
    channels: int = field(default=1, metadata={"help": "1 (grayscale) or 3 (RGB); images are converted."})
    center_crop: bool = field(default=False, metadata={"help": "Center-crop instead of squashing to a square."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flips (off: digits are not symmetric)."})
    max_train_images: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out evaluation data (e.g. a folder of MNIST IDX files); default: the embedded MNIST test digits "
            "when training on the embedded MNIST, else a held-out slice of the training data."
        },
    )
    eval_split: str = field(default="test", metadata={"help": "Split of --eval_data."})
    num_eval_images: int = field(default=256, metadata={"help": "Held-out images for the NLL estimate."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})


@dataclass
class TrainingArguments:
    """How to train, evaluate, save and share."""

    output_dir: str = field(default="ddpm-mnist", metadata={"help": "Where the pipeline, card, samples and checkpoints go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow an output_dir that holds a different model."})
    seed: int = field(default=0)
    train_batch_size: int = field(default=32, metadata={"help": "Images per process per forward pass."})
    eval_batch_size: int = field(default=256)
    num_epochs: int = field(default=1000, metadata={"help": "Upper bound; --max_train_steps usually ends the run."})
    max_train_steps: int | None = field(default=3600, metadata={"help": "Optimizer steps (overrides num_epochs)."})
    gradient_accumulation_steps: int = field(default=1)
    learning_rate: float = field(default=1e-3)
    lr_scheduler: str = field(default="cosine", metadata={"help": "diffusers get_scheduler name."})
    lr_warmup_steps: int = field(default=100)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.99)
    adam_weight_decay: float = field(default=0.0)
    adam_epsilon: float = field(default=1e-8)
    max_grad_norm: float = field(default=1.0)
    mixed_precision: str = field(
        default="auto", metadata={"help": "auto | no | bf16 | fp16; auto = bf16 where the hardware computes it natively, else no."}
    )
    use_ema: bool = field(default=True)
    ema_inv_gamma: float = field(default=1.0)
    ema_power: float = field(default=0.75)
    ema_max_decay: float = field(default=0.9999)
    checkpointing_steps: int = field(default=1000)
    checkpoints_total_limit: int | None = field(default=2)
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    eval_steps: int = field(default=1000, metadata={"help": "Held-out NLL estimate every N steps (and at the end)."})
    eval_timesteps_per_image: int = field(default=8, metadata={"help": "K stratified timesteps per image for the NLL estimate."})
    num_sample_images: int = field(default=64)
    sample_steps: int = field(default=100, metadata={"help": "Respaced sampling steps for the sample grid."})
    logger: str = field(default="tensorboard", metadata={"help": "tensorboard | wandb | none."})
    logging_dir: str = field(default="logs", metadata={"help": "Relative to output_dir."})
    record_seen_indices: bool = field(default=False, metadata={"help": "Write the dataset indices each process trained on (verifies sharding)."})
    push_to_hub: bool = field(default=False)
    hub_model_id: str | None = field(default=None)
    hub_token: str | None = field(default=None, metadata={"help": "Defaults to HF_TOKEN or the login cache; never saved."})
    hub_private_repo: bool = field(default=False)
    push_checkpoints: bool = field(
        default=False, metadata={"help": "Also push the EMA pipeline at each checkpoint to checkpoints/step-N in the Hub repo."}
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)
SECRET_FIELDS = ("hub_token",)


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse flags; ``--config FILE.yaml|json`` gives defaults that explicit flags override. Validates choices."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.add_argument("--config", default=None, help="YAML or JSON file of arguments; flags override it.")
    config_path = None
    if "--config" in argv:
        index = argv.index("--config")
        config_path = argv[index + 1] if index + 1 < len(argv) else None
        del argv[index : index + 2]
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise SystemExit(f"--config {config_path}: no such file.")
        values = read_config(path)
        parser.set_defaults(**values)
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)[:3]  # [3]: the --config namespace
    validate_arguments(model_args, data_args, train_args)
    return model_args, data_args, train_args


def read_config(path: Path) -> dict:
    """The arguments of a YAML or JSON ``--config`` file, each checked against its field's type (an int field
    refuses 2.7, a scalar field refuses a list): raises SystemExit in one line saying what to fix."""
    try:
        text = path.read_text()
        values = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as error:
        kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
        reason = " ".join(str(error).split())
        raise SystemExit(f"--config {path}: not valid {kind} ({reason}); fix the file or pass the flags.") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a mapping of argument: value, got a {type(values).__name__}.")
    fields = {f.name: f for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SystemExit(f"--config {path}: unknown argument(s) {unknown}.")
    hints = {name: hint for cls in ARGUMENT_CLASSES for name, hint in typing.get_type_hints(cls).items()}
    for name, value in values.items():
        hint = hints[name]
        kinds = typing.get_args(hint) or [hint]
        kind = "list" if typing.get_origin(hint) is list else " | ".join(t.__name__ for t in kinds)
        if value is None:
            if "None" not in kind:
                raise SystemExit(f"--config {path}: {name} cannot be null; remove it to keep its default.")
        elif kind.startswith("list"):
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise SystemExit(f"--config {path}: {name} must be a list of integers, got {value!r}.")
        elif isinstance(value, (list, dict)):
            raise SystemExit(f"--config {path}: {name} must be a single value, got {value!r}.")
        elif kind.startswith("bool"):
            if not isinstance(value, bool):
                raise SystemExit(f"--config {path}: {name} must be true or false, got {value!r}.")
        elif kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise SystemExit(f"--config {path}: {name} must be an integer, got {value!r}.")
        elif kind.startswith("float"):
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; argparse converts it, as on the command line
                try:
                    values[name] = float(value)
                    continue
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SystemExit(f"--config {path}: {name} must be a number, got {value!r}.")
        elif kind.startswith("str") and not isinstance(value, str):
            raise SystemExit(f"--config {path}: {name} must be a string, got {value!r}.")
    return values


def validate_arguments(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> None:
    """Reject unknown names and impossible sizes with a message that says what to fix."""
    choices = {
        "--model": (model_args.model, MODELS),
        "--architecture": (model_args.architecture, ARCHITECTURES),
        "--loss_type": (model_args.loss_type, LOSS_TYPES),
        "--prediction_type": (model_args.prediction_type, PREDICTION_TYPES),
        "--variance_type": (model_args.variance_type, VARIANCE_TYPES),
        "--beta_schedule": (model_args.beta_schedule, BETA_SCHEDULES),
        "--noise_schedule": (model_args.noise_schedule, VDM_SCHEDULE_TYPES),
        "--timestep_sampler": (model_args.timestep_sampler, ("auto", *TIMESTEP_SAMPLERS)),
        "--mixed_precision": (train_args.mixed_precision, MIXED_PRECISIONS),
        "--logger": (train_args.logger, ("tensorboard", "wandb", "none")),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise SystemExit(f"{flag} {value!r} is not one of: {', '.join(allowed)}.")
    levels = len(model_args.block_out_channels)
    smallest = max(MIN_RESOLUTION, 2 ** (levels - 1))
    if not smallest <= data_args.resolution <= MAX_RESOLUTION:
        raise SystemExit(
            f"--resolution must be between {smallest} (the smallest image {levels} levels can halve) and "
            f"{MAX_RESOLUTION} (attention and memory grow with its 4th power), got {data_args.resolution}."
        )
    if data_args.resolution % 2 ** (levels - 1):
        raise SystemExit(
            f"--resolution {data_args.resolution} cannot be halved {levels - 1} times by a model with {levels} levels "
            f"(--block_out_channels {model_args.block_out_channels}); use a resolution divisible by {2 ** (levels - 1)}."
        )
    if model_args.model == "ddpm" and model_args.variance_type == "learned_range" and model_args.loss_type == "simple":
        raise SystemExit("--loss_type simple does not train a learned variance: use hybrid or vlb, or --variance_type fixed_small.")
    if data_args.dataset_name and data_args.train_data_dir:
        raise SystemExit("Give either --dataset_name or --train_data_dir, not both.")
    if train_args.push_to_hub and not train_args.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id ORG/NAME.")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "eval_steps", "num_eval_images"):
        if getattr(train_args if hasattr(train_args, flag) else data_args, flag) <= 0:
            raise SystemExit(f"--{flag} must be positive.")
    validate_counts(model_args, data_args, train_args)


def validate_counts(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> None:
    """Every count and range that would otherwise fail only after training (no pipeline, card or log written) or
    do the wrong thing silently; each message names the flag, the allowed range and the value given."""
    at_least_one = {
        "--num_sample_images": train_args.num_sample_images, "--eval_batch_size": train_args.eval_batch_size,
        "--num_epochs": train_args.num_epochs, "--channels": data_args.channels,
        "--layers_per_block": model_args.layers_per_block,
    }
    if model_args.model == "vae":
        at_least_one.update({
            "--latent_dim": model_args.latent_dim, "--num_latent_layers": model_args.num_latent_layers,
            "--iwae_samples": model_args.iwae_samples,
        })
    else:
        at_least_one.update({"--sample_steps": train_args.sample_steps,
                             "--eval_timesteps_per_image": train_args.eval_timesteps_per_image})
    for flag, value in at_least_one.items():
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}.")
    optional = {
        "--max_train_steps": train_args.max_train_steps, "--checkpoints_total_limit": train_args.checkpoints_total_limit,
    }
    for flag, value in optional.items():
        if value is not None and value < 1:
            raise SystemExit(f"{flag} must be >= 1 or unset, got {value}")
    if data_args.max_train_images is not None and data_args.max_train_images < 1:
        raise SystemExit(f"--max_train_images must be >= 1 or unset, got {data_args.max_train_images}")
    if data_args.channels not in (1, 3):
        raise SystemExit(f"--channels must be 1 (grayscale) or 3 (RGB), got {data_args.channels}.")
    if min(model_args.block_out_channels, default=0) < 1:
        raise SystemExit(f"--block_out_channels must be positive integers, got {model_args.block_out_channels}.")
    if not (math.isfinite(train_args.learning_rate) and train_args.learning_rate > 0):
        raise SystemExit(f"--learning_rate must be a finite number > 0, got {train_args.learning_rate}.")
    if train_args.lr_warmup_steps < 0:
        raise SystemExit(f"--lr_warmup_steps must be >= 0, got {train_args.lr_warmup_steps}.")
    if model_args.model == "ddpm":
        T = model_args.num_train_timesteps
        if T < 2:
            raise SystemExit(f"--num_train_timesteps must be >= 2 (T diffusion steps), got {T}.")
        if not 1 <= train_args.sample_steps <= T:
            raise SystemExit(
                f"--sample_steps must be in [1, {T}] (--num_train_timesteps), got {train_args.sample_steps}."
            )
        if not 1 <= train_args.eval_timesteps_per_image <= T - 1:
            raise SystemExit(
                f"--eval_timesteps_per_image must be in [1, {T - 1}] (T - 1 denoising terms), "
                f"got {train_args.eval_timesteps_per_image}."
            )
    if train_args.overwrite_output_dir and train_args.resume_from_checkpoint:
        raise SystemExit(
            "--overwrite_output_dir starts over (it removes the old run's checkpoints): drop it to resume, or drop "
            "--resume_from_checkpoint to start over."
        )
    if train_args.logger == "wandb" and not is_wandb_available():
        raise SystemExit(
            "--logger wandb: wandb is not installed; pip install wandb, or pass --logger tensorboard or none."
        )
    if train_args.logger == "tensorboard" and not is_tensorboard_available():
        raise SystemExit(
            "--logger tensorboard: tensorboard is not installed; pip install tensorboard, or pass --logger none."
        )
    check_writable(Path(train_args.output_dir))


def check_writable(output_dir: Path) -> None:
    """Refuse an --output_dir that is a file, lies under a file, or cannot be written, before any work starts."""
    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"--output_dir {output_dir} is a file, not a folder; choose another --output_dir.")
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SystemExit(f"--output_dir {output_dir}: {existing} is a file, so the folder cannot be made there.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(
            f"--output_dir {output_dir}: {existing} is not writable (permission denied); choose another --output_dir."
        )


def resolved_arguments(*arguments) -> dict:
    """All arguments as one JSON-able dict, secrets removed: saved with every output so a run can be repeated."""
    values = {}
    for group in arguments:
        values.update(dataclasses.asdict(group))
    for name in SECRET_FIELDS:
        values.pop(name, None)
    return values


# ================================================================================================ data
def load_data(data_args: DataArguments) -> tuple[ImageData, ImageData, str]:
    """(training images, held-out images, a sentence saying where the held-out set comes from). The held-out set is
    ``--eval_data``, else the official test split of the embedded MNIST when training on it, else images held out
    at random from the training data."""
    common = dict(channels=data_args.channels, resolution=data_args.resolution, center_crop=data_args.center_crop)
    source = data_args.dataset_name or data_args.train_data_dir
    train = load_images(
        source, split="train", dataset_config=data_args.dataset_config, image_column=data_args.image_column,
        max_images=data_args.max_train_images, **common,
    )
    if data_args.eval_data is not None or source is None:
        held_out = load_images(data_args.eval_data, split=data_args.eval_split, max_images=data_args.num_eval_images, **common)
        return train, held_out, f"the first {len(held_out.images)} images of {held_out.source}"
    train, held_out = split_holdout(train, data_args.num_eval_images)
    return train, held_out, f"{len(held_out.images)} images held out at random from {train.source} (not trained on)"


class IndexedImages(torch.utils.data.Dataset):
    """(index, image) pairs, so a run can record which images each process trained on."""

    def __init__(self, images: ImageTensorDataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.images[index]


# ================================================================================================ model + objective
def build_model(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> tuple[torch.nn.Module, Objective]:
    """The network to train and the objective of its model kind (loss, pipeline, bound)."""
    options = BoundOptions(timesteps_per_image=train_args.eval_timesteps_per_image, iwae_samples=model_args.iwae_samples)
    if model_args.model == "vae":
        vae = GaussianVAE(
            sample_size=data_args.resolution, in_channels=data_args.channels, latent_dim=model_args.latent_dim,
            block_out_channels=tuple(model_args.block_out_channels[:2]), num_latent_layers=model_args.num_latent_layers,
        )
        return vae, VAEObjective(options)
    if model_args.model == "vdm":
        unet = DenoisingUNet(
            sample_size=data_args.resolution, in_channels=data_args.channels, learn_variance=False,
            block_out_channels=tuple(model_args.block_out_channels), layers_per_block=model_args.layers_per_block,
            attention_resolutions=tuple(model_args.attention_resolutions), dropout=model_args.dropout,
            fourier_features=(7, 8),
        )
        model = VDMModel(unet, NoiseSchedule(schedule_type=model_args.noise_schedule))
        return model, VDMObjective(options, sample_steps=train_args.sample_steps)
    scheduler = VDMScheduler(
        num_train_timesteps=model_args.num_train_timesteps, beta_schedule=model_args.beta_schedule,
        variance_type=model_args.variance_type, prediction_type=model_args.prediction_type,
    )
    sampler_name = model_args.timestep_sampler
    if sampler_name == "auto":
        sampler_name = "loss-second-moment" if model_args.loss_type == "vlb" else "uniform"
    objective = DiffusionObjective(
        scheduler, model_args.loss_type, make_timestep_sampler(sampler_name, model_args.num_train_timesteps),
        snr_gamma=model_args.snr_gamma, bound_options=options, sample_steps=train_args.sample_steps,
    )
    out_channels = data_args.channels * (2 if model_args.variance_type == "learned_range" else 1)
    if model_args.architecture == "diffusers_unet2d":
        sizes = [data_args.resolution // 2**level for level in range(len(model_args.block_out_channels))]
        attention = [size in model_args.attention_resolutions for size in sizes]
        unet = UNet2DModel(
            sample_size=data_args.resolution, in_channels=data_args.channels, out_channels=out_channels,
            block_out_channels=tuple(model_args.block_out_channels), layers_per_block=model_args.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            norm_num_groups=8, dropout=model_args.dropout,
        )
        return unet, objective
    unet = DenoisingUNet(
        sample_size=data_args.resolution, in_channels=data_args.channels,
        learn_variance=model_args.variance_type == "learned_range", block_out_channels=tuple(model_args.block_out_channels),
        layers_per_block=model_args.layers_per_block, attention_resolutions=tuple(model_args.attention_resolutions),
        dropout=model_args.dropout,
    )
    return unet, objective


def evaluate(objective: Objective, model: torch.nn.Module, images: torch.Tensor, train_args: TrainingArguments) -> BoundResult:
    """The bound of the model being trained on the held-out images (the same seed every time, so successive
    evaluations differ only by the model)."""
    model.eval()
    bound = evaluate_bound(
        objective.pipeline(model), images, objective.bound_options, batch_size=train_args.eval_batch_size,
        generator=torch.Generator().manual_seed(train_args.seed),
    )
    model.train()
    return bound


# ================================================================================================ main
def finished_run(resume_path: Path, output_dir: Path, max_train_steps: int | None) -> bool:
    """True when the checkpoint is at or past ``--max_train_steps`` and the outputs of that step were written:
    resuming it has nothing to do. (Past the steps but without outputs, the run writes them and trains no step.)"""
    if max_train_steps is None or checkpoint_step(resume_path) < max_train_steps:
        return False
    try:
        return json.loads((output_dir / "eval_results.json").read_text())["steps"] >= checkpoint_step(resume_path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> Path:
    model_args, data_args, train_args = parse_arguments(argv)
    output_dir = Path(train_args.output_dir)
    arguments = resolved_arguments(model_args, data_args, train_args)
    mixed_precision = resolve_mixed_precision(train_args.mixed_precision)
    accelerator = Accelerator(
        cpu=not has_accelerator_device(),  # with no GPU, several launched processes form a gloo group on the CPU
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if train_args.logger == "none" else train_args.logger,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / train_args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    threads = use_all_cores()
    model_keys = [f.name for f in dataclasses.fields(ModelArguments)] + ["resolution", "channels"]
    try:
        if accelerator.is_main_process:
            check_output_dir(output_dir, arguments, model_keys, train_args.overwrite_output_dir)
            if train_args.overwrite_output_dir and (removed := clear_output_dir(output_dir, train_args.logging_dir)):
                logger.info(f"--overwrite_output_dir: removed the old run's {', '.join(removed)} from {output_dir}.")
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(output_dir)
        accelerator.wait_for_everyone()
        resume_path = resolve_resume_path(train_args.resume_from_checkpoint, output_dir)
        if resume_path is not None:
            check_checkpoint_compatible(resume_path, arguments, model_keys)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if resume_path is not None and finished_run(resume_path, output_dir, train_args.max_train_steps):
        message = (
            f"{resume_path.name} is at step {checkpoint_step(resume_path)} >= --max_train_steps "
            f"{train_args.max_train_steps} and its outputs are in {output_dir}: the run is finished, nothing to do "
            "(raise --max_train_steps to train further)."
        )
        if accelerator.is_main_process:
            print(message)
        accelerator.end_training()
        return output_dir
    if train_args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.info(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run.")

    # ---- data
    train_data, held_out, held_out_description = load_data(data_args)
    dataset = IndexedImages(ImageTensorDataset(train_data.images, random_flip=data_args.random_flip))
    if len(dataset) < train_args.train_batch_size * accelerator.num_processes:
        raise SystemExit(
            f"{len(dataset)} training images are fewer than one global batch "
            f"({train_args.train_batch_size} x {accelerator.num_processes} processes): lower --train_batch_size."
        )
    held_out_images = ImageTensorDataset(held_out.images)[:]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train_args.train_batch_size, shuffle=True, drop_last=True,
        num_workers=data_args.dataloader_num_workers, generator=torch.Generator().manual_seed(train_args.seed),
    )

    # ---- model, objective, optimizer, EMA
    set_seed(train_args.seed)  # same initial weights in every process
    model, objective = build_model(model_args, data_args, train_args)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_args.learning_rate, betas=(train_args.adam_beta1, train_args.adam_beta2),
        weight_decay=train_args.adam_weight_decay, eps=train_args.adam_epsilon,
    )
    updates_per_epoch = math.ceil(len(loader) / train_args.gradient_accumulation_steps)
    max_train_steps = train_args.max_train_steps or train_args.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        train_args.lr_scheduler, optimizer=optimizer, num_warmup_steps=train_args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if train_args.use_ema:
        ema = EMAModel(
            unwrapped.parameters(), decay=train_args.ema_max_decay, use_ema_warmup=True,
            inv_gamma=train_args.ema_inv_gamma, power=train_args.ema_power,
        )
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(objective)

    global_batch = train_args.train_batch_size * accelerator.num_processes * train_args.gradient_accumulation_steps
    logger.info(
        f"{len(dataset)} training images ({train_data.source}); held out: {held_out_description}. "
        f"{accelerator.num_processes} process(es) on {accelerator.device} ({threads} threads each), mixed precision "
        f"{mixed_precision}; "
        f"batch {train_args.train_batch_size} per process, {global_batch} per optimizer step; {max_train_steps} steps "
        f"({num_epochs} epochs); {sum(p.numel() for p in model.parameters()):,} parameters."
    )

    # ---- resume
    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume_path is not None:
        try:
            accelerator.load_state(str(resume_path))
        except (RuntimeError, KeyError, ValueError) as error:  # e.g. 145 "size mismatch" lines: keep the first
            first = str(error).strip().splitlines()[:2]
            raise SystemExit(
                f"--resume_from_checkpoint {resume_path} does not fit this model ({' '.join(first)[:300]}): resume "
                "with the arguments it was trained with (its training_args.json), or start a new run."
            ) from None
        global_step = checkpoint_step(resume_path)
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * train_args.gradient_accumulation_steps
        logger.info(f"Resumed from {resume_path} at step {global_step}.")
    else:
        set_seed(train_args.seed, device_specific=True)  # different noise and timesteps in every process
    if accelerator.is_main_process:
        (output_dir / "training_args.json").write_text(json.dumps(arguments, indent=2))
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in arguments.items()}
        accelerator.init_trackers("hf_ddpm", config=tracker_config)

    # ---- the loop
    seen_indices: list[int] = []
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps")
    start_time, start_step = time.time(), global_step
    train_log = None
    if accelerator.is_main_process:  # appended and flushed step by step; a resume drops the steps after its checkpoint
        train_log = TrainLog(output_dir / "train_log.jsonl", resume_step=global_step if resume_path else None)
    last_epoch = num_epochs if global_step < max_train_steps else first_epoch  # a finished run trains no step
    for epoch in range(first_epoch, last_epoch):
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        skip_batches = 0
        for indices, clean in batches:
            if train_args.record_seen_indices:
                seen_indices.extend(indices.tolist())
            with accelerator.accumulate(model):
                out = objective.loss(model, clean)
                loss = out.loss.mean()
                if not torch.isfinite(accelerator.gather(loss.detach())).all():
                    last = list_checkpoints(output_dir)
                    raise SystemExit(
                        f"The loss became {loss.item()} at step {global_step} (epoch {epoch}); stopping. The last good "
                        f"checkpoint is {last[-1] if last else 'none (no checkpoint was saved yet)'}. Try a lower "
                        "--learning_rate or --max_grad_norm, or --mixed_precision no."
                    )
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm) if accelerator.sync_gradients else None
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            objective.observe(accelerator.gather(out.feedback))
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(unwrapped.parameters())
            global_step += 1
            progress.update(1)
            images_per_second = (global_step - start_step) * global_batch / (time.time() - start_time)
            logs = {"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "images_per_second": images_per_second}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            logs.update(out.logs)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{images_per_second:.0f}")
            accelerator.log(logs, step=global_step)
            if train_log is not None:
                train_log.append({"step": global_step, **logs})
            if global_step % train_args.checkpointing_steps == 0 or global_step == max_train_steps:
                limit = train_args.checkpoints_total_limit
                saved = save_checkpoint(accelerator, output_dir, global_step, limit, arguments)
                logger.info(f"Saved checkpoint {saved}")
                if train_args.push_to_hub and train_args.push_checkpoints and accelerator.is_main_process:
                    with ema_weights(ema, unwrapped):
                        push_pipeline_to_hub(
                            objective.pipeline(unwrapped), train_args.hub_model_id, path_in_repo=f"checkpoints/step-{global_step}",
                            training_args=arguments, token=train_args.hub_token, private=train_args.hub_private_repo,
                        )
            if global_step % train_args.eval_steps == 0 and global_step < max_train_steps and accelerator.is_main_process:
                with ema_weights(ema, unwrapped):
                    bound = evaluate(objective, unwrapped, held_out_images, train_args)
                    if accelerator.trackers:
                        grid = sample_grid(objective.pipeline(unwrapped), train_args.num_sample_images, train_args.seed, **objective.sampling_kwargs)
                        log_sample_grid(accelerator, grid, global_step)
                accelerator.log({"eval/bits_per_dim": bound.bits_per_dim, "eval/standard_error": bound.standard_error}, step=global_step)
                logger.info(f"step {global_step}: held-out NLL {bound.bits_per_dim:.4f} ± {bound.standard_error:.4f} bits/dim ({bound.estimator})")
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress.close()
    train_seconds = time.time() - start_time
    if train_args.record_seen_indices:
        (output_dir / f"seen_indices_rank{accelerator.process_index}.json").write_text(json.dumps(seen_indices))

    # ---- outputs: the EMA weights as a pipeline, the NLL, samples, the card; then the Hub
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with ema_weights(ema, unwrapped):
            pipeline = objective.pipeline(unwrapped)
            bound = evaluate(objective, unwrapped, held_out_images, train_args)
            grid = sample_grid(pipeline, train_args.num_sample_images, train_args.seed, **objective.sampling_kwargs)
            results = {
                "held_out": held_out_description, "nll": bound.to_dict(), "steps": global_step,
                "images_seen": global_step * global_batch, "train_seconds_this_run": train_seconds,
                "mixed_precision": mixed_precision, "num_processes": accelerator.num_processes,
                "hardware": hardware_description(accelerator),
            }
            report = TrainingReport.for_pipeline(
                pipeline, train_args.hub_model_id or output_dir.name, datasets=[d for d in [train_data.dataset_id] if d],
                train_data=train_data.source, training_args=arguments, steps=global_step, images_seen=results["images_seen"],
                wall_time_seconds=train_seconds, hardware=results["hardware"], sampling_kwargs=objective.sampling_kwargs,
                nll=NLLResult(
                    bound, dataset_id=held_out.dataset_id or "local", split=held_out.split or "held-out",
                    dataset_name="MNIST" if held_out.dataset_id == "ylecun/mnist" else held_out.dataset_id or "local images",
                ),
            )
            card = render_model_card(report)
            save_pipeline_repo(pipeline, output_dir, card=card, sample_grid=grid, training_args=arguments)
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        train_log.close()
        logger.info(f"Held-out NLL {bound.bits_per_dim:.4f} ± {bound.standard_error:.4f} bits/dim; pipeline saved to {output_dir}")
        log_sample_grid(accelerator, grid, global_step)
        if train_args.push_to_hub:
            push_pipeline_to_hub(
                pipeline, train_args.hub_model_id, card=card, sample_grid=grid, training_args=arguments,
                token=train_args.hub_token, private=train_args.hub_private_repo,
            )
    accelerator.end_training()
    return output_dir


def run_cli(argv: list[str] | None = None) -> int:
    """The command-line entry: ``main``, with every error as one line ``error: <what is wrong and what to do>`` on
    stderr and a non-zero exit (2 for a bad argument or input, 1 for a failure while writing); the traceback only
    with ``--debug`` or ``HF_DDPM_DEBUG=1``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HF_DDPM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
        return 0
    except SystemExit as error:
        if error.code is None or isinstance(error.code, int):
            raise
        failure, message, code = error, str(error.code), 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError) as error:
        failure, message, code = error, " ".join(str(error).split()), 2
    except OSError as error:  # disk full and other write failures: name the path and the cause
        where = error.filename or "the output folder"
        failure, code = error, 1
        message = f"could not write {where}: {error.strerror or error}; free space or choose another --output_dir."
    except RuntimeError as error:
        if "PytorchStreamWriter" not in str(error) and "unexpected pos" not in str(error):
            raise
        message = f"could not write a checkpoint or weights file: {str(error).splitlines()[0]}; is the disk full?"
        failure, code = error, 1
    if debug:
        traceback.print_exception(failure)
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(run_cli())
