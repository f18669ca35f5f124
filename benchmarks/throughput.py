"""Training-step throughput on this machine, against its matmul peaks measured in the same run.

Measures, in one run and interleaved (so machine drift hits every arm alike):
  * the model comparison: hf_ddpm's default DenoisingUNet against diffusers' UNet2DModel of similar size, forward +
    backward + AdamW at 28x28 x 1 channel, float32 and (where the CPU computes bf16 natively, or with --precisions
    fp32 bf16) bf16 autocast, subnormals flushed as in train.py, FLOPs per
    step (torch.utils.flop_counter), achieved GFLOP/s and its fraction of the torch.mm peak in the same precision;
  * the default training step as train.py takes it (hybrid loss at sampled timesteps, in the precision
    ``--mixed_precision auto`` picks on this machine: bf16 autocast where the CPU computes bf16 natively, else
    float32; backward, clipping, AdamW, EMA; batch 32), against the matmul peak in that precision, as issue #13
    found it (1 thread, foreach AdamW, per-tensor EMA, subnormal floats
    on the CPU's slow path), on 2 threads, and as train.py runs it now; each in a process of its own.

    python benchmarks/throughput.py [--batch_size 128] [--repeats 15] [--json throughput.json]
    python benchmarks/throughput.py --profile     # where the time of hf_ddpm's fp32 step goes (torch.profiler)
    python benchmarks/throughput.py --cpu_compile --json F   # the CPU step eager, channels_last, torch.compile'd
    python benchmarks/throughput.py --device cuda --json throughput_gpu.json   # on a GPU: the step of train.py's gpu
        # recipe (bf16, fused AdamW, foreach EMA, data on the device) at several batches, eager and as CUDA graphs
        # (--cuda_compiled_batch_sizes: torch.compile too), the capture or compile time apart, against the bf16
        # matmul peak measured in the same run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from hf_ddpm import DenoisingUNet
from hf_ddpm.pipelines.auto import default_device
from hf_ddpm.training_utils import flush_denormals, resolve_mixed_precision


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


def matmul_peak_gflops(
    dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10, device: torch.device | str = "cpu"
) -> float:
    """Best GFLOP/s of torch.mm on size x size matrices of ``dtype`` (2 size^3 FLOPs each) on ``device``."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if a.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. 'AMD EPYC'), or the platform's machine type elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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


# The default training step as train.py takes it, in the configurations issue #13 compares; each runs in a process
# of its own, because the thread count and the subnormal flush are per process (and inherited by torch's threads).
STEP_CONFIGURATIONS = {
    "as found: 1 thread, foreach AdamW, per-tensor EMA": {"threads": 1, "fast_cpu_math": False},
    "2 threads, foreach AdamW, per-tensor EMA": {"threads": 2, "fast_cpu_math": False},
    "default: 2 threads, fused AdamW, foreach EMA, subnormals flushed": {"threads": 2, "fast_cpu_math": True},
}


def recipe_step(
    model: torch.nn.Module,
    forward: torch.nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    ema: Any,
    images: torch.Tensor,
    max_grad_norm: float,
    autocast: torch.autocast,
) -> None:
    """One step of train.py's recipe: the objective's loss through ``forward`` (the model, compiled, or graphed) under
    ``autocast``, backward, gradient clipping, AdamW, the objective's feedback, EMA."""
    with autocast:
        out = objective.loss(forward, images)
    out.loss.mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    objective.observe(out.feedback)
    ema.step(model.parameters())


