"""Post-hoc EMA (EDM2) against ``--use_ema``'s EMA on one training trajectory: the weights of each EMA of one
``training/train.py --posthoc_ema`` run (the same steps, batches and minutes; the snapshots cost ~1 ms per step)
scored on all t10k and on samples, so that the comparison is paired and at equal minutes by construction.

    python training/train.py --posthoc_ema --output_dir RUN_DIR
    python benchmarks/posthoc_ema.py RUN_DIR [--sigma_rels 0.02 0.05 0.10] [--seeds 0 1 2] [--num_samples 1000] \
        [--num_bound_images N] [--device cuda] [--json benchmarks/results/posthoc_ema_MACHINE_DATE.json]

The arms: ``use_ema`` (the EMA in the run's last checkpoint, as a run without ``--posthoc_ema`` saves it), the length
the run chose (its saved pipeline) and every ``--sigma_rels`` length (reconstructed from ``RUN_DIR/posthoc_ema``). Each
arm: the bound on all 10,000 official t10k digits, or on the first ``--num_bound_images`` (8 stratified timesteps per
image, x_0 estimate clipped, seed 0: the same timesteps and noise for every arm), and ``--num_samples`` samples (100
steps, ``fast_sampling``) per sampling seed (the same noise for every arm), scored against all t10k: mean and spread
over the seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

sys.path.insert(0, str(Path(__file__).parent))
from budget import REPO  # noqa: E402
from hf_ddpm import BoundOptions, evaluate_bound  # noqa: E402
from hf_ddpm.data import ImageTensorDataset, load_images  # noqa: E402
from hf_ddpm.evaluation import BoundResult, mean_and_standard_error  # noqa: E402
from hf_ddpm.metrics import sample_quality  # noqa: E402
from hf_ddpm.pipelines.auto import default_device, load_pipeline  # noqa: E402
from hf_ddpm.posthoc_ema import loaded_weights, reconstruct_posthoc_ema  # noqa: E402
from hf_ddpm.sampling_speedup import fast_sampling  # noqa: E402
from hf_ddpm.training_utils import POSTHOC_EMA_FOLDER, list_checkpoints  # noqa: E402
from quality_per_minute import sample_summary, spread  # noqa: E402
from throughput import cpu_name  # noqa: E402

#: accelerate's file of the first object registered for checkpointing: train.py registers --use_ema's EMAModel first
EMA_STATE_FILE = "custom_checkpoint_0.pkl"


def use_ema_weights(run_dir: Path, network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """--use_ema's EMA of the run's last checkpoint, by ``network``'s parameter names."""
    checkpoint = list_checkpoints(run_dir)[-1]
    names = [name for name, _ in network.named_parameters()]
    ema = EMAModel(network.parameters())
    ema.load_state_dict(torch.load(checkpoint / EMA_STATE_FILE, map_location="cpu", weights_only=False))
    if len(ema.shadow_params) != len(names):
        raise ValueError(f"{checkpoint / EMA_STATE_FILE} holds {len(ema.shadow_params)} tensors, not {len(names)}")
    return {name: shadow.detach().clone() for name, shadow in zip(names, ema.shadow_params)}


def score(
    pipeline, images: torch.Tensor, bound_images: int, seeds: list[int], num_samples: int, steps: int
) -> tuple[dict, BoundResult]:
    """The bound on the first ``bound_images`` of ``images`` (seed 0) and the sample metrics of ``num_samples``
    samples per seed against all ``images``; and the bound."""
    start = time.perf_counter()
    bound = evaluate_bound(
        pipeline,
        images[:bound_images],
        BoundOptions(timesteps_per_image=8),
        generator=torch.Generator().manual_seed(0),
    )
    result = {"nll": bound.to_dict(), "bound_seconds": time.perf_counter() - start}
    return {**result, **sample_scores(pipeline, images, seeds, num_samples, steps)}, bound


