"""The command line of ``training/train.py``: its arguments, read from flags and a YAML/JSON ``--config``, checked
against each other before any work starts, and the one way its errors reach a person.

Flags that exist in diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` keep their names
and meanings there; where ours differ, its names are accepted as aliases (``--dataset_config_name``,
``--ddpm_num_steps``, ``--ddpm_num_inference_steps``, ``--ddpm_beta_schedule``). This module needs the training
extra (``pip install 'hf_ddpm[train]'``); importing it without one says so in one line.

Every check raises ``SystemExit`` with one line that says what is wrong and what to do; :func:`run_cli` prints it
as ``error: ...`` (the traceback only with ``--debug`` or ``HF_DDPM_DEBUG=1``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from diffusers.optimization import SchedulerType
from huggingface_hub import get_token

try:
    import accelerate.utils
except ImportError as _missing:  # the light install: loading, sampling and the ELBO only
    _package = (_missing.name or "a package").split(".")[0]
    raise ImportError(
        f"hf_ddpm's training needs the train extra ({_package} is not installed): pip install 'hf_ddpm[train]'"
    ) from None

from .dataclass_flags import DataclassArgumentParser, flag_type
from .ddpm.chain import PREDICTION_TYPES, VARIANCE_TYPES, check_decoder_min_std
from .ddpm.elbo import LOSS_TYPES
from .ddpm.guidance import check_guidance_scale
from .ddpm.schedules import BETA_SCHEDULES, MAX_TRAIN_TIMESTEPS, make_betas
from .ddpm.timestep_sampling import TIMESTEP_SAMPLERS, resolve_timestep_sampler
from .guide_snapshot import check_guide_fraction
from .hub.push import check_repo_id
from .models.unet import VDM_FOURIER_FEATURES, coarsest_level_attention, default_unet_layout
from .posthoc_ema import MAX_SIGMA_REL
from .training_budget import WARMUP_STABLE_DECAY
from .training_utils import release_run_locks
from .vdm.noise_schedule import VDM_SCHEDULE_INTERIOR_OBJECTIVES, VDM_SCHEDULE_TYPES

MODELS = ("ddpm", "vae", "vdm")
ARCHITECTURES = ("hf_ddpm", "diffusers_unet2d")
MIN_RESOLUTION, MAX_RESOLUTION = 4, 512
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
# --logger: accelerate's trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS), each with the PyPI package it needs
LOGGER_PACKAGES = {
    "tensorboard": "tensorboard",
    "trackio": "trackio",
    "wandb": "wandb",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "mlflow": "mlflow",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}
LOGGERS = (*LOGGER_PACKAGES, "none")


# ================================================================================================ arguments
#: The cpu recipe's autoguidance w (--guidance_scale), with the EMA of a quarter of the run's steps as the guide:
#: on the 15-minute default (8,772 steps, epyc-zen4-2core, 1,000 samples, seed 0) FD 13.7 and confidence 0.955
#: against 23.9 and 0.920 unguided (benchmarks/README.md, autoguidance.py); the gpu recipe is not measured with it.
CPU_GUIDANCE_SCALE = 2.0


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
        metadata={
            "help": f"DDPM network: {' | '.join(ARCHITECTURES)} (diffusers' UNet2DModel with the same levels and "
            "attention)."
        },
    )
    loss_type: str = field(
        default="hybrid",
        metadata={
            "help": f"DDPM loss: {' | '.join(LOSS_TYPES)}; hybrid_decoder (the cpu recipe's) is hybrid with the "
            "decoder term -log p(x_0 | x_1) training the mean too."
        },
    )
    prediction_type: str = field(default="epsilon", metadata={"help": f"{' | '.join(PREDICTION_TYPES)}."})
    variance_type: str = field(default="learned_range", metadata={"help": f"{' | '.join(VARIANCE_TYPES)}."})
    beta_schedule: str = field(
        default="cosine", metadata={"help": f"{' | '.join(BETA_SCHEDULES)}.", "aliases": ["--ddpm_beta_schedule"]}
    )
    num_train_timesteps: int = field(
        default=1000,
        metadata={
            "help": f"T, the number of diffusion steps, 2 to {MAX_TRAIN_TIMESTEPS:,}.",
            "aliases": ["--ddpm_num_steps"],
        },
    )
    timestep_sampler: str = field(
        default="auto",
        metadata={
            "help": f"auto | {' | '.join(TIMESTEP_SAMPLERS)}; auto = loss-second-moment for vlb (where "
            "improved-diffusion found it pays), decoder-oversampled for hybrid_decoder (its decoder term, 1 image "
            "in T under uniform draws, drawn 1/32 of the time), uniform for simple and hybrid (whose squared error "
            "dominates the per-t loss)."
        },
    )
    decoder_share: float | None = field(
        default=None,
        metadata={
            "help": "decoder-oversampled's share of draws at timestep 0, the decoder's term (default 1/32), in [0, "
            "1); every loss is weighted back to uniform t."
        },
    )
    decoder_min_std: float | None = field(
        default=None,
        metadata={
            "help": "learned_range's smallest standard deviation of the decoder p(x_0 | x_1), the data in [-1, 1] "
            "(default 1/1020, a quarter of half an 8-bit bin), below sqrt(beta_1); improved-diffusion's is "
            "sqrt(beta~_2)."
        },
    )
    snr_gamma: float | None = field(
        default=None,
        metadata={
            "help": "Min-SNR-gamma weighting of the squared error (as diffusers' --snr_gamma); 5 is the paper's value."
        },
    )
    block_out_channels: list[int] | None = field(
        default=None,
        metadata={
            "help": "UNet channels per level (the VAE uses the first two). Default: hf_ddpm.default_unet_layout("
            "--resolution, --channels): one level per size while halving the resolution gives an integer >= 7 "
            "(28: 28, 14, 7; 32: 32, 16, 8; 64: 64, 32, 16, 8), widths b, 2b, 2b, ... with b = 32 for grayscale "
            "and 48 for RGB (28x28x1: 32 64 64), half that for the cpu recipe's DDPM (28x28x1: 16 32 32)."
        },
    )
    layers_per_block: int = field(default=1, metadata={"help": "Residual blocks per UNet level."})
    attention_resolutions: list[int] | None = field(
        default=None,
        metadata={
            "help": "Feature sizes with self-attention (the middle block has it whenever this is non-empty). "
            "Default: the coarsest level only, --resolution / 2^(levels - 1) (28x28: 7; 32x32: 8; 64x64: 8)."
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout in the residual blocks."})
    fourier_features: list[int] | None = field(
        default=None,
        metadata={
            "help": "Exponents n of the Fourier features sin(2^n pi x), cos(2^n pi x) of every pixel concatenated to "
            "the UNet's input (Kingma et al. 2021: they let it resolve the last bits of 8-bit data). Default: "
            f"{' '.join(map(str, VDM_FOURIER_FEATURES))} for the VDM, none for the DDPM."
        },
    )
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
    schedule_interior: str = field(
        default="bound",
        metadata={
            "help": f"VDM with the learned schedule only: {' | '.join(VDM_SCHEDULE_INTERIOR_OBJECTIVES)}, what the "
            "schedule's shape between its endpoints is trained on (the bound, or the variance of the one-sample "
            "diffusion term, as in the VDM paper's appendix; the endpoints always minimise the bound)."
        },
    )
    model_config_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "DDPM with the hf_ddpm architecture only: a DenoisingUNet config (a folder with config.json, "
            "such as a saved pipeline's unet/, or the config.json itself) to build the network from, in place of "
            "the network flags above."
        },
    )


@dataclass
class DataArguments:
    """Where the images come from. With neither --dataset_name nor --train_data_dir: the 60,000 official MNIST training
    digits embedded in hf_ddpm, evaluated on the official test digits."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset (e.g. ylecun/mnist) or a local dataset path."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "The dataset's configuration name.", "aliases": ["--dataset_config_name"]}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where datasets caches downloaded Hub datasets; unset: its own cache."}
    )
    train_data_dir: str | None = field(default=None, metadata={"help": "A folder of images, or of MNIST IDX files."})
    image_column: str | None = field(default=None, metadata={"help": "The image column (auto-detected if not given)."})
    resolution: int = field(default=28, metadata={"help": "Images are resized (and cropped) to this size."})
    channels: int = field(default=1, metadata={"help": "1 (grayscale) or 3 (RGB); images are converted."})
    center_crop: bool = field(default=False, metadata={"help": "Center-crop instead of squashing to a square."})
    random_flip: bool = field(
        default=False, metadata={"help": "Random horizontal flips (off: digits are not symmetric)."}
    )
    max_train_images: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out evaluation data (e.g. a folder of MNIST IDX files); default: the embedded MNIST test "
            "digits when training on the embedded MNIST, else a held-out slice of the training data."
        },
    )
    eval_split: str = field(default="test", metadata={"help": "Split of --eval_data."})
    num_eval_images: int = field(default=256, metadata={"help": "Held-out images for the NLL estimate."})


