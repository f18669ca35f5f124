"""The probability-flow ODE's NLL of a saved DDPM or VDM beside its variational bound, clipped (the default, the
model as sampled) and unclipped (the model the ODE integrates), on the first N official t10k digits; the same
images, seeds and weights for all three. Writes a JSON of bits/dim with standard errors, the ODE's NFE and tolerance,
seconds per image, and the ODE's NLL minus each bound paired image by image (the images' spread cancels there).
``--dequantization uniform truncated_normal`` gives one ODE arm per dequantization (``ode`` and
``ode_truncated_normal``; each bound's ``ARM_minus_this`` pairs it with each), all on the same images and probes.

    python benchmarks/ode_vs_bound.py ddpm-mnist --num_images 1000 --json ode_vs_bound.json
        [--rtol 1e-5 --atol 1e-5 --probes 1 --batch_size 1000 --device cuda]
        [--t_min T] [--timesteps_per_image 8 | --exact] [--dequantization uniform truncated_normal]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_ddpm.data import ImageTensorDataset, read_embedded_mnist
from hf_ddpm.evaluation import DEQUANTIZATIONS, BoundOptions, evaluate_bound, mean_and_standard_error
from hf_ddpm.pipelines.auto import default_device, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved DDPM or VDM pipeline folder")
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=1000)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--probes", type=int, default=1, help="Rademacher probes per image (Hutchinson)")
    parser.add_argument("--t_min", type=float, help="the ODE's start time (default: the model's earliest time)")
    parser.add_argument("--timesteps_per_image", type=int, default=8, help="the bounds' stratified timesteps")
    parser.add_argument("--exact", action="store_true", help="the DDPM's bounds with all T terms (no timestep noise)")
    parser.add_argument(
        "--dequantization", nargs="+", choices=DEQUANTIZATIONS, default=["uniform"], help="one ODE arm each"
    )
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    pipeline = load_pipeline(args.model).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    images = ImageTensorDataset(read_embedded_mnist("test").images[: args.num_images])[:]
    arms = {
        ("ode" if dequantization == "uniform" else f"ode_{dequantization}"): BoundOptions(
            estimator="ode",
            ode_rtol=args.rtol,
            ode_atol=args.atol,
            hutchinson_probes=args.probes,
            ode_t_min=args.t_min,
            ode_dequantization=dequantization,
        )
        for dequantization in args.dequantization
    }
    for clip in (True, False):
        arms[f"bound_{'clipped' if clip else 'unclipped'}"] = BoundOptions(
            clip_denoised=clip, exact=args.exact, timesteps_per_image=args.timesteps_per_image
        )
    results = {
        "model": str(args.model),
        "images": f"the first {len(images)} official t10k digits",
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    ode_per_image = {}
    for name, options in arms.items():
        start = time.perf_counter()
        bound = evaluate_bound(
            pipeline, images, options, batch_size=args.batch_size, generator=torch.Generator().manual_seed(0)
        )
        seconds = time.perf_counter() - start
        results[name] = {**bound.to_dict(), "seconds_per_image": seconds / len(images)}
        for ode_name, per_image in ode_per_image.items():  # the ODE arms before, paired image by image
            mean, standard_error = mean_and_standard_error(per_image - bound.per_image)
            results[name][f"{ode_name}_minus_this"] = {"mean": mean, "standard_error": standard_error}
        if options.estimator == "ode":
            ode_per_image[name] = bound.per_image
        print(f"{name}: {bound.bits_per_dim:.4f} ± {bound.standard_error:.4f} bits/dim, {seconds:.1f} s", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))  # after each arm: a stopped run keeps what it measured


if __name__ == "__main__":
    main()