def default_step_seconds(threads: int, fast_cpu_math: bool, batch_size: int, repeats: int) -> dict:
    """Seconds per step of train.py's default recipe (hybrid loss at sampled timesteps, in the precision that
    ``--mixed_precision auto`` resolves to here, backward, gradient clipping, AdamW, EMA) on random images, and this
    process's matmul peak in that precision at ``threads``."""
    if fast_cpu_math:
        flush_denormals()  # before torch starts its threads, as train.py does
    torch.set_num_threads(threads)
    from diffusers.training_utils import EMAModel

    from hf_ddpm.objectives import build_model_and_objective
    from hf_ddpm.training_args import parse_arguments

    model_args, data_args, train_args = parse_arguments(["--output_dir", "unused"])
    torch.manual_seed(0)
    model, objective = build_model_and_objective(model_args, data_args, train_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_args.learning_rate, fused=fast_cpu_math or None)
    ema = EMAModel(model.parameters(), decay=train_args.ema_max_decay, use_ema_warmup=True, foreach=fast_cpu_math)
    images = torch.rand(batch_size, data_args.channels, data_args.resolution, data_args.resolution) * 2 - 1
    bf16 = resolve_mixed_precision("auto") == "bf16"

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        recipe_step(model, model, objective, optimizer, ema, images, train_args.max_grad_norm, autocast)

    for _ in range(5):  # warm-up, and the optimizer's and EMA's state past their first steps
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return {
        "seconds_per_step": (time.perf_counter() - start) / repeats,
        "precision": "bf16" if bf16 else "fp32",
        "peak_gflops": matmul_peak_gflops(torch.bfloat16 if bf16 else torch.float32),
    }