@dataclass
class TrainingArguments:
    """How to train, evaluate, save and share."""

    output_dir: str = field(
        default="ddpm-mnist", metadata={"help": "Where the pipeline, card, samples and checkpoints go."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow an output_dir that holds a different model."}
    )
    seed: int = field(default=0)
    recipe: str = field(
        default="auto",
        metadata={
            "help": "auto | cpu | gpu: the defaults of the batch size, steps, compilation and logging interval "
            "(RECIPES); auto = gpu where CUDA is available. Explicit flags override the recipe's values."
        },
    )
    train_batch_size: int = field(default=32, metadata={"help": "Images per process per forward pass."})
    eval_batch_size: int = field(default=256)
    train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Train for this many wall-clock minutes on this machine (the cpu recipe: 15): the steps that fit "
            "are chosen from a calibration of this run's own step, logged, and given back by --max_train_steps N."
        },
    )
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps (overrides --num_epochs and --train_minutes)."}
    )
    num_epochs: int | None = field(
        default=None, metadata={"help": "Passes over the data (overrides --train_minutes)."}
    )
    gradient_accumulation_steps: int = field(default=1)
    learning_rate: float = field(default=1e-3)
    lr_scheduler: str = field(
        default="cosine",
        metadata={
            "help": "warmup_stable_decay (warm-up, constant, then a 1 - sqrt decay over the last --lr_decay_fraction "
            "of the steps: a --train_minutes run re-times its own loop and decides its steps when the decay starts) "
            "or a diffusers get_scheduler name (cosine, linear, constant_with_warmup, ...)."
        },
    )
    lr_warmup_steps: int = field(default=100)
    lr_decay_fraction: float = field(
        default=0.4, metadata={"help": "The share of the steps --lr_scheduler warmup_stable_decay decays over."}
    )
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.99)
    adam_weight_decay: float = field(default=0.0)
    adam_epsilon: float = field(default=1e-8)
    max_grad_norm: float = field(default=1.0)
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "auto | no | bf16 | fp16; auto = bf16 where the hardware computes it natively, else no."},
    )
    use_ema: bool = field(default=True)
    ema_inv_gamma: float = field(default=1.0)
    ema_power: float = field(default=0.75)
    ema_max_decay: float = field(default=0.9999)
    posthoc_ema: bool = field(
        default=False,
        metadata={
            "help": "Post-hoc EMA (EDM2): keep --posthoc_ema_snapshots snapshots of two power-function EMAs "
            "(sigma_rel 0.05 and 0.10) in output_dir/posthoc_ema; after training, save the weights with the best "
            "held-out bound among the EMA of every --posthoc_ema_candidates length (reconstructed from the "
            "snapshots) and --use_ema's."
        },
    )
    posthoc_ema_candidates: list[float] = field(
        default_factory=lambda: [0.03, 0.05, 0.07, 0.10, 0.15, 0.20],
        metadata={"help": "The EMA lengths (sigma_rel, the EMA's width relative to training) --posthoc_ema scores."},
    )
    posthoc_ema_snapshots: int = field(
        default=16, metadata={"help": "Snapshots per tracked EMA over the run (--posthoc_ema): the last at its end."}
    )
    checkpointing_steps: int = field(default=1000)
    checkpoints_total_limit: int | None = field(default=2)
    save_pipeline_steps: int | None = field(
        default=None,
        metadata={
            "help": "Also save the EMA weights as a pipeline to output_dir/pipeline-STEP every N steps, never rotated "
            "(a learning curve from one run: hf_ddpm evaluate output_dir/pipeline-STEP)."
        },
    )
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    eval_steps: int = field(default=1000, metadata={"help": "Held-out NLL estimate every N steps (and at the end)."})
    eval_timesteps_per_image: int = field(
        default=8, metadata={"help": "K stratified timesteps per image for the NLL estimate."}
    )
    num_sample_images: int = field(default=64)
    sample_steps: int = field(
        default=100,
        metadata={"help": "Respaced sampling steps for the sample grid.", "aliases": ["--ddpm_num_inference_steps"]},
    )
    guidance_scale: float = field(
        default=1.0,
        metadata={
            "help": "DDPM: autoguidance's w, the saved pipeline's default for sampling (1: none; the cpu recipe's: "
            f"{CPU_GUIDANCE_SCALE:g}): the pipeline keeps the EMA weights of an earlier step as its guide_unet and "
            "samples D_guide + w (D - D_guide). Sampling only: the bound is the model's."
        },
    )
    guide_fraction: float = field(
        default=0.25,
        metadata={
            "help": "The guide's step as a share of the run's steps, in (0, 1] (hf_ddpm.guide_snapshot.guide_step; "
            "a --train_minutes run: of the steps it plans when it gets there)."
        },
    )
    guide_step: int | None = field(
        default=None,
        metadata={"help": "The guide's step itself, instead of --guide_fraction (a run logs the one it took)."},
    )
    logging_steps: int = field(
        default=1,
        metadata={
            "help": "Log (and read the loss back from the device) every N steps; the loss is checked finite then."
        },
    )
    compile: bool | None = field(
        default=None,
        metadata={
            "help": "torch.compile the network's training forward and backward (evaluation stays eager): true, "
            "false, or unset: on where it pays within --train_minutes (one CPU process, the DDPM, float32, "
            "AVX-512 kernels; hf_ddpm.training_budget.compile_pays), the decision logged."
        },
    )
    cuda_graphs: bool = field(
        default=False,
        metadata={
            "help": "On one CUDA GPU, replay the network's training forward and backward as CUDA graphs (no "
            "compilation; the DDPM; off with several processes or gradient accumulation, as the log says)."
        },
    )
    logger: str = field(
        default="tensorboard",
        metadata={"help": f"{' | '.join(LOGGERS)}: an accelerate tracker (trackio: Hugging Face's local-first one)."},
    )
    logging_dir: str = field(default="logs", metadata={"help": "Relative to output_dir."})
    push_to_hub: bool = field(default=False)
    hub_model_id: str | None = field(default=None)
    hub_token: str | None = field(
        default=None, metadata={"help": "Defaults to HF_TOKEN or the login cache; never saved."}
    )
    hub_private_repo: bool = field(default=False)
    push_checkpoints: bool = field(
        default=False,
        metadata={"help": "Also push the EMA pipeline at each checkpoint to checkpoints/step-N in the Hub repo."},
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)
#: Each recipe's defaults (flags and --config values override them). cpu: the 15-minute CPU job, its learning rate
#: constant until a decay over the last 40% of the steps, whose number it decides from its own loop's pace until then
#: (hf_ddpm.training_budget.LateDecidedSteps), the DDPM's decoder term training its mean (hybrid_decoder: -0.09
#: bits/dim at the same samples, benchmarks/README.md); gpu: the same model on 8x the images at a batch that keeps a
#: GPU busy, its step replayed as CUDA graphs (torch.compile costs more than the whole job there), reading the loss
#: back every 100 steps only, with the cosine decay and the hybrid loss it was measured with.
RECIPES = {
    "cpu": {
        "train_batch_size": 32,
        "train_minutes": 15.0,
        "logging_steps": 1,
        "lr_scheduler": WARMUP_STABLE_DECAY,
        "loss_type": "hybrid_decoder",
        "guidance_scale": CPU_GUIDANCE_SCALE,
    },
    "gpu": {"train_batch_size": 512, "max_train_steps": 2000, "cuda_graphs": True, "logging_steps": 100},
}
#: b of the cpu recipe's DDPM widths (b, 2b, 2b, ...) by image channels, half of default_unet_layout's (a quarter
#: of the parameters: 0.30 M for 28x28 digits): in 15 CPU minutes it trains twice the images, and at the images of
#: 15 minutes on a 2-core AVX2-only CPU it samples better (FD 34.7 ± 1.6 against 49.3 ± 1.9, 3 seeds) for +0.015 to
#: +0.021 bits/dim (benchmarks/README.md, quality_per_minute.py). Measured on 28x28 grayscale only; the gpu recipe,
#: the VAE and the VDM keep default_unet_layout's widths.
CPU_DDPM_BASE_WIDTHS = {1: 16, 3: 24}

