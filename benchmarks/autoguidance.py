"""Autoguidance (Karras et al. 2024) on one trained DDPM: which guide and which w give the best samples.

The model is a train.py run's final pipeline; each guide is another saved pipeline of the same network, such as the
same run's EMA at an earlier step (``--save_pipeline_steps``) or another, shorter run; without ``--guides``, the
model's own ``guide_unet`` (an autoguided run's). For every (guide, w) the
model samples ``D_guide + w (D - D_guide)`` (``HFDDPMPipeline(guide_unet=..., guidance_scale=w)``);
``--num_samples`` samples of ``--steps`` steps per sampling seed (the same noise for every arm) are scored against
all t10k: mean and spread over the seeds. w = 1 (the model alone) is scored once. Guidance changes sampling only: the
bound is the model's.

    python training/train.py --max_train_steps 8772 --save_pipeline_steps 1096 --output_dir RUN_DIR
    python benchmarks/autoguidance.py RUN_DIR --guides RUN_DIR/pipeline-4384 RUN_DIR/pipeline-5480 \
        --scales 1 2 3 [--seeds 0] [--num_samples 1000] [--device cuda] \
        [--json benchmarks/results/autoguidance_MACHINE_DATE.json]
    python benchmarks/autoguidance.py RUN_DIR --scales 1 2 --seeds 0 1 2    # an autoguided run, with and without
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from budget import REPO  # noqa: E402
from hf_ddpm import HFDDPMPipeline  # noqa: E402
from hf_ddpm.data import ImageTensorDataset, load_images  # noqa: E402
from hf_ddpm.pipelines.auto import default_device, load_pipeline  # noqa: E402
from posthoc_ema import sample_scores  # noqa: E402
from quality_per_minute import sample_summary  # noqa: E402
from throughput import cpu_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the model: a saved HFDDPMPipeline (a train.py output_dir)")
    parser.add_argument(
        "--guides", type=Path, nargs="*", default=[], help="saved pipelines of the same network (default: its own)"
    )
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="the w to score")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100, help="sampling steps")
    parser.add_argument(
        "--device", default=default_device(), help="torch device to run on (default: cuda where available, else cpu)"
    )
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "autoguidance.json")
    args = parser.parse_args()

    model = load_pipeline(str(args.model)).to(args.device)
    images = ImageTensorDataset(load_images("embedded", split="test").images)[:]
    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "device": args.device,
        "model": str(args.model),
        "steps": json.loads((args.model / "eval_results.json").read_text())["steps"],
        "sampling_steps": args.steps,
        "arms": [],
    }
    own = getattr(model, "guide_unet", None)
    if not args.guides and own is None:
        parser.error(f"{args.model} has no guide_unet of its own: name the guides with --guides")
    guides = {str(guide): load_pipeline(str(guide)).to(args.device).unet for guide in args.guides}
    guides = guides or {"its own guide_unet": own}
    arms = [("the model alone", None, 1.0)] if 1.0 in args.scales else []
    arms += [(label, guide, w) for label, guide in guides.items() for w in args.scales if w != 1.0]
    for label, guide, w in arms:
        pipeline = HFDDPMPipeline(unet=model.unet, scheduler=model.scheduler, guide_unet=guide, guidance_scale=w)
        pipeline.set_progress_bar_config(disable=True)
        result = sample_scores(pipeline, images, args.seeds, args.num_samples, args.steps)
        report["arms"].append({"guide": label, "guidance_scale": w, **result})
        print(f"{label:40s} w {w:g}: {sample_summary(result)}", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
