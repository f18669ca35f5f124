"""Quality at equal CPU budget: hf_ddpm's default recipe vs the stock diffusers recipe, trained back to back.

    python benchmarks/quality_vs_diffusers.py --eval_data embedded [--ours benchmarks/runs/hf_ddpm_default] \
        [--device cuda]

1. hf_ddpm: `training/train.py` with its defaults (or an existing run folder of it, --ours).
2. The stock diffusers recipe through the same script, so data, EMA and evaluation are identical: diffusers'
   UNet2DModel (same levels and attention as ours, 2 layers per block as in train_unconditional.py) with the
   example's defaults: epsilon-MSE, linear betas, fixed_small variance, lr 1e-4 with 500 warm-up steps and cosine
   decay, AdamW(0.95, 0.999, wd 1e-6), batch 16, EMA (inv_gamma 1, power 3/4, max 0.9999), full precision. It
   trains for the wall-clock time hf_ddpm's run took (``--train_minutes``: the steps that fit, measured in the run).
3. Both evaluated alike: NLL bits/dim on the first --num_eval_images t10k digits (unbiased stratified estimate,
   K timesteps per image), and sample quality of --num_samples samples (100 sampling steps each) against t10k in
   the feature space of hf_ddpm's MNIST classifier (NOT Inception-FID).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.utils import make_image_grid

from hf_ddpm.data import ImageTensorDataset, load_images
from hf_ddpm.evaluation import BoundOptions, evaluate_bound
from hf_ddpm.metrics import sample_quality
from hf_ddpm.pipelines.auto import default_device, load_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from budget import REPO, train, train_for_minutes  # noqa: E402

STOCK_FLAGS = [
    "--architecture",
    "diffusers_unet2d",
    "--layers_per_block",
    "2",
    "--loss_type",
    "simple",
    "--variance_type",
    "fixed_small",
    "--beta_schedule",
    "linear",
    "--learning_rate",
    "1e-4",
    "--lr_warmup_steps",
    "500",
    "--adam_beta1",
    "0.95",
    "--adam_beta2",
    "0.999",
    "--adam_weight_decay",
    "1e-6",
    "--train_batch_size",
    "16",
    "--mixed_precision",
    "no",
]
SMALL_GRID = ["--num_sample_images", "16"]


def evaluate(
    folder: Path, test_images: torch.Tensor, reference: torch.Tensor, args: argparse.Namespace, stock: bool
) -> dict:
    pipe = load_pipeline(folder).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval()
    start = time.time()
    options = BoundOptions(timesteps_per_image=args.timesteps_per_image)
    nll = evaluate_bound(pipe, test_images.to(args.device), options, generator=torch.Generator().manual_seed(0))
    nll_seconds = time.time() - start
    if stock:  # the stock recipe samples with diffusers' DDPMScheduler
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    start = time.time()
    samples = pipe(
        batch_size=args.num_samples,
        num_inference_steps=args.sample_steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images.cpu()
    sample_seconds = time.time() - start
    quality = sample_quality(samples * 2 - 1, reference)
    grid = make_image_grid(pipe.numpy_to_pil(samples[:64].permute(0, 2, 3, 1).numpy()), rows=8, cols=8)
    return {
        "nll_bits_per_dim": nll.bits_per_dim,
        "nll_standard_error": nll.standard_error,
        "nll_terms": nll.terms,
        "frechet_distance": quality.frechet_distance,
        "mean_confidence": quality.mean_confidence,
        "class_kl_from_uniform": quality.class_kl_from_uniform,
        "seconds_per_sample": sample_seconds / args.num_samples,
        "nll_seconds": nll_seconds,
        "grid": grid,
    }


def real_digits_floor(test_images: torch.Tensor, reference: torch.Tensor, count: int) -> dict:
    """The metrics of ``count`` real test digits (disjoint from ``reference``) in place of samples: what a perfect
    model would score with this many samples (the Fréchet distance of a finite sample is biased upwards)."""
    return vars(sample_quality(test_images[:count], reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval_data", required=True, help="embedded, or a folder of MNIST IDX files (t10k is used)")
    parser.add_argument("--ours", type=Path, default=None, help="an existing run folder of train.py's defaults")
    parser.add_argument("--work_dir", type=Path, default=REPO / "benchmarks" / "runs")
    parser.add_argument("--num_eval_images", type=int, default=1000)
    parser.add_argument("--timesteps_per_image", type=int, default=8)
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--sample_steps", type=int, default=100)
    parser.add_argument(
        "--device", default=default_device(), help="torch device to run on (default: cuda where available, else cpu)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ours_dir = args.ours or args.work_dir / "hf_ddpm_default"
    ours = json.loads((ours_dir / "eval_results.json").read_text()) if args.ours else train(ours_dir, SMALL_GRID)
    stock = train_for_minutes(
        args.work_dir / "stock_diffusers", [*STOCK_FLAGS, *SMALL_GRID], ours["train_seconds_this_run"] / 60
    )

    test = load_images(args.eval_data, split="test")
    images = ImageTensorDataset(test.images)[:]
    test_images, reference = images[: args.num_eval_images], images[-2000:]
    rows = {}
    for name, folder, run in (
        ("hf_ddpm default", ours_dir, ours),
        ("stock diffusers recipe", args.work_dir / "stock_diffusers", stock),
    ):
        result = evaluate(folder, test_images, reference, args, stock=name.startswith("stock"))
        args.out.mkdir(parents=True, exist_ok=True)
        result.pop("grid").save(args.out / f"samples_{name.split()[0]}.png")
        rows[name] = {
            "train_seconds": run["train_seconds_this_run"],
            "steps": run["steps"],
            "images_seen": run["images_seen"],
            **result,
        }
    floor = real_digits_floor(test_images, reference, args.num_samples)
    (args.out / "quality_vs_diffusers.json").write_text(json.dumps({**rows, "real t10k digits": floor}, indent=2))
    print(
        f"{'recipe':24s} {'train min':>9s} {'steps':>6s} {'images':>7s} {'NLL bpd':>16s} {'FD':>8s} {'conf':>5s} "
        f"{'KL(cls)':>7s}"
    )
    for name, r in rows.items():
        print(
            f"{name:24s} {r['train_seconds'] / 60:9.1f} {r['steps']:6d} {r['images_seen']:7d} "
            f"{r['nll_bits_per_dim']:8.4f} ± {r['nll_standard_error']:.4f} {r['frechet_distance']:8.2f} "
            f"{r['mean_confidence']:5.3f} {r['class_kl_from_uniform']:7.4f}"
        )
    print(
        f"{'real t10k digits':68s} {floor['frechet_distance']:8.2f} {floor['mean_confidence']:5.3f} "
        f"{floor['class_kl_from_uniform']:7.4f}"
    )


if __name__ == "__main__":
    main()
