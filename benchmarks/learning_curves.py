"""NLL on the official MNIST test set against CPU-minutes of training, for the DDPM default, the continuous-time VDM
and the hierarchical VAE (issue #11's learning curves).

    python benchmarks/learning_curves.py --minutes 5 15 [--models ddpm vdm hvae] [--num_eval_images 10000]

Each (model, budget) point is its own ``training/train.py`` run on the embedded 60,000 training digits with a full
learning-rate schedule over the steps that fit in the budget on this machine (budget.py calibrates seconds per
step), then ``hf_ddpm evaluate`` on the first --num_eval_images official t10k digits (default: all 10,000) and
--num_samples samples for the sample metrics. Points already in the JSON are kept, so the curve can be grown one
budget at a time (a 120-minute point is two hours of this machine). Writes benchmarks/results/learning_curves.json
and learning_curves.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hf_ddpm.cli import main as hf_ddpm_cli

sys.path.insert(0, str(Path(__file__).parent))
from budget import REPO, train_for_budget  # noqa: E402

RECIPES = {
    "ddpm": ("DDPM default (hybrid, learned variance)", []),
    "vdm": ("VDM, continuous time, learned schedule", ["--model", "vdm"]),
    "hvae": ("hierarchical VAE (3 layers)", ["--model", "vae", "--num_latent_layers", "3"]),
}


def plot(points: dict[str, dict[str, dict]], out: Path) -> None:
    """One line per model: bits/dim (with standard-error bars) against training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for key, by_budget in points.items():
        rows = sorted(by_budget.values(), key=lambda r: r["train_seconds"])
        minutes = [r["train_seconds"] / 60 for r in rows]
        axis.errorbar(
            minutes,
            [r["bits_per_dim"] for r in rows],
            yerr=[r["standard_error"] for r in rows],
            marker="o",
            capsize=3,
            label=RECIPES[key][0],
        )
    axis.set_xscale("log")
    axis.set_xlabel("training wall time on this machine (minutes, 2 CPU cores)")
    axis.set_ylabel("NLL bound on MNIST t10k (bits/dim)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 15, 60, 120])
    parser.add_argument("--models", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--num_eval_images", type=int, default=10000)
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--work_dir", type=Path, default=REPO / "benchmarks" / "runs" / "learning_curves")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "learning_curves.json"
    points = json.loads(table.read_text()) if table.is_file() else {}
    for key in args.models:
        for minutes in args.minutes:
            folder = args.work_dir / f"{key}_{minutes:g}min"
            run = train_for_budget(
                folder,
                [*RECIPES[key][1], "--num_sample_images", "64"],
                minutes * 60,
                calibration_steps=200 if key == "hvae" else 60,
            )
            evaluation = folder / "evaluate.json"
            hf_ddpm_cli(
                [
                    "evaluate",
                    str(folder),
                    "--split",
                    "test",
                    "--data",
                    "embedded",
                    "--max_images",
                    str(args.num_eval_images),
                    "--num_samples",
                    str(args.num_samples),
                    "--json",
                    str(evaluation),
                ]
            )
            row = {
                "budget_minutes": minutes,
                "train_seconds": run["train_seconds_this_run"],
                "steps": run["steps"],
                "images_seen": run["images_seen"],
                **json.loads(evaluation.read_text()),
            }
            points.setdefault(key, {})[f"{minutes:g}"] = row
            table.write_text(json.dumps(points, indent=2))
            print(
                f"{RECIPES[key][0]}, {minutes:g} min: {row['bits_per_dim']:.4f} ± {row['standard_error']:.4f} "
                "bits/dim "
                f"after {run['steps']} steps",
                flush=True,
            )
    plot(points, args.out / "learning_curves.png")


if __name__ == "__main__":
    main()