#: --lr_scheduler's names: hf_ddpm's schedule whose length a budget decides late, and diffusers' get_scheduler's.
LR_SCHEDULERS = (WARMUP_STABLE_DECAY, *(kind.value for kind in SchedulerType))

#: How long a run is: the first of these that is set decides (--max_train_steps, else --num_epochs, else the budget).
RUN_LENGTH_FIELDS = ("max_train_steps", "num_epochs", "train_minutes")


def resolve_recipe(requested: str) -> str:
    """'auto' -> 'gpu' where torch sees CUDA, else 'cpu'; an explicit recipe as it is."""
    if requested != "auto":
        return requested
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


SECRET_FIELDS = ("hub_token",)


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse flags; ``--config FILE.yaml|json`` gives defaults that explicit flags override. Validates choices."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = DataclassArgumentParser(ARGUMENT_CLASSES)
    parser.add_argument("--config", default=None, help="YAML or JSON file of arguments; flags override it.")
    given = parser.given_flags(argv)  # in any spelling: --max-train-steps 5, --recipe=gpu
    values = {}
    if given.get("config") is not None:
        path = Path(given["config"])
        if not path.is_file():
            raise SystemExit(f"--config {path}: no such file.")
        values = read_config(path)
    recipe = given.get("recipe", values.get("recipe", "auto"))
    if recipe not in ("auto", *RECIPES):
        raise SystemExit(f"--recipe must be one of auto, {', '.join(RECIPES)}, got {recipe!r}.")
    defaults = dict(RECIPES[resolve_recipe(recipe)])
    if any(key in values or key in given for key in RUN_LENGTH_FIELDS):  # the user's length replaces the recipe's
        defaults = {key: value for key, value in defaults.items() if key not in RUN_LENGTH_FIELDS}
    parser.set_defaults(**{**defaults, **values})
    model_args, data_args, train_args = parser.parse_into_dataclasses(argv)
    train_args.recipe = resolve_recipe(train_args.recipe)
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
        element, is_list = flag_type(hints[name])  # the type of one value, as the flag reads it
        if value is None:
            if type(None) not in typing.get_args(hints[name]):
                raise SystemExit(f"--config {path}: {name} cannot be null; remove it to keep its default.")
        elif is_list:
            numbers = (int, float) if element is float else (int,)
            if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, numbers) for v in value):
                noun = "numbers" if element is float else "integers"
                raise SystemExit(f"--config {path}: {name} must be a list of {noun}, got {value!r}.")
        elif isinstance(value, (list, dict)):
            raise SystemExit(f"--config {path}: {name} must be a single value, got {value!r}.")
        elif element is bool:
            if not isinstance(value, bool):
                raise SystemExit(f"--config {path}: {name} must be true or false, got {value!r}.")
        elif element is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise SystemExit(f"--config {path}: {name} must be an integer, got {value!r}.")
        elif element is float:
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; argparse converts it, as on the command line
                try:
                    values[name] = float(value)
                    continue
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SystemExit(f"--config {path}: {name} must be a number, got {value!r}.")
        elif element is str and not isinstance(value, str):
            raise SystemExit(f"--config {path}: {name} must be a string, got {value!r}.")
    return values


