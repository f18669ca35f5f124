"""``hf_ddpm demo MODEL``: a Gradio app for a trained pipeline, to run locally or as a Hugging Face Space.

    hf_ddpm demo ddpm-mnist                      # a folder written by save_pretrained, served on 127.0.0.1:7860
    hf_ddpm demo org/ddpm-mnist --revision main  # a Hub repo
    hf_ddpm demo org/ddpm-mnist --export_space space/   # write app.py, requirements.txt, README.md for a Space

For an :class:`HFDDPMPipeline` the app has three tabs: **Sample** (a grid of images drawn with the model's
HFDDPMScheduler or diffusers' DDPM / DDIM / DPM-Solver schedulers built from its config: the pipeline's
``scheduler_choices``, as the CLI's ``--scheduler``), **Trajectory** (x_t and the predicted x_0 at evenly spaced
steps of one reverse chain, recorded by the pipeline's ``callback_on_step_end``) and **Score** (the bits/dim of a
drawn or uploaded digit, with the terms of the bound). A :class:`VDMPipeline` (continuous time) gets the same three
tabs, its chain's steps ancestral or DDIM-like (:class:`VDMContinuousScheduler`'s ``step_type``) on the grid
t_i = i / n. A :class:`VAEPipeline` gets Sample (no steps or scheduler) and Score.

Gradio is an optional dependency (``pip install 'hf_ddpm[demo]'``), imported only by the functions that need it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import PIL.Image
import torch

from . import HFDDPMPipeline, VAEPipeline, VDMPipeline, __version__
from .distributions import nats_to_bits_per_dim
from .hub.push import check_repo_id
from .image_utils import images_to_tensor, model_range_to_output
from .pipelines.auto import default_device, open_pipeline, with_scheduler
from .pipelines.vdm import VDM_EXACT_BOUND_STEPS

if TYPE_CHECKING:
    import gradio

GRADIO_MISSING = "the demo needs gradio: pip install 'hf_ddpm[demo]'"
#: The longest chain the sliders offer a VDMPipeline (any n works in continuous time).
VDM_MAX_STEPS = 1000
#: Frames of the Trajectory tab (fewer when the chain is shorter).
TRAJECTORY_FRAMES = 8
#: Images are shown enlarged by an integer factor (nearest neighbour) to about this many pixels a side.
DISPLAY_PIXELS = 112
#: A drawn digit is scaled to fit a box of this fraction of the image, as MNIST's digits fit 20x20 of 28x28.
DIGIT_BOX_FRACTION = 20 / 28
#: Pixels at least this bright (after inversion) count as ink when finding a drawn digit's bounding box.
INK_THRESHOLD = 64
#: Monte-Carlo draws of z for a VAE's ELBO in the Score tab.
VAE_ELBO_SAMPLES = 16


#: The pipelines whose Sample and Trajectory tabs run a reverse chain; and every pipeline the demo shows.
DiffusionPipelines = HFDDPMPipeline | VDMPipeline
DemoPipelines = HFDDPMPipeline | VDMPipeline | VAEPipeline


class TrajectoryFrame(NamedTuple):
    """One recorded step of a reverse chain: the timestep t (an integer of a discrete chain, or the time in (0, 1]
    of a continuous-time VDM), x_t and the predicted x_0 (the pipeline's ``pred_original_sample``), both (H, W, C)
    float arrays in [0, 1] (x_t clipped to the data range for display)."""

    timestep: int | float
    noisy: np.ndarray
    predicted_original: np.ndarray


def import_gradio() -> ModuleType:
    """The ``gradio`` module; raises ``ImportError`` with the one-line install hint if it is not installed."""
    try:
        import gradio
    except ImportError:
        raise ImportError(GRADIO_MISSING) from None
    return gradio


def load_for_demo(model: str, revision: str | None) -> DemoPipelines:
    """Load ``model`` (a folder written by ``save_pretrained`` or a Hub repo id ORG/NAME at ``revision``) with the
    pipeline class its ``model_index.json`` names, on the GPU when there is one
    (:func:`hf_ddpm.pipelines.auto.open_pipeline`: a ``ValueError`` of one line when it cannot be loaded)."""
    return open_pipeline(model, revision, default_device())


def max_steps(pipeline: DiffusionPipelines) -> int:
    """The longest reverse chain the sliders offer: T of a discrete chain (its scheduler's
    ``num_train_timesteps``), :data:`VDM_MAX_STEPS` in continuous time."""
    return pipeline.scheduler.config.get("num_train_timesteps", VDM_MAX_STEPS)


def display_scale(sample_size: int) -> int:
    """The integer factor by which the app enlarges images of ``sample_size`` pixels a side (28 -> 4)."""
    return max(1, round(DISPLAY_PIXELS / sample_size))


def _to_pil(images: np.ndarray, scale: int) -> PIL.Image.Image:
    """(H, W, C) floats in [0, 1] -> a PIL image ("L" for C = 1), rounded as diffusers' ``numpy_to_pil`` rounds and
    enlarged ``scale`` times with nearest-neighbour pixels."""
    pixels = (images * 255).round().astype(np.uint8)
    image = PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    return image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)


def image_grid(images: np.ndarray, scale: int) -> PIL.Image.Image:
    """(N, H, W, C) floats in [0, 1] -> one image: ceil(sqrt(N)) columns, as many rows as needed (the last row
    padded with black), enlarged ``scale`` times."""
    count, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * height, columns * width, channels), dtype=images.dtype)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    return _to_pil(grid, scale)


def sample_images(
    pipeline: DemoPipelines,
    num_images: int,
    seed: int,
    scheduler: str | None = None,
    num_inference_steps: int = 100,
) -> np.ndarray:
    """``num_images`` samples, (N, H, W, C) floats in [0, 1], drawn with ``torch.Generator().manual_seed(seed)``.
    ``scheduler`` (default: the first of the pipeline's ``scheduler_choices``, the model's own) and
    ``num_inference_steps`` apply to the pipelines that sample with a scheduler only
    (see :func:`hf_ddpm.pipelines.auto.with_scheduler`)."""
    generator = torch.Generator().manual_seed(seed)
    if not pipeline.scheduler_choices:
        return pipeline(batch_size=num_images, generator=generator, output_type="np").images
    sampler = with_scheduler(pipeline, scheduler or next(iter(pipeline.scheduler_choices)))
    call = {"batch_size": num_images, "generator": generator, "num_inference_steps": num_inference_steps}
    return sampler(**call, output_type="np").images


def denoising_trajectory(
    pipeline: DiffusionPipelines,
    scheduler: str,
    num_inference_steps: int,
    seed: int,
    num_frames: int = TRAJECTORY_FRAMES,
) -> list[TrajectoryFrame]:
    """Run one reverse chain of ``num_inference_steps`` steps from x_T ~ N(0, I) (``seed``), the pipeline's own
    ``__call__`` with the sampler ``scheduler``, and record x_t and the predicted x_0 (through its
    ``callback_on_step_end``) at ``min(num_frames, steps)`` evenly spaced steps, the first and the last included."""
    steps = []

    def record(pipe: DiffusionPipelines, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        x_t, x_0 = (callback_kwargs[name] for name in ("sample", "pred_original_sample"))
        steps.append(TrajectoryFrame(timestep.item(), *(model_range_to_output(x, "np")[0] for x in (x_t, x_0))))
        return {}

    with_scheduler(pipeline, scheduler)(
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=num_inference_steps,
        output_type="np",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["sample", "pred_original_sample"],
    )
    positions = np.linspace(0, len(steps) - 1, min(num_frames, len(steps))).round().astype(int)
    return [steps[position] for position in sorted(set(positions.tolist()))]


def to_model_image(image: PIL.Image.Image, sample_size: int, channels: int) -> np.ndarray:
    """A drawn or uploaded image as the model's input: uint8 (H, W) for one channel, (H, W, 3) for three.

    Transparent pixels count as white paper. For a one-channel (MNIST-like) model the image is made grayscale and,
    when it is dark-on-light (median above mid-gray: a pen drawing or a scan), inverted, so that strokes are white
    on black as in MNIST. An image already ``sample_size`` pixels a side is used as it is (an MNIST digit scores as
    in evaluation); any other is framed as MNIST frames its digits: the bounding box of the ink (pixels of at
    least :data:`INK_THRESHOLD`) is scaled to fit :data:`DIGIT_BOX_FRACTION` of the image (20x20 of 28x28) and
    placed with its centre of mass at the centre. Three-channel images are only resized. Raises ``ValueError`` for
    a blank image.
    """
    if "A" in image.getbands():
        paper = PIL.Image.new("RGBA", image.size, "white")
        image = PIL.Image.alpha_composite(paper, image.convert("RGBA"))
    if channels == 3:
        return np.asarray(image.convert("RGB").resize((sample_size, sample_size), PIL.Image.BICUBIC))
    if channels != 1:
        raise ValueError(f"The demo scores images of 1 or 3 channels, the model has {channels}.")
    gray = np.asarray(image.convert("L"))
    if np.median(gray) > 127:
        gray = 255 - gray
    if gray.shape == (sample_size, sample_size):
        return gray
    ys, xs = np.nonzero(gray >= INK_THRESHOLD)
    if not len(ys):
        raise ValueError("The image is blank: draw or upload a digit.")
    ink = gray[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    box = sample_size * DIGIT_BOX_FRACTION
    factor = box / max(ink.shape)
    width, height = (max(1, round(side * factor)) for side in (ink.shape[1], ink.shape[0]))
    digit = np.asarray(PIL.Image.fromarray(ink).resize((width, height), PIL.Image.LANCZOS))
    weights = digit / max(digit.sum(), 1)
    rows, columns = np.indices(digit.shape)
    top = int(np.clip(round(sample_size / 2 - (rows * weights).sum()), 0, sample_size - height))
    left = int(np.clip(round(sample_size / 2 - (columns * weights).sum()), 0, sample_size - width))
    framed = np.zeros((sample_size, sample_size), dtype=np.uint8)
    framed[top : top + height, left : left + width] = digit
    return framed


def score_image(pipeline: DemoPipelines, image: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The negative ELBO of one image in bits/dim and its terms, which add up to it.

    Args:
        pipeline: an HFDDPMPipeline (exact bound: all T terms, T network calls), a VDMPipeline (its ``elbo``: the
            discrete-time bound at T = 1000, every step summed) or a VAEPipeline (ELBO with
            :data:`VAE_ELBO_SAMPLES` draws of z).
        image: uint8 (H, W) or (H, W, C) of the model's size and channels (see :func:`to_model_image`).
        seed: for the draws of x_t (diffusion) or z (VAE).

    Returns:
        ``bits_per_dim`` and the terms in bits/dim: ``prior_term``, ``denoising_terms`` and
        ``reconstruction_term`` for a DDPM; ``prior_term``, ``diffusion_term`` and ``reconstruction_term`` for a
        VDM; ``reconstruction_term``, ``kl_term`` (top prior matching) and ``layer_1_term`` ...
        ``layer_{L-1}_term`` for a VAE with L latent layers.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = np.asarray(image)[None]
    if not isinstance(pipeline, VAEPipeline):  # a diffusion model: its elbo, every term of its bound
        bound = pipeline.elbo(batch, generator=generator)
        names = {"denoising": "denoising_terms"}  # the DDPM's T - 1 denoising terms, summed
        return {"bits_per_dim": float(bound.per_image[0])} | {
            names.get(name, f"{name}_term"): float(values[0]) for name, values in bound.per_image_terms.items()
        }
    # the VAE's terms layer by layer, which its bound (reconstruction and all KL terms) sums: the model's ELBO
    x = images_to_tensor(batch, pipeline.image_channels).to(pipeline.device)
    with torch.no_grad():
        elbo = pipeline.vae.elbo(x, num_samples=VAE_ELBO_SAMPLES, generator=generator)
    dims = batch[0].size
    terms = {"reconstruction_term": elbo.reconstruction_nats[0], "kl_term": elbo.kl_nats[0]}
    terms |= {f"layer_{layer}_term": nats for layer, nats in enumerate(elbo.layer_nats[0], start=1)}
    bits = {name: float(nats_to_bits_per_dim(nats.double(), dims)) for name, nats in terms.items()}
    return {"bits_per_dim": math.fsum(bits.values()), **bits}


def build_demo(pipeline: DemoPipelines) -> gradio.Blocks:
    """The Gradio app for ``pipeline``; launch it with ``.launch()``.

    Its API endpoints: ``/sample`` (steps, scheduler, seed, number of images -> grid; for a VAE: seed, number of
    images -> grid), ``/trajectory`` (steps, scheduler, seed -> gallery of x_t | predicted x_0 frames; diffusion
    only) and ``/score`` (image editor value -> the scored model input and :func:`score_image`'s dict).
    Analytics are off: the app contacts nothing but its own clients.
    """
    gr = import_gradio()
    is_vae = not pipeline.scheduler_choices
    size, channels = pipeline.image_size, pipeline.image_channels
    scale = display_scale(size)
    name = pipeline.name_or_path or type(pipeline).__name__
    grayscale = channels == 1  # an MNIST-like model scores digits; a colour one, colour images
    subject = "a digit" if grayscale else "an image"

    # A handler's ``progress=gr.Progress(track_tqdm=True)`` makes gradio show the pipeline's tqdm bars in the page.
    if is_vae:

        def sample(seed: float, num_images: float) -> PIL.Image.Image:
            return image_grid(sample_images(pipeline, int(num_images), int(seed)), scale)

    else:

        def sample(
            steps: float, scheduler: str, seed: float, num_images: float, progress=gr.Progress(track_tqdm=True)
        ) -> PIL.Image.Image:
            return image_grid(sample_images(pipeline, int(num_images), int(seed), scheduler, int(steps)), scale)

    def trajectory(
        steps: float, scheduler: str, seed: float, progress=gr.Progress(track_tqdm=True)
    ) -> list[tuple[PIL.Image.Image, str]]:
        frames = denoising_trajectory(pipeline, scheduler, int(steps), int(seed))
        pairs = ((np.concatenate([f.noisy, f.predicted_original], axis=1), f.timestep) for f in frames)
        return [(_to_pil(pair, scale), f"t = {timestep:.4g}") for pair, timestep in pairs]

    def score(drawing: dict | None, progress=gr.Progress(track_tqdm=True)) -> tuple[PIL.Image.Image, dict[str, float]]:
        images = [] if drawing is None else [drawing["composite"], drawing["background"]]
        image = next((image for image in images if image is not None), None)
        if image is None:
            raise gr.Error(f"Draw or upload {subject} first.")
        try:
            model_image = to_model_image(image, size, channels)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        shown = model_image[..., None] if model_image.ndim == 2 else model_image
        return _to_pil(shown / 255.0, scale), score_image(pipeline, model_image)

    def chain_controls() -> list:
        steps_max, names = max_steps(pipeline), list(pipeline.scheduler_choices)
        if isinstance(pipeline, VDMPipeline):
            steps_label = "steps n (the grid t_i = i / n of continuous time)"
            info = "ancestral: z_s ~ p(z_s | z_t); ddim: deterministic, z_s = alpha_s x_hat + sigma_s eps_hat"
        else:
            steps_label = "steps (respaced reverse chain)"
            info = "vdm: the model's own; ddpm, ddim, dpm: diffusers' schedulers from its config"
        return [
            gr.Slider(1, steps_max, value=min(100, steps_max), step=1, label=steps_label),
            gr.Radio(names, value=names[0], label="scheduler", info=info),
        ]

    with gr.Blocks(title=f"hf_ddpm: {name}", analytics_enabled=False) as demo:
        kind = (
            "variational autoencoder"
            if is_vae
            else "continuous-time variational diffusion model"
            if isinstance(pipeline, VDMPipeline)
            else "denoising diffusion model"
        )
        gr.Markdown(f"# {name}\nA {kind} ({size}x{size}, {channels} channel(s)), served by hf_ddpm.")
        with gr.Tab("Sample"):
            controls = [] if is_vae else chain_controls()
            seed = gr.Number(0, precision=0, label="seed")
            count = gr.Slider(1, 64, value=16, step=1, label="number of images")
            button = gr.Button("Sample", variant="primary", elem_id="sample-button")
            grid = gr.Image(type="pil", format="png", label="samples", elem_id="samples")
            button.click(sample, [*controls, seed, count], grid, api_name="sample")
        if not is_vae:
            with gr.Tab("Trajectory"):
                gr.Markdown(
                    f"One reverse chain: each frame shows x_t (left) and the predicted x_0 "
                    f"(right) at {TRAJECTORY_FRAMES} evenly spaced steps."
                )
                controls = chain_controls()
                seed = gr.Number(0, precision=0, label="seed")
                button = gr.Button("Run the chain", variant="primary")
                frames = gr.Gallery(label="x_t | predicted x_0", columns=4, format="png")
                button.click(trajectory, [*controls, seed], frames, api_name="trajectory")
        with gr.Tab("Score"):
            if is_vae:
                cost = f"the ELBO with {VAE_ELBO_SAMPLES} samples of z"
            elif isinstance(pipeline, VDMPipeline):
                steps = VDM_EXACT_BOUND_STEPS
                cost = f"the discrete-time bound at T = {steps}, every step summed, costs {steps} network calls"
            else:
                cost = f"the exact bound costs {pipeline.scheduler.config.num_train_timesteps} network calls"
            framing = (
                "A dark-on-light drawing is inverted to MNIST's white on black, and a drawing is framed as MNIST "
                "frames its digits."
                if grayscale
                else "The image is resized to the model's size, in colour."
            )
            gr.Markdown(
                f"Draw {subject} (or upload an image) and get its negative ELBO in bits/dim, an upper bound on "
                f"-log2 p(x) per dimension, with its terms ({cost}). {framing}"
            )
            with gr.Row():
                drawing = gr.Sketchpad(
                    sources=("upload", "clipboard"),
                    image_mode="L" if grayscale else "RGB",
                    type="pil",
                    canvas_size=(280, 280),
                    label="digit" if grayscale else "image",
                    brush=gr.Brush(default_size=12, colors=["#000000"], color_mode="fixed"),
                )
                with gr.Column():
                    scored = gr.Image(type="pil", format="png", label="the model's input", elem_id="scored")
                    result = gr.JSON(label="bits/dim")
            gr.Button("Score", variant="primary").click(score, drawing, [scored, result], api_name="score")
    return demo


SPACE_APP = '''"""Gradio Space for an hf_ddpm model (MODEL below)."""

from hf_ddpm.demo import build_demo, load_for_demo

MODEL = {model}
REVISION = {revision}

demo = build_demo(load_for_demo(MODEL, revision=REVISION))

if __name__ == "__main__":
    demo.launch()
'''

SPACE_README_BODY = """
# {title}

Samples, the denoising trajectory and the bits/dim of a drawn digit for [{model}](https://huggingface.co/{model}),
served with hf_ddpm's demo (`hf_ddpm demo {model}`).
"""


def space_files(model: str, revision: str | None, gradio_version: str) -> dict[str, str]:
    """The text of a Space's ``app.py``, ``requirements.txt`` and ``README.md`` for the Hub model ``model``; every
    value a user gave is encoded for where it goes: Python literals (``repr``) in app.py, YAML by
    ``yaml.safe_dump`` in the README's front matter."""
    import yaml

    title = model.split("/")[-1]
    front = {
        "title": title,
        "sdk": "gradio",
        "sdk_version": gradio_version,
        "app_file": "app.py",
        "models": [model],
        "pinned": False,
    }
    return {
        "app.py": SPACE_APP.format(model=repr(model), revision=repr(revision)),
        "requirements.txt": f"hf_ddpm=={__version__}\ngradio=={gradio_version}\ntorch\n",
        "README.md": f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n"
        + SPACE_README_BODY.format(title=title, model=model),
    }


def export_space(model: str, directory: Path, revision: str | None = None, overwrite: bool = False) -> list[Path]:
    """Write a Hugging Face Space for the Hub model ``model`` into ``directory``: ``app.py`` (loads the model with
    hf_ddpm and launches :func:`build_demo`), ``requirements.txt`` (hf_ddpm, gradio, torch) and ``README.md``
    with the Spaces front matter (sdk: gradio, app_file: app.py), as :func:`space_files` encodes them. Returns the
    paths written.

    Raises ``ValueError`` for a local folder (a Space can only load a model from the Hub), a ``model`` that is not
    a valid repo id, and, unless ``overwrite``, a ``directory`` that already has any of the three files.
    """
    gr = import_gradio()
    if Path(model).is_dir() or "/" not in model:
        raise ValueError(f"{model}: a Space loads its model from the Hub: pass a repo id ORG/NAME (push it first).")
    check_repo_id(model, "the model")  # first: nothing invalid reaches the files
    directory = Path(directory)
    files = space_files(model, revision, gr.__version__)
    existing = [name for name in files if (directory / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"--export_space {directory} already has {', '.join(existing)}; pass --overwrite to replace them, or "
            "choose another folder."
        )
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, text in files.items():
        path = directory / filename
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` command's arguments to ``parser``: model, --revision, --host, --port, --share,
    --export_space."""
    parser.add_argument("model", help="a folder written by save_pretrained / train.py, or a Hub repo id")
    parser.add_argument("--revision", default=None, help="Hub revision (pass one for Hub repos, e.g. main)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument(
        "--export_space",
        default=None,
        metavar="DIR",
        help="write a Space (app.py, requirements.txt, README.md) for the Hub model into DIR and exit",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="with --export_space: replace the files already in DIR"
    )


def run_demo(args: argparse.Namespace) -> int:
    """Run the ``demo`` command: write the Space with ``--export_space``, else serve the app until interrupted.
    Returns the exit code: 0, or 2 after printing a one-line error (gradio missing, model not loadable)."""
    try:
        import_gradio()
        if args.export_space:
            space = Path(args.export_space)
            for path in export_space(args.model, space, revision=args.revision, overwrite=args.overwrite):
                print(f"wrote {path}")
            return 0
        demo = build_demo(load_for_demo(args.model, args.revision))
    except (ImportError, OSError, ValueError) as error:
        print(f"hf_ddpm: error: {error}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0
