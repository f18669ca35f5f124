"""Runs of ``training/train.py`` for the benchmarks, and equal wall-clock budgets between recipes.

A recipe gets a CPU budget as a number of optimizer steps: its seconds per step are measured by a short calibration
run of the same flags on the same machine, and the budget is divided by them. The run then trains with a full
learning-rate schedule over exactly those steps, so no recipe is cut off in the middle of its schedule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--logger", "none", "--overwrite_output_dir"]
FAST_EVAL_IMAGES = 16  # held-out images of a run with FAST_OUTPUTS (the embedded test digits by default)
FAST_OUTPUTS = [
    "--num_eval_images",
    str(FAST_EVAL_IMAGES),
    "--num_sample_images",
    "1",
    "--sample_steps",
    "2",
]  # runs that only time steps


@dataclass(frozen=True)
class Recipe:
    """One model the benchmarks train: its name in tables and legends, its ``train.py`` flags, the steps of its
    calibration run (VAE steps are ~10x shorter than diffusion steps, so they need more of them to time) and the
    steps between its saved pipelines in a learning curve (every 25-40 s of training on 2 CPU cores)."""

    label: str
    flags: list[str]
    calibration_steps: int
    save_every: int


RECIPES = {
    "vae": Recipe("VAE (1 latent layer)", ["--model", "vae"], 200, 1000),
    "hvae": Recipe("hierarchical VAE (3 layers)", ["--model", "vae", "--num_latent_layers", "3"], 200, 1000),
    "ddpm_simple": Recipe(
        "DDPM simple, fixed var.", ["--loss_type", "simple", "--variance_type", "fixed_small"], 60, 65
    ),
    "ddpm": Recipe("DDPM hybrid, learned var.", [], 60, 65),
    "vdm": Recipe("VDM, continuous time, learned schedule", ["--model", "vdm"], 60, 65),
}


def train(
    output_dir: Path, flags: list[str], launch_config: Path | str | None = None, threads: int | None = None
) -> dict:
    """Run ``train.py --output_dir output_dir *flags`` (log beside the folder) and return its eval_results.json.
    With ``launch_config``, through ``accelerate launch --config_file launch_config``; with ``launch_config="plain"``,
    through a bare ``accelerate launch`` (the README's command). ``threads`` sets OMP_NUM_THREADS for the run."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    if launch_config == "plain":
        launcher = [accelerate, "launch"]
    elif launch_config:
        launcher = [accelerate, "launch", "--config_file", str(launch_config)]
    else:
        launcher = [sys.executable]
    command = [*launcher, str(REPO / "training" / "train.py"), "--output_dir", str(output_dir), *QUIET, *flags]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(output_dir.with_suffix(".log"), "w") as log:
        completed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"train.py failed ({completed.returncode}); see {output_dir.with_suffix('.log')}")
    return json.loads((output_dir / "eval_results.json").read_text())


def seconds_per_step(work_dir: Path, flags: list[str], calibration_steps: int) -> float:
    """Wall-clock seconds per optimizer step of ``flags``, from a ``calibration_steps``-step run (warm-up included)."""
    calibration = train(
        work_dir,
        [
            *flags,
            *FAST_OUTPUTS,
            "--max_train_steps",
            str(calibration_steps),
            "--checkpointing_steps",
            str(calibration_steps),
            "--lr_warmup_steps",
            "0",
        ],
    )
    return calibration["train_seconds_this_run"] / calibration["steps"]


def train_for_budget(output_dir: Path, flags: list[str], budget_seconds: float, calibration_steps: int = 60) -> dict:
    """Train ``flags`` for as many steps as fit in ``budget_seconds`` on this machine; returns eval_results.json
    with ``seconds_per_step_calibrated`` added."""
    per_step = seconds_per_step(output_dir.with_name(output_dir.name + "_calibration"), flags, calibration_steps)
    steps = max(1, int(budget_seconds / per_step))
    result = train(output_dir, [*flags, "--max_train_steps", str(steps), "--checkpointing_steps", str(steps)])
    return {**result, "seconds_per_step_calibrated": per_step}
