"""Runs of ``training/train.py`` for the benchmarks, and the recipes they compare at equal wall-clock budgets.

A recipe gets a budget as ``train.py --train_minutes M`` (:mod:`hf_ddpm.training_budget`): the run times its own
step on this machine and trains the steps that fit, with a full learning-rate schedule over exactly those steps, so
no recipe is cut off in the middle of its schedule.
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
NEVER = 10**9  # a step count no run reaches: --eval_steps / --checkpointing_steps NEVER turn those off mid-run
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
    """One model the benchmarks train: its name in tables and legends, its ``train.py`` flags and the steps between
    its saved pipelines in a learning curve (every 25-40 s of training on 2 CPU cores)."""

    label: str
    flags: list[str]
    save_every: int


RECIPES = {
    "vae": Recipe("VAE (1 latent layer)", ["--model", "vae"], 1000),
    "hvae": Recipe("hierarchical VAE (3 layers)", ["--model", "vae", "--num_latent_layers", "3"], 1000),
    "ddpm_simple": Recipe("DDPM simple, fixed var.", ["--loss_type", "simple", "--variance_type", "fixed_small"], 65),
    "ddpm": Recipe("DDPM hybrid, learned var.", [], 65),
    "vdm": Recipe("VDM, continuous time, learned schedule", ["--model", "vdm"], 65),
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
    log_path = output_dir.parent / f"{output_dir.name}.log"  # not with_suffix: "default_7.5min" has a dot
    with open(log_path, "w") as log:
        completed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"train.py failed ({completed.returncode}); see {log_path}")
    return json.loads((output_dir / "eval_results.json").read_text())


def train_for_minutes(output_dir: Path, flags: list[str], minutes: float) -> dict:
    """Train ``flags`` for ``minutes`` of wall-clock time on this machine (``train.py --train_minutes``, one
    checkpoint at the end); returns eval_results.json."""
    return train(output_dir, [*flags, "--train_minutes", str(minutes), "--checkpointing_steps", str(NEVER)])
