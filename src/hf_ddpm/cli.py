"""hf_ddpm: evaluate, sample from and demo a trained hf_ddpm model (a folder or a Hub repo id ORG/NAME).

examples:
  hf_ddpm evaluate ddpm-mnist --data embedded --split test     # NLL bound in bits/dim on the MNIST test digits
  hf_ddpm evaluate org/ddpm-mnist --data embedded --exact      # the exact bound (all T terms), from the Hub
  hf_ddpm evaluate ddpm-mnist --data embedded --estimator ode  # the probability-flow ODE's NLL (dequantized)
  hf_ddpm sample ddpm-mnist --num_images 64 --steps 100 --out grid.png
  hf_ddpm demo ddpm-mnist                                      # a Gradio app on 127.0.0.1:7860

Add --debug to any command to see the traceback of an error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import PIL.Image
import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from .data import ImageTensorDataset, load_images
from .demo import add_demo_arguments, run_demo
from .evaluation import DEQUANTIZATIONS, ESTIMATORS, BoundOptions, evaluate_bound
from .metrics import MNIST_SHAPE, sample_quality
from .pipelines.auto import default_device, open_pipeline, with_scheduler
from .pipelines.ddpm import DDPM_SCHEDULERS, HFDDPMPipeline
from .pipelines.vae import VAEPipeline
from .pipelines.vdm import VDMPipeline
from .probability_flow import DIVERGENCE_METHODS, PROBE_KINDS, SOLVER_METHODS
from .sampling_speedup import SAMPLING_PRECISIONS, SamplingSpeedup, fast_sampling
from .training_utils import image_grid, require_finite_bound
from .vdm.scheduler import VDM_STEP_TYPES

#: Every --scheduler name: an HFDDPMPipeline's samplers and a VDMPipeline's step types (each pipeline takes its own).
SCHEDULER_NAMES = list(dict.fromkeys([*DDPM_SCHEDULERS, *VDM_STEP_TYPES]))

#: command -> model kind -> the flags that do nothing for it (refused when given: :func:`check_flags_apply`).
INAPPLICABLE_FLAGS = {
    "evaluate": {
        VAEPipeline: (
            *("exact", "steps", "no_clip_denoised", "timesteps_per_image", "estimator"),
            *("sampling_precision", "sampling_compile", "guidance_scale"),
        ),
        HFDDPMPipeline: ("elbo_samples", "iwae_samples"),
        VDMPipeline: ("elbo_samples", "iwae_samples", "guidance_scale"),
    },
    "sample": {
        VAEPipeline: ("scheduler", "steps", "sampling_precision", "sampling_compile", "guidance_scale"),
        VDMPipeline: ("guidance_scale",),
    },
}
#: evaluate's flags of the probability-flow ODE (--estimator ode) and of the variational bound only.
ODE_ONLY_FLAGS = frozenset(
    {
        "ode_divergence",
        "hutchinson_probes",
        "hutchinson_probe",
        "ode_method",
        "ode_rtol",
        "ode_atol",
        "ode_steps",
        "ode_t_min",
        "ode_dequantization",
    }
)
BOUND_ONLY_FLAGS = frozenset({"exact", "timesteps_per_image", "no_clip_denoised"})
#: The fewest times per image of a VDM's estimated bound: its standard error needs two draws
#: (:func:`hf_ddpm.vdm.elbo.continuous_time_bound_estimate`).
VDM_MIN_TIMESTEPS_PER_IMAGE = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each option's default (when it has one), and descriptions kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit code 2."""


def load_pipeline(model: str, revision: str | None, device: str) -> DiffusionPipeline:
    """A pipeline from a local folder or a Hub repo id, of the class its model_index.json names, on ``device``
    (:func:`hf_ddpm.pipelines.auto.open_pipeline`: errors in one line), its progress bars not left behind."""
    pipeline = open_pipeline(model, revision, device)
    pipeline.set_progress_bar_config(leave=False)
    return pipeline


