"""Sampling speed: the network's forward in each precision and layout, and the 1,000-sample, 100-step evaluation of a
trained model as hf_ddpm 0.2.0 ran it (float32, contiguous, eager) against hf_ddpm.sampling_speedup's choice, with the
sample metrics of each (same seed: the same noise, only the network's arithmetic differs).

    python benchmarks/sampling_speed.py --forward [--batch_size 250] [--emulate_avx2] [--device cuda] [--json FILE]
    python benchmarks/sampling_speed.py MODEL_DIR [--arms fp32_eager auto] [--num_samples 1000] [--steps 100] \
        [--emulate_avx2] [--device cuda] [--json benchmarks/results/sampling_speed_MACHINE_DATE.json]

``--forward`` times one forward of ``--batch_size`` images of the default 28x28 network (random weights) in float32
and bf16 autocast, contiguous, channels_last and torch.compile'd (compile time separate; best of 3 after a warm-up).
With a model folder, each arm draws ``--num_samples`` samples in one batch of ``--steps`` ancestral steps and scores
them against all 10,000 official t10k digits. Arms: ``fp32_eager`` (the pipeline's own call: hf_ddpm 0.2.0),
``auto`` (``fast_sampling``'s choice on this machine), ``bf16_eager``, ``fp32_channels_last``, ``fp32_compiled``,
``bf16_compiled``. ``--emulate_avx2`` re-runs this script with AVX2 kernels only (as ``quality_per_minute.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from budget import REPO  # noqa: E402
from hf_ddpm import DenoisingUNet, default_unet_layout  # noqa: E402
from hf_ddpm.data import ImageTensorDataset, load_images  # noqa: E402
from hf_ddpm.metrics import sample_quality  # noqa: E402
from hf_ddpm.pipelines.auto import default_device, load_pipeline  # noqa: E402
from hf_ddpm.sampling_speedup import SamplingSpeedup, fast_sampling, sped_up_network  # noqa: E402
from hf_ddpm.training_budget import timed  # noqa: E402
from quality_per_minute import AVX2_ENVIRONMENT  # noqa: E402
from throughput import cpu_name  # noqa: E402

#: arm -> (precision, compile) given to fast_sampling; None: the pipeline's own call, no speedup (hf_ddpm 0.2.0).
ARMS = {
    "fp32_eager": None,
    "auto": ("auto", None),
    "bf16_eager": ("bf16", False),
    "fp32_channels_last": ("fp32", False),
    "fp32_compiled": ("fp32", True),
    "bf16_compiled": ("bf16", True),
}
#: --forward's settings: name -> SamplingSpeedup (precision, channels_last, compiled).
FORWARD_SETTINGS = {
    "fp32": SamplingSpeedup("fp32", False, False, ""),
    "fp32_channels_last": SamplingSpeedup("fp32", True, False, ""),
    "fp32_compiled": SamplingSpeedup("fp32", False, True, ""),
    "bf16": SamplingSpeedup("bf16", False, False, ""),
    "bf16_channels_last": SamplingSpeedup("bf16", True, False, ""),
    "bf16_compiled": SamplingSpeedup("bf16", False, True, ""),
}


def forward_rows(batch_size: int, device: str) -> dict:
    """Seconds of one forward of ``batch_size`` images on ``device`` per setting (best of 3 after one untimed call,
    whose time is the compile time of a compiled setting); the weights and inputs drawn on the CPU."""
    torch.manual_seed(0)
    widths, attention = default_unet_layout(28, 1)
    network = DenoisingUNet(block_out_channels=widths, attention_resolutions=attention, learn_variance=True)
    network.eval().to(device)
    x, t = torch.randn(batch_size, 1, 28, 28).to(device), torch.full((batch_size,), 500, device=device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    rows = {}
    with torch.no_grad():
        for name, speedup in FORWARD_SETTINGS.items():
            torch._dynamo.reset()
            with sped_up_network(network, speedup):
                first = timed(partial(network, x, t), synchronize)
                times = [timed(partial(network, x, t), synchronize) for _ in range(3)]
            rows[name] = {"seconds": min(times), "first_call_seconds": first}
            print(f"{name:20s} {min(times):.3f} s (first call {first:.1f} s)", flush=True)
    return rows


def sampling_rows(model: Path, arms: list[str], num_samples: int, steps: int, seed: int, device: str) -> dict:
    """Per arm: seconds to draw ``num_samples`` samples of ``steps`` steps on ``device`` and copy them to the CPU,
    the settings, and the sample metrics against all t10k."""
    pipeline = load_pipeline(model).to(device)
    pipeline.set_progress_bar_config(disable=True)
    reference = ImageTensorDataset(load_images(None, split="test").images)[:]
    rows = {}
    for arm in arms:
        torch._dynamo.reset()
        generator = torch.Generator().manual_seed(seed)
        settings = ARMS[arm]
        start = time.perf_counter()
        context = nullcontext() if settings is None else fast_sampling(pipeline, num_samples * steps, *settings)
        with context as speedup:
            samples = pipeline(
                batch_size=num_samples, generator=generator, num_inference_steps=steps, output_type="pt"
            ).images.cpu()
        seconds = time.perf_counter() - start
        quality = sample_quality(samples * 2 - 1, reference)
        rows[arm] = {"seconds": seconds, "settings": vars(speedup) if speedup else "fp32, eager", **vars(quality)}
        print(
            f"{arm:20s} {seconds:7.1f} s  FD {quality.frechet_distance:.2f}  confidence {quality.mean_confidence:.4f}"
            f"  ({speedup.reason if speedup else 'the pipeline as hf_ddpm 0.2.0 ran it'})",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, help="a trained pipeline folder (not with --forward)")
    parser.add_argument("--forward", action="store_true", help="time the network's forward per setting only")
    parser.add_argument("--batch_size", type=int, default=250, help="--forward's batch")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["fp32_eager", "auto"])
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--emulate_avx2", action="store_true", help="AVX2 kernels only (see above)")
    parser.add_argument(
        "--device", default=default_device(), help="torch device to run on (default: cuda where available, else cpu)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.forward == (args.model is not None):
        parser.error("give a model folder or --forward, not both and not neither")
    if args.emulate_avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":  # the kernels are chosen at import
        cache = REPO / "benchmarks" / "runs" / "inductor_cache_avx2"  # AVX-512 kernels crashed under AVX2 dispatch
        os.execve(
            sys.executable,
            [sys.executable, *sys.argv],
            {**os.environ, **AVX2_ENVIRONMENT, "TORCHINDUCTOR_CACHE_DIR": str(cache)},
        )
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": args.device,
        "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]),
    }
    if args.forward:
        result["forward"] = {"batch_size": args.batch_size, "rows": forward_rows(args.batch_size, args.device)}
    else:
        result["sampling"] = {
            "model": str(args.model),
            "num_samples": args.num_samples,
            "steps": args.steps,
            "rows": sampling_rows(args.model, args.arms, args.num_samples, args.steps, args.seed, args.device),
        }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