def validate_arguments(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> None:
    """Reject unknown names and impossible sizes with a message that says what to fix, after filling in the
    network layout left unset (:func:`resolve_unet_layout`)."""
    choices = {
        "--model": (model_args.model, MODELS),
        "--architecture": (model_args.architecture, ARCHITECTURES),
        "--loss_type": (model_args.loss_type, LOSS_TYPES),
        "--prediction_type": (model_args.prediction_type, PREDICTION_TYPES),
        "--variance_type": (model_args.variance_type, VARIANCE_TYPES),
        "--beta_schedule": (model_args.beta_schedule, BETA_SCHEDULES),
        "--noise_schedule": (model_args.noise_schedule, VDM_SCHEDULE_TYPES),
        "--schedule_interior": (model_args.schedule_interior, VDM_SCHEDULE_INTERIOR_OBJECTIVES),
        "--timestep_sampler": (model_args.timestep_sampler, ("auto", *TIMESTEP_SAMPLERS)),
        "--mixed_precision": (train_args.mixed_precision, MIXED_PRECISIONS),
        "--logger": (train_args.logger, LOGGERS),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise SystemExit(f"{flag} {value!r} is not one of: {', '.join(allowed)}.")
    if data_args.channels not in (1, 3):
        raise SystemExit(f"--channels must be 1 (grayscale) or 3 (RGB), got {data_args.channels}.")
    resolve_unet_layout(model_args, data_args, train_args.recipe)
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
            f"(--block_out_channels {model_args.block_out_channels}); use a resolution divisible by "
            f"{2 ** (levels - 1)}."
        )
    if model_args.model == "vae" and (data_args.resolution % 4 or len(model_args.block_out_channels) < 2):
        raise SystemExit(
            "--model vae halves the image twice with the first two --block_out_channels: it needs a --resolution "
            f"divisible by 4 and two widths, got --resolution {data_args.resolution} and --block_out_channels "
            f"{model_args.block_out_channels}."
        )
    if model_args.model == "ddpm" and model_args.variance_type == "learned_range" and model_args.loss_type == "simple":
        raise SystemExit(
            "--loss_type simple does not train a learned variance: use hybrid or vlb, or --variance_type fixed_small."
        )
    learned_vdm = (model_args.model, model_args.noise_schedule) == ("vdm", "learned")
    if model_args.schedule_interior == "variance" and not learned_vdm:
        raise SystemExit(
            "--schedule_interior variance trains a learned noise schedule: use it with --model vdm "
            "--noise_schedule learned."
        )
    if model_args.fourier_features and (model_args.model == "vae" or model_args.architecture == "diffusers_unet2d"):
        raise SystemExit(
            "--fourier_features feeds a DenoisingUNet (--model ddpm --architecture hf_ddpm, or --model vdm); drop it "
            f"for --model {model_args.model} --architecture {model_args.architecture}."
        )
    if model_args.decoder_share is not None:
        sampler = resolve_timestep_sampler(model_args.timestep_sampler, model_args.loss_type)
        if model_args.model != "ddpm" or sampler != "decoder-oversampled":
            raise SystemExit(
                "--decoder_share is the share of --timestep_sampler decoder-oversampled (auto's for --loss_type "
                f"hybrid_decoder) of the DDPM; this run draws timesteps {sampler!r} for --model {model_args.model}."
            )
        if not 0 <= model_args.decoder_share < 1:
            raise SystemExit(f"--decoder_share must be in [0, 1), got {model_args.decoder_share}.")
    if model_args.decoder_min_std is not None:
        if model_args.model != "ddpm" or model_args.variance_type != "learned_range":
            raise SystemExit(
                "--decoder_min_std is the smallest standard deviation of a DDPM's learned_range decoder; this run "
                f"has --model {model_args.model} --variance_type {model_args.variance_type}: drop it."
            )
        first_beta = make_betas(model_args.beta_schedule, model_args.num_train_timesteps)[0]
        try:
            check_decoder_min_std(model_args.decoder_min_std, "learned_range", first_beta)
        except ValueError as error:
            raise SystemExit(f"--{error}") from None
    if any(n < 0 for n in model_args.fourier_features):
        raise SystemExit(f"--fourier_features must be exponents >= 0, got {model_args.fourier_features}.")
    if data_args.dataset_name and data_args.train_data_dir:
        raise SystemExit("Give either --dataset_name or --train_data_dir, not both.")
    if train_args.compile and train_args.cuda_graphs:
        raise SystemExit("--compile and --cuda_graphs both replace the training forward: choose one.")
    if train_args.push_to_hub and not train_args.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id ORG/NAME.")
    check_push_settings(train_args)
    for flag in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "eval_steps",
        "num_eval_images",
        "save_pipeline_steps",
        "logging_steps",
    ):
        value = getattr(train_args if hasattr(train_args, flag) else data_args, flag)
        if value is not None and value <= 0:  # None: an optional one left unset
            raise SystemExit(f"--{flag} must be positive.")
    validate_counts(model_args, data_args, train_args)


