"""Which of two diffusion models has the lower NLL? A paired comparison on the same images with the same draws.

    python benchmarks/paired_nll.py MODEL_A MODEL_B --eval_data embedded [--timesteps_per_image 16] [--device cuda]

Both bounds are estimated by ``hf_ddpm.evaluation.evaluate_bound`` (the unbiased stratified estimate) on the same first
--num_images t10k digits with generators of the same seed, so both models see the same timesteps and the same noise
for each image. The estimator's randomness is then largely shared, and the standard error of the per-image
difference is much smaller than the two standard errors combined.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_ddpm.data import ImageTensorDataset, load_images
from hf_ddpm.evaluation import BoundOptions, BoundResult, evaluate_bound, mean_and_standard_error
from hf_ddpm.pipelines.auto import default_device, load_pipeline


def bound_of(model: Path, images: torch.Tensor, timesteps_per_image: int, seed: int) -> BoundResult:
    """The stratified bound estimate of ``model`` (a saved DDPM or VDM pipeline) on ``images``, on their device."""
    pipe = load_pipeline(model).to(images.device)
    pipe.unet.eval()
    options = BoundOptions(timesteps_per_image=timesteps_per_image)
    return evaluate_bound(pipe, images, options, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_a", type=Path)
    parser.add_argument("model_b", type=Path)
    parser.add_argument("--eval_data", required=True)
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--timesteps_per_image", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default=default_device(), help="torch device to run on (default: cuda where available, else cpu)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    data = load_images(args.eval_data, split="test", max_images=args.num_images)
    images = ImageTensorDataset(data.images)[:].to(args.device)
    bounds = {str(m): bound_of(m, images, args.timesteps_per_image, args.seed) for m in (args.model_a, args.model_b)}
    a, b = bounds.values()
    difference, difference_error = mean_and_standard_error(a.per_image - b.per_image)
    result = {
        "num_images": len(images),
        "timesteps_per_image": args.timesteps_per_image,
        "models": {
            name: {"bits_per_dim": e.bits_per_dim, "standard_error": e.standard_error, **e.terms}
            for name, e in bounds.items()
        },
        "a_minus_b_bits_per_dim": difference,
        "a_minus_b_standard_error": difference_error,
    }
    for name, e in bounds.items():
        print(f"{name}: {e.bits_per_dim:.4f} ± {e.standard_error:.4f} bits/dim")
    print(
        f"A - B = {result['a_minus_b_bits_per_dim']:.4f} ± {result['a_minus_b_standard_error']:.4f} bits/dim (paired)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