def evaluate(args: argparse.Namespace) -> dict:
    """The NLL bound in bits/dim (:func:`hf_ddpm.evaluation.evaluate_bound`: exact or estimated for diffusion
    models, ELBO and IWAE for VAEs) and, with --num_samples, sample quality."""
    check_counts(
        args,
        ("batch_size", 1),
        ("timesteps_per_image", 1),
        ("num_samples", 0),
        ("max_images", 1),
        ("elbo_samples", 1),
        ("iwae_samples", 1),
        ("steps", 1),
    )
    if args.num_samples and min(args.num_samples, args.max_images or 2) < 2:
        raise UsageError(
            f"--num_samples {args.num_samples} with --max_images {args.max_images}: the sample metrics compare two "
            "covariances, of at least 2 samples and 2 images: raise both, or drop --num_samples."
        )
    for flag in sorted({"sampling_precision", "sampling_compile"} & args.given):
        if not args.num_samples:
            raise UsageError(f"--{flag} applies to the samples of --num_samples; drop it, or add --num_samples.")
    if args.json:
        check_writable_file(Path(args.json), "--json")
    pipeline = load_pipeline(args.model, args.revision, args.device)
    check_flags_apply(args, pipeline)
    try:
        shape = (pipeline.image_channels, pipeline.image_size, pipeline.image_size)
        if args.num_samples and shape != MNIST_SHAPE:
            raise UsageError(
                f"--num_samples: the sample-quality metrics use an MNIST classifier of 1x28x28 digits, and "
                f"{args.model} makes {'x'.join(map(str, shape))} images; drop --num_samples to evaluate the bound "
                "only."
            )
        data = load_images(
            args.data,
            split=args.split,
            max_images=args.max_images,
            resolution=pipeline.image_size,
            channels=pipeline.image_channels,
        )
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--data {args.data}: {error}") from None
    images = ImageTensorDataset(data.images)[:].to(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    options = BoundOptions(
        exact=args.exact,
        timesteps_per_image=args.timesteps_per_image,
        elbo_samples=args.elbo_samples,
        iwae_samples=args.iwae_samples,
        clip_denoised=not args.no_clip_denoised,
        estimator=args.estimator,
        ode_divergence=args.ode_divergence,
        hutchinson_probes=args.hutchinson_probes,
        hutchinson_probe=args.hutchinson_probe,
        ode_method=args.ode_method,
        ode_rtol=args.ode_rtol,
        ode_atol=args.ode_atol,
        ode_steps=args.ode_steps,
        ode_t_min=args.ode_t_min,
        ode_dequantization=args.ode_dequantization,
    )
    pipeline.set_progress_bar_config(disable=True)
    bound = evaluate_bound(
        pipeline,
        images,
        options,
        batch_size=args.batch_size,
        generator=generator,
        progress=lambda batches: tqdm(batches, desc="bound", leave=False),
    )
    require_finite_bound(bound, "no result was written")
    result = {"model": args.model, "data": data.source, **bound.to_dict()}
    return add_sample_quality(result, pipeline, images, args, generator)


def sampling_call(pipeline: DiffusionPipeline, args: argparse.Namespace) -> dict:
    """Arguments of the pipeline's call: the ``--steps`` of a pipeline that samples with a scheduler (a diffusion
    model), none for one without (a VAE); ``--guidance_scale`` where given (a DDPM's autoguidance)."""
    call = {"num_inference_steps": args.steps} if pipeline.scheduler_choices else {}
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    return call


def add_sample_quality(
    result: dict, pipeline, images: torch.Tensor, args: argparse.Namespace, generator: torch.Generator
) -> dict:
    """With ``--num_samples``, the sample-quality metrics of that many samples against ``images``."""
    if args.num_samples:
        call = sampling_call(pipeline, args)
        with sped_up_sampling(pipeline, args.num_samples * call.get("num_inference_steps", 1), args) as speedup:
            start = time.perf_counter()
            samples = pipeline(batch_size=args.num_samples, generator=generator, output_type="pt", **call).images
            seconds = time.perf_counter() - start
        quality = sample_quality(samples.cpu() * 2 - 1, images.cpu())
        result["sample_quality"] = {
            **vars(quality),
            "metric": "Fréchet distance in hf_ddpm's MNIST-classifier features (not Inception-FID)",
            "sampling": {**vars(speedup), "seconds": seconds} if speedup else {"seconds": seconds},
        }
    return result


@contextlib.contextmanager
def sped_up_sampling(pipeline, image_forwards: int, args: argparse.Namespace) -> Iterator[SamplingSpeedup | None]:
    """:func:`hf_ddpm.sampling_speedup.fast_sampling` with ``--sampling_precision`` and ``--sampling_compile``,
    its decision printed on stderr."""
    compile = {"auto": None, "true": True, "false": False}[args.sampling_compile]
    with fast_sampling(pipeline, image_forwards, args.sampling_precision, compile) as speedup:
        if speedup is not None:
            print(f"note: {speedup.reason}", file=sys.stderr)
        yield speedup


def flags_given(argv: list[str]) -> set[str]:
    """The names of the ``--flags`` written on the command line ``argv`` (``--steps 5`` and ``--steps=5`` alike),
    as opposed to those left at their defaults."""
    return {word[2:].split("=", 1)[0] for word in argv if word.startswith("--")}


def check_flags_apply(args: argparse.Namespace, pipeline: object) -> None:
    """Refuse (UsageError), after loading the model and before any data or work, a flag given on the command line
    (``args.given``) that does nothing for this model kind (:data:`INAPPLICABLE_FLAGS`), ``--timesteps_per_image``
    with ``--exact`` (which sums every step), and a VDM's ``--timesteps_per_image`` below
    :data:`VDM_MIN_TIMESTEPS_PER_IMAGE`."""
    kind = type(pipeline)
    for flag in INAPPLICABLE_FLAGS[args.command].get(kind, ()):
        if flag in args.given:
            raise UsageError(f"--{flag} does not apply to {args.model}, a {kind.__name__}; drop it.")
    if args.guidance_scale is not None and isinstance(pipeline, HFDDPMPipeline):
        try:
            pipeline.check_guidance(args.guidance_scale)
        except ValueError as error:
            raise UsageError(f"--{error}") from None
    if args.command != "evaluate":
        return
    ode = args.estimator == "ode"
    for flag in sorted(args.given & (BOUND_ONLY_FLAGS if ode else ODE_ONLY_FLAGS)):
        needs = "the bound (--estimator bound)" if ode else "--estimator ode"
        raise UsageError(f"--{flag} applies only to {needs}; drop it.")
    if args.exact and "timesteps_per_image" in args.given:
        raise UsageError("--timesteps_per_image does not apply with --exact, which sums every timestep; drop one.")
    if kind is VDMPipeline and not args.exact and args.timesteps_per_image < VDM_MIN_TIMESTEPS_PER_IMAGE:
        raise UsageError(
            f"--timesteps_per_image must be >= {VDM_MIN_TIMESTEPS_PER_IMAGE} for a VDMPipeline (the standard error of "
            f"its estimated bound needs two draws per image), got {args.timesteps_per_image}."
        )


def check_counts(args: argparse.Namespace, *minimums: tuple[str, int]) -> None:
    """Refuse (UsageError) a count below its minimum, before any work: ``(name, minimum)`` pairs; None is unset."""
    for name, minimum in minimums:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise UsageError(f"--{name} must be >= {minimum}, got {value}.")


def check_writable_file(path: Path, flag: str) -> None:
    """Refuse (UsageError) a file path that cannot be written: a folder, under a file, or without permission."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name.")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not a writable folder; choose another path.")


def is_image_file(out: Path) -> bool:
    """True when ``out``'s suffix is an image format PIL can write (``.png``, ``.jpg``, ``.webp``, ...)."""
    PIL.Image.init()
    format_name = PIL.Image.registered_extensions().get(out.suffix.lower())
    return format_name is not None and format_name in PIL.Image.SAVE


def sample(args: argparse.Namespace) -> Path:
    """Draw images and write a grid image (any suffix PIL can write: .png, .jpg, ...), or one PNG per image into a
    folder (a path without an image suffix)."""
    check_counts(args, ("num_images", 1), ("batch_size", 1), ("steps", 1))
    out = Path(args.out)
    if is_image_file(out):
        check_writable_file(out, "--out")
        existing = [out] if out.exists() else []
    elif out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file without an image suffix; give a .png/.jpg grid or a folder.")
    else:
        check_writable_file(out / "00000.png", "--out")
        existing = [
            out / f"{index:05d}.png" for index in range(args.num_images) if (out / f"{index:05d}.png").exists()
        ]
    if existing and not args.overwrite:
        names = ", ".join(p.name for p in existing[:3]) + (
            f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        )
        raise UsageError(
            f"--out {out}: {names} already exist(s); pass --overwrite to replace, or choose another --out."
        )
    pipeline = load_pipeline(args.model, args.revision, args.device)
    check_flags_apply(args, pipeline)
    call = sampling_call(pipeline, args)
    if args.scheduler != "vdm":  # vdm: the model's own sampler, as saved
        try:
            pipeline = with_scheduler(pipeline, args.scheduler)
        except ValueError as error:
            raise UsageError(f"--{error}") from None
        if str(pipeline.scheduler.config.get("variance_type", "")).startswith("learned") and args.scheduler != "ddpm":
            print(
                f"note: {args.scheduler} ignores the model's learned variance (it uses the predicted noise only)",
                file=sys.stderr,
            )
    generator = torch.Generator().manual_seed(args.seed)
    images = []
    with sped_up_sampling(pipeline, args.num_images * call.get("num_inference_steps", 1), args):
        for start in range(0, args.num_images, args.batch_size):
            count = min(args.batch_size, args.num_images - start)
            images += pipeline(batch_size=count, generator=generator, **call).images
    if is_image_file(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(images)
        if grid.mode not in ("L", "RGB") and out.suffix.lower() in (".jpg", ".jpeg"):
            grid = grid.convert("RGB")
        grid.save(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(out / f"{index:05d}.png")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf_ddpm", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"hf_ddpm {importlib.metadata.version('hf_ddpm')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{evaluate,sample,demo}")
    summaries = {"evaluate": "the likelihood bound in bits/dim (and sample quality)", "sample": "draw images"}
    descriptions = {
        "evaluate": "The negative log-likelihood bound of a model in bits/dim on a set of images, exact or estimated\n"
        "from a few timesteps per image, with its standard error; for a VAE also the IWAE bound.\n"
        "With --num_samples, also the quality of that many samples.",
        "sample": "Draw images from a model and write them as one grid image or as one PNG per image.",
    }
    for name, description in descriptions.items():
        command = commands.add_parser(
            name, help=summaries[name], description=description, formatter_class=HelpFormatter
        )
        command.add_argument(
            "model", help="a folder written by save_pretrained or train.py, or a Hub repo id ORG/NAME"
        )
        command.add_argument("--revision", default=None, help="Hub revision: a branch, tag or commit")
        command.add_argument("--seed", type=int, default=0, help="random seed of the noise and the timesteps")
        command.add_argument("--device", default=default_device(), help="torch device to run on")
        command.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
        command.add_argument("--steps", type=int, default=100, help="sampling steps (respaced; diffusion models)")
        command.add_argument(
            "--sampling_precision",
            choices=SAMPLING_PRECISIONS,
            default="auto",
            help="the network's precision while sampling (the sampler's arithmetic stays float32): auto = bf16 where "
            "the device computes it natively (AVX512-BF16, AMX, CUDA with bf16), else fp32",
        )
        command.add_argument(
            "--guidance_scale",
            type=float,
            default=None,
            help="DDPM: autoguidance's w with the pipeline's guide_unet (1: the model alone); default the "
            "pipeline's own (model_index.json's guidance_scale)",
        )
        command.add_argument(
            "--sampling_compile",
            choices=("auto", "true", "false"),
            default="auto",
            help="torch.compile the network for sampling; auto: on a CPU where the compilation pays for itself "
            "within the images x steps asked for (hf_ddpm.sampling_speedup)",
        )
    evaluate_parser = commands.choices["evaluate"]
    evaluate_parser.add_argument(
        "--data",
        required=True,
        help="'embedded' (the MNIST digits shipped with hf_ddpm), a folder of MNIST IDX files or images, a data "
        "file, or a Hub dataset id such as ylecun/mnist",
    )
    evaluate_parser.add_argument("--split", default="test", help="split of --data")
    evaluate_parser.add_argument("--max_images", type=int, default=None, help="use only the first N images")
    evaluate_parser.add_argument("--exact", action="store_true", help="all T terms (T network evaluations per image)")
    evaluate_parser.add_argument(
        "--no_clip_denoised",
        action="store_true",
        help="DDPM and VDM: the bound with the unclipped data estimate (default: clipped to [-1, 1], as sampled)",
    )
    evaluate_parser.add_argument(
        "--timesteps_per_image", type=int, default=8, help="stratified timesteps per image of the estimated bound"
    )
    evaluate_parser.add_argument(
        "--num_samples", type=int, default=0, help="samples for the sample-quality metrics (0: skip)"
    )
    evaluate_parser.add_argument("--json", default=None, help="also write the results to this file")
    evaluate_parser.add_argument(
        "--elbo_samples", type=int, default=1, help="VAE: Monte-Carlo samples of z for the ELBO"
    )
    evaluate_parser.add_argument("--iwae_samples", type=int, default=64, help="VAE: K of the IWAE bound")
    evaluate_parser.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="bound",
        help="'bound': the variational bound; 'ode' (DDPM, VDM): the probability-flow ODE's log-likelihood of "
        "uniformly dequantized images, a bound on the discrete NLL of the ODE's model",
    )
    evaluate_parser.add_argument(
        "--ode_divergence", choices=DIVERGENCE_METHODS, default="hutchinson", help="ODE: the drift's divergence"
    )
    evaluate_parser.add_argument("--hutchinson_probes", type=int, default=1, help="ODE: Hutchinson probes per image")
    evaluate_parser.add_argument("--hutchinson_probe", choices=PROBE_KINDS, default="rademacher", help="ODE: probes")
    evaluate_parser.add_argument(
        "--ode_method", choices=SOLVER_METHODS, default="dopri5", help="ODE: adaptive Dormand-Prince or fixed steps"
    )
    evaluate_parser.add_argument("--ode_rtol", type=float, default=1e-5, help="ODE: relative tolerance (dopri5)")
    evaluate_parser.add_argument("--ode_atol", type=float, default=1e-5, help="ODE: absolute tolerance (dopri5)")
    evaluate_parser.add_argument("--ode_steps", type=int, default=100, help="ODE: steps of --ode_method fixed")
    evaluate_parser.add_argument(
        "--ode_t_min",
        type=float,
        default=None,
        help="ODE: start time (default: the model's earliest, the VDM's 0, a DDPM's 1/T)",
    )
    evaluate_parser.add_argument(
        "--ode_dequantization",
        choices=DEQUANTIZATIONS,
        default="uniform",
        help="ODE: 8-bit images spread over their bins uniformly, or by the noise of t_min cut to the bin",
    )
    sample_parser = commands.choices["sample"]
    sample_parser.add_argument("--num_images", type=int, default=64, help="how many images to draw")
    sample_parser.add_argument(
        "--scheduler",
        default="vdm",
        metavar="{" + ",".join(DDPM_SCHEDULERS) + "}",
        help="vdm: the model's own sampler; ddpm, ddim, dpm: diffusers' schedulers built from its config (a VDM: "
        f"{' or '.join(VDM_STEP_TYPES)} steps)",
    )
    sample_parser.add_argument(
        "--out", default="samples.png", help="a grid image (.png, .jpg, ...), or a folder for one PNG per image"
    )
    sample_parser.add_argument("--overwrite", action="store_true", help="replace images already at --out")
    demo_help = "a Gradio app to sample, watch the denoising and score digits (needs pip install 'hf_ddpm[demo]')"
    add_demo_arguments(
        commands.add_parser(
            "demo",
            help="a Gradio app to sample, watch the denoising and score digits",
            description=demo_help[0].upper() + demo_help[1:] + ".",
            formatter_class=HelpFormatter,
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; every error is one line ``hf_ddpm: error: <what and what to do>`` on stderr (exit 2 for a
    usage error, 1 otherwise), with the traceback only under ``--debug`` or ``HF_DDPM_DEBUG=1``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HF_DDPM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return run_command(argv)
    except (UsageError, ValueError, OSError) as error:
        if debug:
            traceback.print_exception(error)
        message = " ".join(str(error).split())
        if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
            message = f"{error.filename}: {message}"
        print(f"hf_ddpm: error: {message}", file=sys.stderr)
        return 2 if isinstance(error, (UsageError, FileNotFoundError, NotADirectoryError, ValueError)) else 1


def run_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.given = flags_given(argv)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "sample":
        if args.scheduler not in SCHEDULER_NAMES:
            raise UsageError(f"--scheduler {args.scheduler!r} is not one of: {', '.join(SCHEDULER_NAMES)}.")
        print(f"wrote {sample(args)}")
        return 0
    result = evaluate(args)
    terms = ", ".join(f"{name} {value:.4f}" for name, value in result["terms"].items())
    print(
        f"NLL {result['bits_per_dim']:.4f} ± {result['standard_error']:.4f} bits/dim on {result['num_images']} "
        f"images of {result['data']} "
        f"({result['estimator']}): {terms}"
    )
    if "iwae_bits_per_dim" in result:
        print(f"IWAE bound {result['iwae_bits_per_dim']:.4f} ± {result['iwae_standard_error']:.4f} bits/dim")
    if "sample_quality" in result:
        q = result["sample_quality"]
        print(
            f"samples: Fréchet distance {q['frechet_distance']:.3f} (MNIST-classifier features, not Inception-FID), "
            f"confidence {q['mean_confidence']:.3f}, class KL from uniform {q['class_kl_from_uniform']:.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