def sample_scores(pipeline, images: torch.Tensor, seeds: list[int], num_samples: int, steps: int, **call) -> dict:
    """The sample metrics of ``num_samples`` samples (``steps`` steps, ``fast_sampling``, the pipeline called with
    ``call`` too) per sampling seed against all ``images``: per seed, and their mean and spread over the seeds."""
    result = {"samples": []}
    with fast_sampling(pipeline, len(seeds) * num_samples * steps) as speedup:
        for seed in seeds:
            start = time.perf_counter()
            generator = torch.Generator().manual_seed(seed)
            samples = pipeline(
                batch_size=num_samples, num_inference_steps=steps, generator=generator, output_type="pt", **call
            ).images
            quality = vars(sample_quality(samples.cpu() * 2 - 1, images.cpu()))
            result["samples"].append({"seed": seed, **quality, "seconds": time.perf_counter() - start})
    result["sampling"] = vars(speedup)
    for metric in ("frechet_distance", "mean_confidence", "class_kl_from_uniform"):
        result[metric] = spread([s[metric] for s in result["samples"]])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a train.py --posthoc_ema --use_ema run's output_dir")
    parser.add_argument("--sigma_rels", type=float, nargs="*", default=[], help="more post-hoc EMA lengths to score")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100, help="sampling steps")
    parser.add_argument(
        "--num_bound_images", type=int, default=None, help="the bound on the first N t10k digits (default: all)"
    )
    parser.add_argument(
        "--device", default=default_device(), help="torch device to run on (default: cuda where available, else cpu)"
    )
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "posthoc_ema.json")
    args = parser.parse_args()
    if args.num_bound_images is not None and args.num_bound_images < 1:
        parser.error(f"--num_bound_images must be >= 1 (or left out for all t10k), got {args.num_bound_images}")

    run = json.loads((args.run_dir / "eval_results.json").read_text())
    if "posthoc_ema" not in run:
        raise SystemExit(
            f"{args.run_dir} is not a train.py --posthoc_ema run (its eval_results.json has no posthoc_ema)"
        )
    chosen = run["posthoc_ema"]["chosen"]
    pipeline = load_pipeline(str(args.run_dir)).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    network = pipeline.unet
    images = ImageTensorDataset(load_images("embedded", split="test").images)[:].to(args.device)
    bound_images = args.num_bound_images or len(images)
    arms = {"use_ema": use_ema_weights(args.run_dir, network), chosen + " (chosen; as saved)": None}
    for sigma_rel in args.sigma_rels:
        if f"sigma_rel {sigma_rel:g}" != chosen:
            arms[f"sigma_rel {sigma_rel:g}"] = reconstruct_posthoc_ema(args.run_dir / POSTHOC_EMA_FOLDER, sigma_rel)
    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "device": args.device,
        "run_dir": str(args.run_dir),
        "steps": run["steps"],
        "train_seconds": run["train_seconds_this_run"],
        "held_out_bits_per_dim": run["posthoc_ema"]["held_out_bits_per_dim"],
        "arms": {},
    }
    baseline = None  # use_ema's bound: every other arm's difference to it, image by image (the same draws)
    for label, weights in arms.items():
        # the chosen arm's weights are the pipeline's own, as saved
        with contextlib.nullcontext() if weights is None else loaded_weights(network, weights):
            result, bound = score(pipeline, images, bound_images, args.seeds, args.num_samples, args.steps)
        baseline = bound if baseline is None else baseline
        difference, error = mean_and_standard_error(bound.per_image - baseline.per_image)
        result["nll_minus_use_ema"] = {"mean": difference, "standard_error": error}
        report["arms"][label] = result
        print(
            f"{label:28s} NLL {result['nll']['bits_per_dim']:.4f} (SE {result['nll']['standard_error']:.4f}; "
            f"minus use_ema's {difference:+.4f} ± {error:.4f}), {sample_summary(result)}",
            flush=True,
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