def resolve_unet_layout(model_args: ModelArguments, data_args: DataArguments, recipe: str) -> None:
    """Fill in ``--block_out_channels`` and ``--attention_resolutions`` where they are unset (None), in place: the
    widths of :func:`default_widths` (``--resolution``, ``--channels``, the resolved ``recipe``), and self-attention
    at the coarsest level of the widths used, ``--resolution / 2^(levels - 1)`` (the rule's own for its widths).
    Explicit values are kept; everything downstream (the networks, ``training_args.json``, the card) sees concrete
    lists."""
    if model_args.block_out_channels is None:
        if data_args.resolution < 1:
            raise SystemExit(
                f"--resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {data_args.resolution}."
            )
        model_args.block_out_channels = default_widths(
            model_args.model, data_args.resolution, data_args.channels, recipe
        )
    if model_args.attention_resolutions is None:
        levels = len(model_args.block_out_channels)
        model_args.attention_resolutions = list(coarsest_level_attention(data_args.resolution, levels))
    if model_args.fourier_features is None:
        model_args.fourier_features = list(VDM_FOURIER_FEATURES) if model_args.model == "vdm" else []


def default_base_width(model: str, channels: int, recipe: str) -> int | None:
    """b of the default widths (b, 2b, 2b, ...): the cpu recipe's DDPM gets :data:`CPU_DDPM_BASE_WIDTHS`, every
    other network :func:`hf_ddpm.default_unet_layout`'s own (None)."""
    return CPU_DDPM_BASE_WIDTHS[channels] if (model, recipe) == ("ddpm", "cpu") else None


