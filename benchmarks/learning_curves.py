"""NLL on the official MNIST test set against CPU-minutes of training, for the DDPM default, the continuous-time VDM,
the hierarchical VAE (issue #11's learning curves), the Gaussian VAE, or any other recipe of budget.py.

    python benchmarks/learning_curves.py --minutes 5 15 60 120 [--models ddpm vdm hvae vae] [--json FILE]

One ``training/train.py`` run per model on the embedded 60,000 training digits, for the longest budget
(``--train_minutes``: the run times its own step on this machine and trains the steps that fill it), with one
learning-rate schedule (warm-up, cosine decay) over all of them, and saves its EMA weights as a pipeline every
--save_every steps (``train.py --save_pipeline_steps``; by default the recipe's: every 25-40 s of training on 2 CPU
cores). A budget's point is the pipeline saved last before the run's own clock (the ``train_seconds`` of
``train_log.jsonl``) passed that many minutes, scored by ``hf_ddpm evaluate`` on the first --num_eval_images official
t10k digits (default: all 10,000) with --timesteps_per_image draws per image (the VAEs: the ELBO with one draw of z,
and the IWAE bound with K = 64). So a curve costs its longest budget once, not the sum of its budgets; the price is
that the shorter budgets' points are of weights whose learning rate had not decayed yet (a run of their own, one
budget in --minutes, ends lower). A model folder that already holds a finished run (``eval_results.json``), or a run
whose log passed the longest budget (one stopped there: the steps after it are never scored), is scored without
training it again, and the points already in the JSON are kept unless re-measured. Writes the JSON (default
benchmarks/results/learning_curves.json) and a plot beside it (same name, .png; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hf_ddpm.cli import main as hf_ddpm_cli
from hf_ddpm.training_utils import PIPELINE_PREFIX, read_train_log

sys.path.insert(0, str(Path(__file__).parent))
from budget import NEVER, RECIPES, REPO, train  # noqa: E402


def pipeline_at(run: Path, seconds: float) -> tuple[Path, dict]:
    """The ``pipeline-STEP`` folder of ``run`` saved last at or before ``seconds`` of training, and the log row of
    its step (with ``train_seconds``); the run's final pipeline (``run`` itself) where the run ended earlier."""
    rows = {row["step"]: row for row in read_train_log(run / "train_log.jsonl")}
    final = max(rows)
    if rows[final]["train_seconds"] <= seconds:
        return run, rows[final]
    saved = [int(p.name.removeprefix(PIPELINE_PREFIX)) for p in run.glob(f"{PIPELINE_PREFIX}*")]
    before = [step for step in saved if step in rows and rows[step]["train_seconds"] <= seconds]
    if not before:
        raise SystemExit(f"{run} saved no pipeline in its first {seconds:.0f} s: lower --save_every.")
    return run / f"{PIPELINE_PREFIX}{max(before)}", rows[max(before)]


def trained_for(run: Path, seconds: float) -> bool:
    """Whether ``run`` holds a finished run, or one whose ``train_log.jsonl`` passed ``seconds`` of training."""
    rows = read_train_log(run / "train_log.jsonl")
    return (run / "eval_results.json").is_file() or any(row.get("train_seconds", 0) >= seconds for row in rows)


def plot(points: dict[str, dict[str, dict]], out: Path) -> None:
    """One line per model: bits/dim (with standard-error bars) against training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for key, by_budget in points.items():
        rows = sorted(by_budget.values(), key=lambda r: r["train_seconds"])
        axis.errorbar(
            [r["train_seconds"] / 60 for r in rows],
            [r["bits_per_dim"] for r in rows],
            yerr=[r["standard_error"] for r in rows],
            marker="o",
            capsize=3,
            label=RECIPES[key].label,
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
    parser.add_argument("--models", nargs="+", choices=list(RECIPES), default=["ddpm", "vdm", "hvae", "vae"])
    parser.add_argument(
        "--save_every", type=int, default=None, help="steps between saved pipelines (default: the recipe's)"
    )
    parser.add_argument("--num_eval_images", type=int, default=10000)
    parser.add_argument("--timesteps_per_image", type=int, default=8)
    parser.add_argument("--num_samples", type=int, default=0, help="samples for the sample metrics at each point")
    parser.add_argument("--work_dir", type=Path, default=REPO / "benchmarks" / "runs" / "learning_curves")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "learning_curves.json")
    args = parser.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    points = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for key in args.models:
        run = args.work_dir / f"{key}_curve"
        if not trained_for(run, max(args.minutes) * 60):
            recipe = RECIPES[key]
            train(
                run,
                [
                    *recipe.flags,
                    "--train_minutes",
                    str(max(args.minutes)),
                    "--save_pipeline_steps",
                    str(recipe.save_every if args.save_every is None else args.save_every),
                    "--checkpointing_steps",
                    str(NEVER),
                    "--eval_steps",
                    str(NEVER),  # no held-out estimates during the run: they would take from its minutes
                ],
            )
        for minutes in sorted(args.minutes):
            model, row = pipeline_at(run, minutes * 60)
            evaluation = run / f"evaluate_{minutes:g}min.json"
            hf_ddpm_cli(
                [
                    "evaluate",
                    str(model),
                    "--split",
                    "test",
                    "--data",
                    "embedded",
                    "--max_images",
                    str(args.num_eval_images),
                    "--timesteps_per_image",
                    str(args.timesteps_per_image),
                    "--num_samples",
                    str(args.num_samples),
                    "--json",
                    str(evaluation),
                ]
            )
            point = {
                "budget_minutes": minutes,
                "train_seconds": row["train_seconds"],
                "steps": row["step"],
                "lr_at_step": row["lr"],
                **json.loads(evaluation.read_text()),
                "model": f"{run.name}/{model.name}" if model != run else f"{run.name} (the run's final pipeline)",
            }
            points.setdefault(key, {})[f"{minutes:g}"] = point
            args.json.write_text(json.dumps(points, indent=2))
            print(
                f"{RECIPES[key].label}, {minutes:g} min ({row['train_seconds'] / 60:.1f} min, step {row['step']}): "
                f"{point['bits_per_dim']:.4f} ± {point['standard_error']:.4f} bits/dim",
                flush=True,
            )
    plot(points, args.json.with_suffix(".png"))


if __name__ == "__main__":
    main()
