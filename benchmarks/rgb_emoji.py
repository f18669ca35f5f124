"""A short 32x32 RGB run: the default recipe on the colour emoji of Debian's fonts-noto-color-emoji (real artwork).

Renders every emoji of the font (hf_ddpm.data.emoji) into a folder, trains ``training/train.py`` on it through a bare
``accelerate launch`` (the README's launch) with ``--channels 3 --resolution 32``, so that the network is
``default_unet_layout(32, 3)``, and keeps what the run reports: its bound in bits/dim (D = 3 x 32 x 32) on the
emoji held out at random, its wall time and its sample grid (copied to ``benchmarks/results/``, beside a grid of
64 of the real emoji).

    python benchmarks/rgb_emoji.py [--max_train_steps 800] [--json benchmarks/results/rgb_emoji.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import PIL.Image

from hf_ddpm.data.emoji import render_emoji_folder
from hf_ddpm.training_utils import image_grid

sys.path.insert(0, str(Path(__file__).parent))
from budget import REPO, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=REPO / "benchmarks" / "runs" / "rgb_emoji")
    parser.add_argument("--max_train_steps", type=int, default=800)
    parser.add_argument("--num_eval_images", type=int, default=128, help="emoji held out at random for the bound")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "rgb_emoji.json")
    args = parser.parse_args()
    images = args.work_dir / "emoji32"
    shutil.rmtree(images, ignore_errors=True)
    count = render_emoji_folder(images, resolution=32)
    real = [PIL.Image.open(path).convert("RGB") for path in sorted(images.glob("*.png"))[:64]]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    image_grid(real).save(args.json.parent / "real_rgb_emoji.png")  # what the samples are to look like
    flags = [
        "--train_data_dir", str(images), "--channels", "3", "--resolution", "32",
        "--max_train_steps", str(args.max_train_steps), "--checkpointing_steps", str(args.max_train_steps),
        "--num_eval_images", str(args.num_eval_images), "--lr_warmup_steps", "50",
    ]  # fmt: skip
    start = time.time()
    run = train(args.work_dir / "run", flags, launch_config="plain")
    wall = time.time() - start
    config = json.loads((args.work_dir / "run" / "unet" / "config.json").read_text())
    result = {
        "command": "accelerate launch training/train.py " + " ".join(flags).replace(f"{REPO}/", ""),
        "emoji_rendered": count,
        "wall_seconds_of_the_run": wall,
        "unet": {key: config[key] for key in ("sample_size", "in_channels", "block_out_channels")}
        | {"attention_resolutions": config["attention_resolutions"]},
        **run,
        "held_out": run["held_out"].replace(f"{REPO}/", ""),
    }
    args.json.write_text(json.dumps(result, indent=2))
    shutil.copy(args.work_dir / "run" / "samples.png", args.json.parent / "samples_rgb_emoji.png")
    nll = run["nll"]
    print(f"{count} emoji, {run['steps']} steps in {run['train_seconds_this_run']:.0f} s: {nll}")


if __name__ == "__main__":
    main()