def default_widths(model: str, resolution: int, channels: int, recipe: str) -> list[int]:
    """The ``--block_out_channels`` of :func:`hf_ddpm.default_unet_layout` at :func:`default_base_width`, with a
    second level for the VAE (which halves twice whatever the resolution) where the rule has one."""
    widths = list(default_unet_layout(resolution, channels, default_base_width(model, channels, recipe))[0])
    return widths + [2 * widths[0]] if model == "vae" and len(widths) < 2 else widths


def describe_network_layout(model_args: ModelArguments, data_args: DataArguments, recipe: str) -> str:
    """The network's layout in words, for the start of a run's log: its levels, widths and attention, and whether
    they are the ``recipe``'s default (:func:`default_widths`; on resolved arguments)."""
    if model_args.model_config_name_or_path is not None:
        return f"network from --model_config_name_or_path {model_args.model_config_name_or_path}"
    resolution, channels, model = data_args.resolution, data_args.channels, model_args.model
    widths, attention = list(model_args.block_out_channels), list(model_args.attention_resolutions)
    base_width = default_base_width(model, channels, recipe)
    rule = f"default_unet_layout({resolution}, {channels})"
    if base_width is not None:
        rule = f"default_unet_layout({resolution}, {channels}, {base_width}) of the {recipe} recipe"
    if model == "vae":
        source = rule if widths == default_widths("vae", resolution, channels, recipe) else "--block_out_channels"
        return f"VAE widths {widths[:2]} (the first two of {widths}, {source})"
    default = default_unet_layout(resolution, channels, base_width)
    given = (tuple(widths), tuple(attention)) != default
    source = "--block_out_channels / --attention_resolutions" if given else rule
    sizes = [resolution // 2**level for level in range(len(widths))]
    fourier = f", Fourier features {model_args.fourier_features}" if model_args.fourier_features else ""
    return f"UNet levels {sizes} with widths {widths}, self-attention at {attention}{fourier} ({source})"


def validate_counts(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> None:
    """Every count and range that would otherwise fail only after training (no pipeline, card or log written) or
    do the wrong thing silently; each message names the flag, the allowed range and the value given."""
    at_least_one = {
        "--num_sample_images": train_args.num_sample_images,
        "--eval_batch_size": train_args.eval_batch_size,
        "--layers_per_block": model_args.layers_per_block,
    }
    if model_args.model == "vae":
        at_least_one.update(
            {
                "--latent_dim": model_args.latent_dim,
                "--num_latent_layers": model_args.num_latent_layers,
                "--iwae_samples": model_args.iwae_samples,
            }
        )
    else:
        at_least_one.update(
            {
                "--sample_steps": train_args.sample_steps,
                "--eval_timesteps_per_image": train_args.eval_timesteps_per_image,
            }
        )
    for flag, value in at_least_one.items():
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}.")
    optional = {
        "--max_train_steps": train_args.max_train_steps,
        "--num_epochs": train_args.num_epochs,
        "--checkpoints_total_limit": train_args.checkpoints_total_limit,
    }
    for flag, value in optional.items():
        if value is not None and value < 1:
            raise SystemExit(f"{flag} must be >= 1 or unset, got {value}")
    if all(getattr(train_args, key) is None for key in RUN_LENGTH_FIELDS):
        raise SystemExit("Say how long to train: --train_minutes M, --max_train_steps N or --num_epochs E.")
    minutes = train_args.train_minutes
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise SystemExit(f"--train_minutes must be a finite number > 0 or unset, got {minutes}.")
    if data_args.max_train_images is not None and data_args.max_train_images < 1:
        raise SystemExit(f"--max_train_images must be >= 1 or unset, got {data_args.max_train_images}")
    if min(model_args.block_out_channels, default=0) < 1:
        raise SystemExit(f"--block_out_channels must be positive integers, got {model_args.block_out_channels}.")
    if not (math.isfinite(train_args.learning_rate) and train_args.learning_rate > 0):
        raise SystemExit(f"--learning_rate must be a finite number > 0, got {train_args.learning_rate}.")
    if train_args.lr_warmup_steps < 0:
        raise SystemExit(f"--lr_warmup_steps must be >= 0, got {train_args.lr_warmup_steps}.")
    if train_args.lr_scheduler not in LR_SCHEDULERS:
        raise SystemExit(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {train_args.lr_scheduler!r}.")
    if not 0 < train_args.lr_decay_fraction <= 1:
        raise SystemExit(f"--lr_decay_fraction must be in (0, 1], got {train_args.lr_decay_fraction}.")
    if model_args.model == "ddpm":
        T = model_args.num_train_timesteps
        if T < 2:
            raise SystemExit(f"--num_train_timesteps must be >= 2 (T diffusion steps), got {T}.")
        if T > MAX_TRAIN_TIMESTEPS:
            raise SystemExit(
                f"--num_train_timesteps must be <= {MAX_TRAIN_TIMESTEPS:,} (T diffusion steps), got {T:,}."
            )
        if not 1 <= train_args.sample_steps <= T:
            raise SystemExit(
                f"--sample_steps must be in [1, {T}] (--num_train_timesteps), got {train_args.sample_steps}."
            )
        if not 1 <= train_args.eval_timesteps_per_image <= T - 1:
            raise SystemExit(
                f"--eval_timesteps_per_image must be in [1, {T - 1}] (T - 1 denoising terms), "
                f"got {train_args.eval_timesteps_per_image}."
            )
    if train_args.posthoc_ema:
        check_posthoc_ema(train_args)
    check_autoguidance(train_args)
    if train_args.overwrite_output_dir and train_args.resume_from_checkpoint:
        raise SystemExit(
            "--overwrite_output_dir starts over (it removes the old run's checkpoints): drop it to resume, or drop "
            "--resume_from_checkpoint to start over."
        )
    check_logger(train_args.logger)
    if model_args.model_config_name_or_path is not None:
        if model_args.model != "ddpm" or model_args.architecture != "hf_ddpm":
            raise SystemExit(
                "--model_config_name_or_path builds the DenoisingUNet of --model ddpm --architecture hf_ddpm; for "
                f"--model {model_args.model} --architecture {model_args.architecture} use the network flags instead."
            )
        if not Path(model_args.model_config_name_or_path).exists():
            raise SystemExit(
                f"--model_config_name_or_path {model_args.model_config_name_or_path}: no such folder or config.json."
            )
    check_writable(Path(train_args.output_dir))


def check_autoguidance(train_args: TrainingArguments) -> None:
    """Refuse a --guidance_scale that is not a finite number, a --guide_fraction outside (0, 1] and a --guide_step
    outside the run."""
    try:
        check_guidance_scale(train_args.guidance_scale)
        check_guide_fraction(train_args.guide_fraction)
    except ValueError as error:
        raise SystemExit(f"--{error}") from None
    step, steps = train_args.guide_step, train_args.max_train_steps
    if step is not None and not (step >= 1 and (steps is None or step <= steps)):
        raise SystemExit(f"--guide_step must be a step of the run, in [1, --max_train_steps], got {step}.")


def check_posthoc_ema(train_args: TrainingArguments) -> None:
    """Refuse --posthoc_ema settings that cannot be reconstructed: sigma_rel outside (0, sqrt(1/12)) (the widest
    power-function EMA is the plain average), fewer than 2 snapshots."""
    candidates = train_args.posthoc_ema_candidates
    if not candidates or not all(0 < s < MAX_SIGMA_REL for s in candidates):
        raise SystemExit(
            f"--posthoc_ema_candidates must be EMA lengths sigma_rel in (0, {MAX_SIGMA_REL:.4f}), got {candidates}."
        )
    if train_args.posthoc_ema_snapshots < 2:
        raise SystemExit(f"--posthoc_ema_snapshots must be >= 2, got {train_args.posthoc_ema_snapshots}.")


def check_logger(name: str) -> None:
    """Refuse a --logger whose package is not installed, in one line naming what to install."""
    package = LOGGER_PACKAGES.get(name)
    if package is None:
        return
    if not getattr(accelerate.utils, f"is_{name}_available")():
        other = "none" if name == "tensorboard" else "tensorboard or none"
        raise SystemExit(
            f"--logger {name}: {package} is not installed; pip install {package}, or pass --logger {other}."
        )


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


def check_push_settings(train_args: TrainingArguments) -> None:
    """Refuse, before training starts, push settings that could only fail (or do nothing) after it: an invalid
    ``--hub_model_id`` (huggingface_hub's validator; without a push it still names the model card), a push with no
    token (no ``--hub_token``, ``HF_TOKEN`` or login cache: ``huggingface_hub.get_token``), and
    ``--hub_private_repo`` or ``--push_checkpoints`` without ``--push_to_hub``."""
    if train_args.hub_model_id is not None:
        try:
            check_repo_id(train_args.hub_model_id, "--hub_model_id")
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if train_args.push_to_hub and not (train_args.hub_token or get_token()):
        raise SystemExit(
            "--push_to_hub needs a Hub token and none was found: pass --hub_token, set HF_TOKEN or log in with "
            "hf auth login."
        )
    if not train_args.push_to_hub:
        given = [flag for flag in ("hub_private_repo", "push_checkpoints") if getattr(train_args, flag)]
        if given:
            raise SystemExit(f"--{given[0]} applies to a push: add --push_to_hub --hub_model_id ORG/NAME, or drop it.")


def model_keys() -> list[str]:
    """The arguments that define the model (another value is another model): every :class:`ModelArguments` field,
    and the image size and channels."""
    return [f.name for f in dataclasses.fields(ModelArguments)] + ["resolution", "channels"]


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    """The command-line entry of a training script: ``main(argv)``, with every error as one line
    ``error: <what is wrong and what to do>`` on stderr and a non-zero exit (2 for a bad argument or input, 1 for a
    failure while writing); the traceback only with ``--debug`` or ``HF_DDPM_DEBUG=1``."""
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
    finally:
        release_run_locks()  # the output folder's lock, on every way out of main
    if debug:
        traceback.print_exception(failure)
    print(f"error: {message}", file=sys.stderr)
    return code
