"""Sampling steps vs sample quality for one trained model: 1000 ancestral steps, respaced chains with the learned
and with fixed variances, and DDIM; time per image and the MNIST-classifier metrics (NOT Inception-FID) for each.

    python benchmarks/steps_vs_quality.py MODEL_DIR --eval_data embedded [--num_samples 200] [--device cuda]

Writes the table as JSON and a plot of Fréchet distance and time per image against the number of steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from hf_ddpm import HFDDPMScheduler
from hf_ddpm.data import ImageTensorDataset, load_images
from hf_ddpm.metrics import sample_quality
from hf_ddpm.pipelines.auto import default_device, load_pipeline

REPO = Path(__file__).resolve().parents[1]


def configurations(config) -> list[tuple[str, object, int]]:
    """(label, scheduler, steps) for every sampler compared."""
    learned = [
        (f"VDM learned variance, {n} steps", HFDDPMScheduler.from_config(config), n) for n in (1000, 250, 100, 50, 25)
    ]
    fixed = [
        (f"VDM fixed_small variance, {n} steps", HFDDPMScheduler.from_config(config, variance_type="fixed_small"), n)
        for n in (250, 100, 50, 25)
    ]
    return learned + fixed + [("DDIM (eta 0), 50 steps", DDIMScheduler.from_config(config), 50)]


def real_digits(test: torch.Tensor, reference: torch.Tensor, count: int, sets: int = 10) -> dict:
    """The metrics of real test digits in place of samples, for ``sets`` disjoint sets of ``count`` digits: the mean
    is what a perfect sampler would score at this sample count, the spread over sets is the metric's sampling noise."""
    scores = [
        sample_quality(test[i * count : (i + 1) * count], reference) for i in range(min(sets, len(test) // count))
    ]
    distances = torch.tensor([q.frechet_distance for q in scores], dtype=torch.float64)
    return {
        "sets": len(scores),
        "num_samples": count,
        "frechet_distance_mean": distances.mean().item(),
        "frechet_distance_std": distances.std().item(),
        "frechet_distances": distances.tolist(),
        "mean_confidence": sum(q.mean_confidence for q in scores) / len(scores),
    }


def plot(rows: list[dict], floor: dict, out: Path) -> None:
    """Fréchet distance (left) and milliseconds per image (right) against sampling steps, one line per sampler; the
    real digits' Fréchet distance (``floor``, from :func:`real_digits`) as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (quality_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for family in ("VDM learned variance", "VDM fixed_small variance", "DDIM (eta 0)"):
        chosen = sorted((r for r in rows if r["sampler"].startswith(family)), key=lambda r: r["steps"])
        steps = [r["steps"] for r in chosen]
        style = "o-" if len(chosen) > 1 else "s"
        quality_axis.plot(steps, [r["frechet_distance"] for r in chosen], style, label=family)
        time_axis.plot(steps, [1000 * r["seconds_per_image"] for r in chosen], style, label=family)
    for axis, label in ((quality_axis, "Fréchet distance (MNIST-classifier features)"), (time_axis, "ms per image")):
        axis.set_xscale("log")
        axis.set_xlabel("sampling steps")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    mean, std = floor["frechet_distance_mean"], floor["frechet_distance_std"]
    quality_axis.axhline(
        mean, color="gray", linestyle=":", label=f"real t10k digits (mean ± std of {floor['sets']} sets)"
    )
    quality_axis.axhspan(mean - std, mean + std, color="gray", alpha=0.15)
    time_axis.set_yscale("log")
    quality_axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--eval_data", required=True)
    parser.add_argument("--num_samples", type=int, default=200)
    parser.add_argument(
        "--device", default=default_device(), help="torch device to run on (default: cuda where available, else cpu)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "steps_vs_quality.json")
    args = parser.parse_args()
    test = ImageTensorDataset(load_images(args.eval_data, split="test").images)[:]
    reference = test[-2000:]
    floor = real_digits(test[:-2000], reference, args.num_samples)
    print(
        f"real t10k digits, {floor['sets']} sets of {args.num_samples}: FD {floor['frechet_distance_mean']:.2f} ± "
        f"{floor['frechet_distance_std']:.2f} (std over sets), confidence {floor['mean_confidence']:.3f}",
        flush=True,
    )
    pipe = load_pipeline(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    rows = []
    for label, scheduler, steps in configurations(base_config):
        pipe.scheduler = scheduler
        start = time.time()
        samples = pipe(
            batch_size=args.num_samples,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images.cpu()
        seconds = (time.time() - start) / args.num_samples
        quality = sample_quality(samples * 2 - 1, reference)
        rows.append({"sampler": label, "steps": steps, "seconds_per_image": seconds, **vars(quality)})
        print(
            f"{label:36s} {seconds * 1000:8.1f} ms/image  FD {quality.frechet_distance:8.2f}  confidence "
            f"{quality.mean_confidence:.3f}  "
            f"class KL {quality.class_kl_from_uniform:.4f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"samplers": rows, "real_t10k_digits": floor}, indent=2))
    plot(rows, floor, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
