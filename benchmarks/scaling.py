"""How training and sampling time grow on this machine with batch size, image count and accelerate processes.

    python benchmarks/scaling.py [--json benchmarks/results/scaling.json]

Training: real ``train.py`` runs of the default recipe, one epoch each, timed by the run itself (start-up and the
final evaluation excluded):
  * batch size 16 / 32 / 64 / 128 on the first 5,000 embedded training digits;
  * 1,250 / 2,500 / 5,000 training images at batch 32;
  * 1 vs 2 processes through ``accelerate launch`` (training/configs/cpu_1proc.yaml and cpu_2proc.yaml) at the same
    global batch of 32 images per optimizer step (32 x 1 and 16 x 2);
  * 1 thread vs all cores in one process launched as the README does (a bare ``accelerate launch``), with
    OMP_NUM_THREADS=1 set by the user or not set (then train.py gives torch all cores).
Sampling: HFDDPMPipeline with the default network, 50 respaced steps, batch 1 / 16 / 64 / 256 (time per image).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hf_ddpm import DenoisingUNet, HFDDPMPipeline, HFDDPMScheduler

sys.path.insert(0, str(Path(__file__).parent))
from budget import FAST_OUTPUTS, REPO, train  # noqa: E402


def epoch(
    work_dir: Path, name: str, images: int, batch_per_process: int, processes: int = 1, threads: int | None = None
) -> dict:
    """Train one epoch of the first ``images`` embedded training digits (the held-out digits come from the official
    test split, so every one of them is trained on); seconds and images/s of the training loop."""
    steps = images // (batch_per_process * processes)
    flags = [
        *FAST_OUTPUTS,
        "--max_train_images",
        str(images),
        "--train_batch_size",
        str(batch_per_process),
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        str(steps),
    ]
    if threads is not None:  # the README's command, a bare `accelerate launch`, with OMP_NUM_THREADS set or not
        run = train(work_dir / name, flags, launch_config="plain", threads=threads or None)
    else:
        config = REPO / "training" / "configs" / ("cpu_2proc.yaml" if processes == 2 else "cpu_1proc.yaml")
        run = train(work_dir / name, flags, launch_config=config)
    seconds = run["train_seconds_this_run"]
    row = {
        "images": images,
        "trained_images": steps * batch_per_process * processes,
        "batch_per_process": batch_per_process,
        "processes": processes,
        "threads_per_process": run.get("threads_per_process"),
        "steps": steps,
        "epoch_seconds": seconds,
        "images_per_second": run["images_seen"] / seconds,
    }
    print(f"{name:24s} {steps:5d} steps  {seconds:7.1f} s/epoch  {row['images_per_second']:6.1f} img/s", flush=True)
    return row


def sampling(batch_sizes: tuple[int, ...], steps: int) -> list[dict]:
    """Milliseconds per sampled image at each batch size (default network, random weights: the cost is the same)."""
    pipe = HFDDPMPipeline(
        unet=DenoisingUNet(), scheduler=HFDDPMScheduler(beta_schedule="cosine", variance_type="learned_range")
    )
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=2, num_inference_steps=2)  # warm-up
    rows = []
    for batch in batch_sizes:
        start = time.perf_counter()
        pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        rows.append({"batch_size": batch, "steps": steps, "ms_per_image": 1000 * seconds / batch, "seconds": seconds})
        print(f"sampling batch {batch:4d}: {1000 * seconds / batch:8.1f} ms/image", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=REPO / "benchmarks" / "runs" / "scaling")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "scaling.json")
    args = parser.parse_args()
    result = {
        "batch_size": [epoch(args.work_dir, f"batch_{b}", 5000, b) for b in (16, 32, 64, 128)],
        "image_count": [epoch(args.work_dir, f"images_{n}", n, 32) for n in (1250, 2500, 5000)],
        "processes": [epoch(args.work_dir, f"processes_{p}", 5000, 32 // p, processes=p) for p in (1, 2)],
        # 1 thread (OMP_NUM_THREADS=1, what a bare accelerate launch gave before train.py widened it) vs all cores
        "threads": [epoch(args.work_dir, f"threads_{n or 'all'}", 5000, 32, threads=n) for n in (1, 0)],
        "sampling": sampling((1, 16, 64, 256), steps=50),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