def default_step_rows(batch_size: int, repeats: int, rounds: int, flops_per_image: float) -> list[dict]:
    """Every configuration of STEP_CONFIGURATIONS in its own process, interleaved over ``rounds``; medians."""
    measured: dict[str, list[dict]] = {name: [] for name in STEP_CONFIGURATIONS}
    for _ in range(rounds):
        for name, configuration in STEP_CONFIGURATIONS.items():
            command = [
                sys.executable, __file__, "--_step", json.dumps(configuration), "--batch_size", str(batch_size),
                "--repeats", str(repeats),
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(configuration["threads"])}
            output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
            measured[name].append(json.loads(output.strip().splitlines()[-1]))
    rows = []
    for name, runs in measured.items():
        seconds = sorted(r["seconds_per_step"] for r in runs)[len(runs) // 2]
        rows.append(
            {
                "configuration": name,
                **STEP_CONFIGURATIONS[name],
                "seconds_per_step": seconds,
                "images_per_second": batch_size / seconds,
                "achieved_gflops": flops_per_image * batch_size / seconds / 1e9,
                "precision": runs[0]["precision"],
                "peak_gflops_at_these_threads": sorted(r["peak_gflops"] for r in runs)[len(runs) // 2],
            }
        )
    for row in rows:
        row["speed_vs_as_found"] = rows[0]["seconds_per_step"] / row["seconds_per_step"]
    return rows


def step_row(
    images: np.ndarray,
    batch_size: int,
    forward_kind: str,
    steps: int,
    device: str = "cuda",
    bf16: bool = True,
    channels_last: bool = False,
) -> dict:
    """Seconds per step of train.py's training step on ``device`` (the default DDPM recipe's network and hybrid
    loss, bf16 autocast or float32, gradient clipping, fused AdamW, foreach EMA, batches cut on the device from
    resident images), with the network's forward and backward ``eager``, ``compiled`` (torch.compile, default mode)
    or replayed as ``cuda graphs`` (:class:`hf_ddpm.training_utils.CUDAGraphedNetwork`), its weights and inputs
    channels_last or not, the seconds of its first 3 steps (with the compilation or capture) and, on CUDA, its
    :func:`host_syncs_per_step`."""
    from diffusers.training_utils import EMAModel

    from hf_ddpm.data import ShuffledBatches
    from hf_ddpm.objectives import build_model_and_objective
    from hf_ddpm.training_args import parse_arguments
    from hf_ddpm.training_utils import CUDAGraphedNetwork

    model_args, data_args, train_args = parse_arguments(["--output_dir", "unused", "--recipe", "gpu"])
    torch.manual_seed(0)
    model, objective = build_model_and_objective(model_args, data_args, train_args)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_args.learning_rate, fused=True)
    ema = EMAModel(model.parameters(), decay=train_args.ema_max_decay, use_ema_warmup=True, foreach=True)
    ema.to(device)
    batches = iter(ShuffledBatches(images, batch_size, device, seed=0).epoch(0))
    if channels_last:
        batches = (batch.contiguous(memory_format=torch.channels_last) for batch in batches)
    # no cached casts: CUDA graphs refuse them (the same setting in every arm)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
    forward = {"eager": lambda: model, "compiled": lambda: torch.compile(model)}.get(forward_kind)
    if forward is None:
        with autocast:
            sample_t = torch.zeros(batch_size, dtype=torch.long, device=device)
            forward = CUDAGraphedNetwork(model, torch.zeros(batch_size, 1, 28, 28, device=device), sample_t)
    else:
        forward = forward()

    def step() -> None:
        recipe_step(model, forward, objective, optimizer, ema, next(batches), train_args.max_grad_norm, autocast)

    start = time.perf_counter()
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    syncs = host_syncs_per_step if device.startswith("cuda") else lambda _: None
    for _ in range(3):
        step()
    synchronize()
    warmup_seconds = time.perf_counter() - start
    count = min(steps, len(images) // batch_size - 6)
    start = time.perf_counter()
    for _ in range(count):
        step()
    synchronize()
    seconds = (time.perf_counter() - start) / count
    return {"seconds_per_step": seconds, "first_3_steps_seconds": warmup_seconds, "host_syncs_per_step": syncs(step)}


def host_syncs_per_step(step: Callable[[], None], steps: int = 3) -> float:
    """The operations per call of ``step`` that make the host wait for the GPU (a read back, a copy from pageable
    host memory), as torch's CUDA sync debug mode counts them: 0 lets the host queue steps ahead of the GPU."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught) / steps


def cuda_step_rows(arms: dict[str, list[int]], steps: int) -> dict:
    """:func:`step_row` on CUDA for each forward kind (``eager``, ``cuda graphs``, ``compiled``) at its batch sizes,
    with images/s and the fraction of the bf16 matmul peak measured in the same run (FLOPs per image from
    torch.utils.flop_counter)."""
    images = torch.randint(0, 256, (60_000, 1, 28, 28), dtype=torch.uint8).numpy()
    peak = matmul_peak_gflops(torch.bfloat16, size=8192, device="cuda")
    flops_per_image = flops_per_step(DenoisingUNet(), torch.randn(8, 1, 28, 28), torch.randint(0, 1000, (8,))) / 8
    rows = []
    for forward_kind, batch_sizes in arms.items():
        for batch_size in batch_sizes:
            timing = step_row(images, batch_size, forward_kind, steps)
            seconds = timing["seconds_per_step"]
            gflops = flops_per_image * batch_size / seconds / 1e9
            rows.append(
                {
                    "batch_size": batch_size,
                    "forward": forward_kind,
                    "ms_per_step": 1000 * seconds,
                    "images_per_second": batch_size / seconds,
                    "first_3_steps_seconds": timing["first_3_steps_seconds"],
                    "host_syncs_per_step": timing["host_syncs_per_step"],
                    "achieved_tflops": gflops / 1000,
                    "fraction_of_bf16_matmul_peak": gflops / peak,
                }
            )
            print(
                f"batch {batch_size:5d} {forward_kind:11s} {1000 * seconds:7.2f} ms/step {batch_size / seconds:9.0f} "
                f"img/s {gflops / 1000:6.2f} TFLOP/s ({100 * gflops / peak:.2f}% of peak); first 3 steps "
                f"{timing['first_3_steps_seconds']:.1f} s; {timing['host_syncs_per_step']:g} host syncs per step",
                flush=True,
            )
    return {
        "machine": f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
        "bf16_matmul_peak_tflops": peak / 1000,
        "gflop_per_image_fwd_bwd": flops_per_image / 1e9,
        "rows": rows,
    }


#: The CPU arms of ``--cpu_compile``: (forward, channels_last, bf16), measured in this order; the eager arms twice
#: (first and last), so that drift of the machine during the run shows.
CPU_COMPILE_ARMS = [
    ("eager", False, False),
    ("eager", False, True),
    ("eager", True, False),
    ("eager", True, True),
    ("compiled", False, False),
    ("compiled", False, True),
    ("eager", False, False),
    ("eager", False, True),
]


def cpu_compile_rows(batch_size: int, steps: int) -> dict:
    """:func:`step_row` on the CPU for each arm of CPU_COMPILE_ARMS (train.py's threads and subnormal flushing),
    each in a fresh model: ms per step, images/s, the first 3 steps' seconds (the compilation) and the speed
    against the first eager arm of the same precision."""
    flush_denormals()
    images = torch.randint(0, 256, (60_000, 1, 28, 28), dtype=torch.uint8).numpy()
    rows = []
    for forward_kind, channels_last, bf16 in CPU_COMPILE_ARMS:
        timing = step_row(images, batch_size, forward_kind, steps, "cpu", bf16=bf16, channels_last=channels_last)
        precision = "bf16" if bf16 else "fp32"
        row = {"forward": forward_kind, "channels_last": channels_last, "precision": precision, **timing}
        baseline = next(r for r in rows + [row] if r["precision"] == precision)["seconds_per_step"]
        row.update(images_per_second=batch_size / timing["seconds_per_step"])
        row.update(speed_vs_first_eager=baseline / timing["seconds_per_step"])
        rows.append(row)
        print(
            f"{forward_kind:8s} channels_last={channels_last!s:5s} {precision}: "
            f"{1000 * timing['seconds_per_step']:7.1f} ms/step {row['images_per_second']:6.1f} img/s "
            f"({row['speed_vs_first_eager']:.2f}x); first 3 steps {timing['first_3_steps_seconds']:.1f} s",
            flush=True,
        )
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return {"machine": machine, "batch_size": batch_size, "timed_steps": steps, "rows": rows}


def write_result(path: Path | None, result: dict) -> None:
    """``result`` as JSON at ``path`` (its folder made), if a path was given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=128, help="batch of the model comparison")
    parser.add_argument("--step_batch_size", type=int, default=32, help="batch of the default step (train.py's)")
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed steps per measurement (5 let one disturbed round decide)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=("fp32", "bf16"),
        default=None,
        help="precisions of the model comparison and the peaks (default: fp32, and bf16 where the CPU computes it "
        "natively, as --mixed_precision auto decides: emulated bf16 runs at a fraction of a GFLOP/s)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default=default_device(), help="cpu, or cuda: the GPU step only")
    parser.add_argument("--cuda_eager_batch_sizes", type=int, nargs="*", default=[32, 512, 1024])
    parser.add_argument("--cuda_graph_batch_sizes", type=int, nargs="*", default=[256, 512, 1024, 2048])
    parser.add_argument("--cuda_compiled_batch_sizes", type=int, nargs="*", default=[])
    parser.add_argument("--profile", action="store_true", help="only print where the time of hf_ddpm's fp32 step goes")
    parser.add_argument(
        "--cpu_compile",
        action="store_true",
        help="only the CPU training step eager, channels_last and torch.compile'd, fp32 and bf16 (CPU_COMPILE_ARMS)",
    )
    parser.add_argument("--_step", default=None, help=argparse.SUPPRESS)  # one default-step measurement (internal)
    args = parser.parse_args()
    if args._step is not None:
        print(
            json.dumps(
                default_step_seconds(**json.loads(args._step), batch_size=args.batch_size, repeats=args.repeats)
            )
        )
        return
    if args.device == "cuda":
        arms = {
            "eager": args.cuda_eager_batch_sizes,
            "cuda graphs": args.cuda_graph_batch_sizes,
            "compiled": args.cuda_compiled_batch_sizes,
        }
        result = cuda_step_rows(arms, steps=10 * args.repeats)
        write_result(args.json, result)
        return
    if args.cpu_compile:
        result = cpu_compile_rows(args.step_batch_size, steps=2 * args.repeats)
        write_result(args.json, result)
        return
    flush_denormals()  # the model comparison runs as train.py would run either model
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28)
    t = torch.randint(0, 1000, (args.batch_size,))
    if args.profile:
        print_profile(x, t)
        return
    models = {"hf_ddpm DenoisingUNet": DenoisingUNet(), "diffusers UNet2DModel": diffusers_unet()}
    optimizers = {name: torch.optim.AdamW(m.parameters(), 1e-4) for name, m in models.items()}
    flops = {name: flops_per_step(m, x, t) for name, m in models.items()}
    native = "bf16" if resolve_mixed_precision("auto") == "bf16" else "fp32"  # the default step's precision
    precisions = args.precisions or sorted({"fp32", native}, reverse=True)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    timings: dict[str, list[float]] = {f"{name} {p}": [] for name in models for p in precisions}
    peaks: dict[str, list[float]] = {p: [] for p in sorted({*precisions, native}, reverse=True)}
    for name, model in models.items():  # warm-up
        for precision in precisions:
            training_step(model, optimizers[name], x, t, bf16=precision == "bf16")
    for _ in range(args.rounds):
        for precision in peaks:
            peaks[precision].append(matmul_peak_gflops(dtypes[precision]))
        for name, model in models.items():
            for precision in precisions:
                start = time.perf_counter()
                for _ in range(args.repeats):
                    training_step(model, optimizers[name], x, t, bf16=precision == "bf16")
                timings[f"{name} {precision}"].append((time.perf_counter() - start) / args.repeats)
    peak = {precision: sorted(values)[len(values) // 2] for precision, values in peaks.items()}
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
                "fraction_of_matmul_peak_in_its_precision": gflops / peak[precision],
            }
        )
    reference = "fp32" if "fp32" in precisions else precisions[0]
    baseline = next(r for r in rows if r["model"] == "diffusers UNet2DModel" and r["precision"] == reference)[
        "images_per_second"
    ]
    for row in rows:
        row[f"speed_vs_diffusers_{reference}"] = row["images_per_second"] / baseline
    flops_per_image = flops["hf_ddpm DenoisingUNet"] / args.batch_size
    step_rows = default_step_rows(args.step_batch_size, args.repeats, args.rounds, flops_per_image)
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "batch_size": args.batch_size,
        **{f"{precision}_matmul_peak_gflops": value for precision, value in peak.items()},
        "rows": rows,
        "default_step": {"batch_size": args.step_batch_size, "rows": step_rows},
    }
    peaks_text = ", ".join(f"{precision} {value:.1f}" for precision, value in peak.items())
    print(f"matmul peak: {peaks_text} GFLOP/s ({result['machine']})")
    print(
        f"{'model':24s} {'prec':5s} {'params':>9s} {'img/s':>7s} {'GFLOP/img':>9s} {'GFLOP/s':>8s} {'%peak':>6s} "
        f"{'vs diffusers ' + reference:>17s}"
    )
    for r in rows:
        print(
            f"{r['model']:24s} {r['precision']:5s} {r['parameters']:9,d} {r['images_per_second']:7.1f} "
            f"{r['gflop_per_image']:9.3f} {r['achieved_gflops']:8.1f} "
            f"{100 * r['fraction_of_matmul_peak_in_its_precision']:5.0f}% "
            f"{r[f'speed_vs_diffusers_{reference}']:16.2f}x"
        )
    step_precision = step_rows[0]["precision"]
    print(f"default training step, batch {args.step_batch_size}, {step_precision} (--mixed_precision auto here):")
    for r in step_rows:
        print(
            f"  {r['configuration']:66s} {1000 * r['seconds_per_step']:7.1f} ms {r['images_per_second']:7.1f} img/s "
            f"{r['achieved_gflops']:7.1f} GFLOP/s ({100 * r['achieved_gflops'] / peak[step_precision]:.0f}% of the "
            f"{step_precision} peak) {r['speed_vs_as_found']:5.2f}x"
        )
    write_result(args.json, result)


if __name__ == "__main__":
    main()
