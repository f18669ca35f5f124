"""Training-step throughput of hf_ddpm's default DenoisingUNet vs diffusers' UNet2DModel of similar size, here.

Measures, in one run and interleaved (so machine drift hits both alike):
  * forward+backward+AdamW images/s at 28x28 x 1 channel, float32 and bf16 autocast;
  * FLOPs per training step (torch.utils.flop_counter) -> achieved GFLOP/s;
  * the machine's float32 matmul peak (torch.mm, square matrices), and the achieved fraction of it.

    python benchmarks/throughput.py [--batch_size 128] [--repeats 5] [--json benchmarks/results/throughput.json]
    python benchmarks/throughput.py --profile     # where the time of hf_ddpm's fp32 step goes (torch.profiler)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from hf_ddpm import DenoisingUNet


def diffusers_unet() -> UNet2DModel:
    """UNet2DModel at 28x28 with levels 28/14/7, attention at 7 and a parameter count close to DenoisingUNet's."""
    return UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=2,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )


def training_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor, bf16: bool
) -> None:
    """One forward + backward + AdamW step on the mean squared output (the cost of an epsilon-MSE step)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x, t).sample
    out.float().square().mean().backward()
    optimizer.step()


def flops_per_step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """FLOPs of forward + backward (the optimizer's elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        model(x, t).sample.square().mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Best float32 GFLOP/s of torch.mm on size x size matrices (2 size^3 FLOPs each)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def print_profile(x: torch.Tensor, t: torch.Tensor, steps: int = 3) -> None:
    """Share of CPU time per operator over ``steps`` fp32 training steps of the default DenoisingUNet."""
    from torch.profiler import ProfilerActivity, profile

    model = DenoisingUNet()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    training_step(model, optimizer, x, t, bf16=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            training_step(model, optimizer, x, t, bf16=False)
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    for event in events[:10]:
        print(f"{event.key:40s} {100 * event.self_cpu_time_total / total:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="only print where the time of hf_ddpm's fp32 step goes")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28)
    t = torch.randint(0, 1000, (args.batch_size,))
    if args.profile:
        print_profile(x, t)
        return
    models = {"hf_ddpm DenoisingUNet": DenoisingUNet(), "diffusers UNet2DModel": diffusers_unet()}
    optimizers = {name: torch.optim.AdamW(m.parameters(), 1e-4) for name, m in models.items()}
    flops = {name: flops_per_step(m, x, t) for name, m in models.items()}
    timings: dict[str, list[float]] = {f"{name} {p}": [] for name in models for p in ("fp32", "bf16")}
    peaks = []
    for name, model in models.items():  # warm-up
        for bf16 in (False, True):
            training_step(model, optimizers[name], x, t, bf16)
    for _ in range(args.rounds):
        peaks.append(matmul_peak_gflops())
        for name, model in models.items():
            for bf16 in (False, True):
                start = time.perf_counter()
                for _ in range(args.repeats):
                    training_step(model, optimizers[name], x, t, bf16)
                timings[f"{name} {'bf16' if bf16 else 'fp32'}"].append((time.perf_counter() - start) / args.repeats)
    peak = sorted(peaks)[len(peaks) // 2]
    rows = []
    for key, seconds in timings.items():
        name, precision = key.rsplit(" ", 1)
        step = sorted(seconds)[len(seconds) // 2]
        gflops = flops[name] / step / 1e9
        rows.append(
            {
                "model": name,
                "precision": precision,
                "parameters": sum(p.numel() for p in models[name].parameters()),
                "images_per_second": args.batch_size / step,
                "gflop_per_image": flops[name] / args.batch_size / 1e9,
                "achieved_gflops": gflops,
                "fraction_of_fp32_matmul_peak": gflops / peak,
            }
        )
    baseline = next(r for r in rows if r["model"] == "diffusers UNet2DModel" and r["precision"] == "fp32")[
        "images_per_second"
    ]
    for row in rows:
        row["speed_vs_diffusers_fp32"] = row["images_per_second"] / baseline
    result = {
        "machine": (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}"
        ),
        "batch_size": args.batch_size,
        "fp32_matmul_peak_gflops": peak,
        "rows": rows,
    }
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s ({result['machine']})")
    print(
        f"{'model':24s} {'prec':5s} {'params':>9s} {'img/s':>7s} {'GFLOP/img':>9s} {'GFLOP/s':>8s} {'%peak':>6s} "
        f"{'vs diffusers':>12s}"
    )
    for r in rows:
        print(
            f"{r['model']:24s} {r['precision']:5s} {r['parameters']:9,d} {r['images_per_second']:7.1f} "
            f"{r['gflop_per_image']:9.3f} "
            f"{r['achieved_gflops']:8.1f} {100 * r['fraction_of_fp32_matmul_peak']:5.0f}% "
            f"{r['speed_vs_diffusers_fp32']:11.2f}x"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
