"""Helpers shared by several test modules (imported as ``from helpers import ...``, like ``olah_server``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

#: The repository root, and training/train.py importable as ``train``.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "training"))
#: A tiny model and run of train.py: 2 levels (28 -> 14), T = 50, a few steps on 512 embedded MNIST digits.
TINY_TRAIN = (
    "--block_out_channels 8 16 --attention_resolutions 14 --num_train_timesteps 50 --max_train_images 512 "
    "--num_eval_images 16 --train_batch_size 16 --eval_batch_size 16 --num_sample_images 4 --sample_steps 5 "
    "--eval_timesteps_per_image 4 --lr_warmup_steps 1 --mixed_precision no --logger none --seed 3"
).split()


def without_flags(flags: list[str], *names: str) -> list[str]:
    """``flags`` (such as ``TINY_TRAIN``) without the flags ``names`` and their values (every word up to the next
    ``--flag``), so that a run takes those arguments' defaults."""
    kept, dropping = [], False
    for word in flags:
        if word.startswith("--"):
            dropping = word in names
        if not dropping:
            kept.append(word)
    return kept


def diffusers_in_float64(beta_schedule: str, **config) -> DDPMScheduler:
    """diffusers' DDPMScheduler with its schedule recomputed in float64 from its own definitions.

    diffusers stores betas and alphas_cumprod in float32, which moves 1 - alphas_cumprod at the first steps (and
    1 - beta at the clipped last cosine step) by up to ~1e-4 relative, so its step outputs differ from any float64
    implementation by more than 1e-6 for that reason alone. The betas recomputed here equal diffusers' own to
    float32 rounding (checked), so the comparisons test diffusers' formulas at our precision.
    """
    scheduler = DDPMScheduler(beta_schedule=beta_schedule, **config)
    T = scheduler.config.num_train_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(scheduler.config.beta_start, scheduler.config.beta_end, T, dtype=np.float64)
    else:  # squaredcos_cap_v2: 1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), capped at 0.999
        alpha_bar = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    np.testing.assert_allclose(betas, scheduler.betas.double().numpy(), rtol=3e-7)
    scheduler.betas = torch.from_numpy(betas)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def on_grid(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random float64 images on the 8-bit grid, with both extreme values present."""
    pixels = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    pixels.view(-1)[:2] = torch.tensor([0, 255])
    return pixels.double() / 127.5 - 1.0


def tiny_vae(num_latent_layers: int = 1):
    """A small GaussianVAE on 28x28 images, seeded."""
    from hf_ddpm import GaussianVAE

    torch.manual_seed(0)
    return GaussianVAE(latent_dim=8, block_out_channels=(8, 16), hidden_dim=16, num_latent_layers=num_latent_layers)


def mnist_like_pixels(n: int) -> torch.Tensor:
    """n random 28x28 uint8 images."""
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- tiny pipelines
def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` with every parameter drawn from N(0, 0.05^2): a DenoisingUNet's output layer starts at zero, which
    would make every seed sample alike."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module


def tiny_ddpm_pipeline(seed: int = 0):
    """A learned-variance DDPM small enough to sample in milliseconds (T = 10, 8x8 images), with random weights."""
    from hf_ddpm import DenoisingUNet, HFDDPMPipeline, HFDDPMScheduler

    torch.manual_seed(seed)
    unet = DenoisingUNet(sample_size=8, block_out_channels=(8, 16), attention_resolutions=(), learn_variance=True)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0.0, 0.05)
    pipeline = HFDDPMPipeline(
        unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=10, variance_type="learned_range")
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def tiny_vae_pipeline(seed: int = 0):
    """A Gaussian VAE pipeline on 8x8 images with two latent layers, freshly initialised from ``seed``."""
    from hf_ddpm import GaussianVAE, VAEPipeline

    torch.manual_seed(seed)
    vae = GaussianVAE(sample_size=8, latent_dim=4, block_out_channels=(4, 8), hidden_dim=8, num_latent_layers=2)
    pipeline = VAEPipeline(vae=vae)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def tiny_vdm_pipeline(seed: int = 0):
    """A continuous-time VDM pipeline on 8x8 images with a learned noise schedule and random weights."""
    from hf_ddpm import DenoisingUNet, NoiseSchedule, VDMContinuousScheduler, VDMPipeline

    torch.manual_seed(seed)
    unet = DenoisingUNet(sample_size=8, block_out_channels=(8, 16), attention_resolutions=(), learn_variance=False)
    pipeline = VDMPipeline(
        unet=randomized(unet, seed),
        noise_schedule=NoiseSchedule(schedule_type="learned", n_features=8),
        scheduler=VDMContinuousScheduler(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


#: Every public pipeline class -> (a tiny instance from a seed, the arguments of a short sampling call). A new
#: pipeline class exported from hf_ddpm makes the tests that cover every pipeline fail until it is added here.
TINY_PIPELINES = {
    "HFDDPMPipeline": (tiny_ddpm_pipeline, {"num_inference_steps": 10}),
    "VAEPipeline": (tiny_vae_pipeline, {}),
    "VDMPipeline": (tiny_vdm_pipeline, {"num_inference_steps": 5}),
}


def public_pipeline_classes() -> list[str]:
    """The names in ``hf_ddpm.__all__`` that are DiffusionPipeline classes."""
    from diffusers import DiffusionPipeline

    import hf_ddpm

    return sorted(
        name
        for name in hf_ddpm.__all__
        if isinstance(getattr(hf_ddpm, name), type) and issubclass(getattr(hf_ddpm, name), DiffusionPipeline)
    )


def tiny_pipeline_of(name: str, seed: int = 0):
    """(a tiny instance of the public pipeline class ``name``, the arguments of a short sampling call)."""
    assert name in TINY_PIPELINES, f"add a tiny {name} to TINY_PIPELINES in tests/helpers.py"
    make, call = TINY_PIPELINES[name]
    pipeline = make(seed)
    assert type(pipeline).__name__ == name
    return pipeline, call


class one_thread:
    """Context manager: compute as the loading subprocesses do (OMP_NUM_THREADS=1), since the thread count changes
    float rounding."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)


# ---------------------------------------------------------------------------------------------- the Hub
REPO = "org/ddpm-mnist"
PICKLED_REPO = "org/pickled"
CHECKPOINT = "checkpoints/step-5"
CHECKPOINT_BRANCH = "training"
TOKEN = "hf_testTOKENnotRealAbCdEfGhIjKlMnOpQrStUv"
SAMPLE_CALL = {"batch_size": 4, "num_inference_steps": 10}
# Run first in a subprocess: makes hf_ddpm unimportable, as in an environment where it is not installed.
BLOCK_HF_DDPM = """
import importlib.abc, sys
class BlockHfDdpm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_ddpm":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, BlockHfDdpm())
"""
SAMPLES = f"""
import numpy as np, torch
def samples(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(generator=torch.Generator().manual_seed(1), output_type="np", **{SAMPLE_CALL!r}).images
"""


def samples(pipeline, **call) -> np.ndarray:
    """What ``SAMPLES`` computes in a subprocess, here: seed 1, ``SAMPLE_CALL`` (or ``call``), one thread."""
    with one_thread():
        return pipeline(generator=torch.Generator().manual_seed(1), output_type="np", **(call or SAMPLE_CALL)).images


def snippet_images(pipeline) -> np.ndarray:
    """What the card's usage snippet computes (batch 16, seed 0), as uint8 arrays."""
    with one_thread():
        images = pipeline(batch_size=16, generator=torch.Generator().manual_seed(0), num_inference_steps=10).images
    return np.stack([np.asarray(image) for image in images])


def bound_of(terms: dict[str, float], standard_error: float, estimator: str):
    """A BoundResult of two images whose term means are ``terms`` and whose bound has ``standard_error``: the first
    term is mean -/+ standard_error on the two images, the others the same on both."""
    from hf_ddpm import BoundResult

    first, *others = terms
    per_image = {
        first: torch.tensor([terms[first] - standard_error, terms[first] + standard_error], dtype=torch.float64)
    }
    per_image.update({name: torch.full((2,), terms[name], dtype=torch.float64) for name in others})
    return BoundResult(per_image_terms=per_image, estimator=estimator)


def report_for(pipeline, **fields):
    """A TrainingReport with every field filled, a token among its training arguments, and a measured bound."""
    from hf_ddpm import NLLResult, TrainingReport

    bound = bound_of(
        {"denoising": 1.0012345, "prior": 3.1415e-05, "reconstruction": 0.23330195},
        standard_error=0.0123456,
        estimator="an unbiased estimate from 8 timesteps per image",
    )
    return TrainingReport.for_pipeline(
        pipeline,
        REPO,
        datasets=["ylecun/mnist"],
        train_data="5,000 MNIST training digits",
        sampling_kwargs={"num_inference_steps": 10},
        training_args={"learning_rate": 0.001, "block_out_channels": [8, 16], "hub_token": TOKEN, "seed": 0},
        nll=NLLResult(bound, dataset_id="ylecun/mnist", dataset_name="MNIST", split="train[4500:5000]"),
        steps=1500,
        images_seen=96000,
        wall_time_seconds=723.4,
        hardware="2 CPU cores, 1 process",
        **fields,
    )


def code_blocks(card_text: str) -> list[str]:
    """The Python code blocks of a card."""
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.S)
