"""The source's models side by side at an equal CPU budget: Gaussian VAE, Markovian hierarchical VAE, and the
diffusion model (an MHVAE with a fixed encoder) trained with the simple and with the hybrid loss.

    python benchmarks/vae_vs_ddpm.py --eval_data embedded [--budget_minutes 6]

Every model is trained by ``training/train.py`` on the same 60,000 embedded MNIST digits for the same wall-clock
budget (steps calibrated per recipe, see budget.py), then evaluated by ``hf_ddpm evaluate`` on the same first
--num_eval_images t10k digits: bits/dim of the negative ELBO (the VAEs also with the tighter IWAE bound; the DDPMs
with an unbiased stratified estimate of the full 1000-term bound) and sample quality in the features of
hf_ddpm's MNIST classifier (NOT Inception-FID). Writes a JSON table and one image with every model's samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from hf_ddpm.cli import main as hf_ddpm_cli

sys.path.insert(0, str(Path(__file__).parent))
from budget import RECIPES, REPO, train_for_minutes  # noqa: E402

MODELS = ["vae", "hvae", "ddpm_simple", "ddpm"]  # keys of budget.RECIPES


def side_by_side(grids: dict[str, Path], out: Path) -> None:
    """One PNG: each model's sample grid under its name."""
    images = {name: Image.open(path).convert("RGB") for name, path in grids.items()}
    width, height = max(i.width for i in images.values()), max(i.height for i in images.values())
    canvas = Image.new("RGB", (len(images) * (width + 10), height + 24), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (name, image) in enumerate(images.items()):
        x = column * (width + 10)
        draw.text((x + 2, 4), name, fill="black")
        canvas.paste(image, (x, 24))
    canvas.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval_data", required=True, help="embedded, or a folder of MNIST IDX files (t10k is used)")
    parser.add_argument("--budget_minutes", type=float, default=6.0)
    parser.add_argument("--work_dir", type=Path, default=REPO / "benchmarks" / "runs" / "vae_vs_ddpm")
    parser.add_argument("--num_eval_images", type=int, default=1000)
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, grids = {}, {}
    for index, recipe in enumerate(RECIPES[key] for key in MODELS):
        name, folder = recipe.label, args.work_dir / f"model_{index}"
        run = train_for_minutes(folder, [*recipe.flags, "--num_sample_images", "64"], args.budget_minutes)
        evaluation = folder / "evaluate.json"
        hf_ddpm_cli(
            [
                "evaluate",
                str(folder),
                "--data",
                args.eval_data,
                "--max_images",
                str(args.num_eval_images),
                "--num_samples",
                str(args.num_samples),
                "--elbo_samples",
                "8",
                "--iwae_samples",
                "256",
                "--json",
                str(evaluation),
            ]
        )
        rows[name] = {
            "train_seconds": run["train_seconds_this_run"],
            "steps": run["steps"],
            "images_seen": run["images_seen"],
            **json.loads(evaluation.read_text()),
        }
        grids[name] = folder / "samples.png"
        print(f"{name}: {rows[name]['bits_per_dim']:.4f} bits/dim after {run['steps']} steps", flush=True)
    (args.out / "vae_vs_ddpm.json").write_text(json.dumps(rows, indent=2))
    side_by_side(grids, args.out / "vae_vs_ddpm_samples.png")
    print(f"{'model':28s} {'min':>5s} {'steps':>6s} {'ELBO bpd':>17s} {'IWAE bpd':>8s} {'FD':>8s} {'conf':>5s}")
    for name, r in rows.items():
        q = r["sample_quality"]
        iwae = f"{r['iwae_bits_per_dim']:8.4f}" if "iwae_bits_per_dim" in r else f"{'-':>8s}"
        print(
            f"{name:28s} {r['train_seconds'] / 60:5.1f} {r['steps']:6d} {r['bits_per_dim']:8.4f} ± "
            f"{r['standard_error']:.4f} {iwae} "
            f"{q['frechet_distance']:8.2f} {q['mean_confidence']:5.3f}"
        )


if __name__ == "__main__":
    main()
