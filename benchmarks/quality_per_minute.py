"""Quality per CPU-minute: the DDPM recipe of hf_ddpm 0.2.0, pinned flag by flag, against today's default and the
continuous-time VDM, each trained for the same wall-clock minutes on this machine in one invocation.

    python benchmarks/quality_per_minute.py [--minutes 5 15 | --steps N] [--recipes pinned_0.2.0 default vdm] \
        [--seeds 0 1 2] [--num_samples 1000] [--json benchmarks/results/quality_per_minute_MACHINE_DATE.json]

Each recipe and budget is one ``training/train.py --train_minutes M`` run (the run times its own step here and trains
the steps that fit, so a recipe with a slower step gets fewer of them), trained back to back, then scored by ``hf_ddpm
evaluate`` once per seed of ``--seeds``: the bound on all 10,000 official t10k digits (8 stratified timesteps per
image, x_0 estimate clipped) and the sample metrics of ``--num_samples`` samples (100 steps) against all t10k (mean and
spread over the seeds), each ``hf_ddpm evaluate`` timed. The table gives the steps each run chose, whether it
compiled, its training seconds and the seconds of its end-of-training outputs (held-out bound, sample grid, plots,
card: from the last step's log line to ``eval_results.json``), so the main job's minutes can be checked here too. A
run or a score that an earlier invocation finished in ``--work_dir`` is reused, not repeated.
With ``--emulate_avx2``,
every run (training and scoring) is restricted to AVX2 kernels in float32 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``--mixed_precision no``): an approximation of an
AVX2-only CPU on a machine with AVX-512 (clock and memory bandwidth stay the host's, so the emulated step can be
faster than a real AVX2 CPU's). ``--steps N`` trains N optimizer steps (``--max_train_steps N``) instead of a
minutes budget: the steps a slower machine's budget chose (train.py logs them), so that machine's model is trained
and scored here; ``steps_within_budget`` gives them from its step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from budget import NEVER, REPO, train  # noqa: E402
from throughput import cpu_name  # noqa: E402

#: sqrt(beta~_2) of the cosine schedule at T = 1000, the learned decoder's smallest standard deviation before
#: --decoder_min_std (improved-diffusion's clip): the same float64 log-variance as the clip.
IMPROVED_DIFFUSION_DECODER_MIN_STD = "0.0046679220372336785"
#: hf_ddpm 0.2.0's CPU recipe, every flag that shapes the model or its training written out, so that a change of
#: the defaults leaves it as it was.
PINNED_0_2_0 = [
    *("--model", "ddpm", "--architecture", "hf_ddpm", "--block_out_channels", "32", "64", "64"),
    *("--layers_per_block", "1", "--attention_resolutions", "7", "--dropout", "0.0"),
    *("--loss_type", "hybrid", "--prediction_type", "epsilon", "--variance_type", "learned_range"),
    *("--decoder_min_std", IMPROVED_DIFFUSION_DECODER_MIN_STD),
    *("--beta_schedule", "cosine", "--num_train_timesteps", "1000", "--timestep_sampler", "auto"),
    *("--train_batch_size", "32", "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "100"),
    *("--adam_beta1", "0.9", "--adam_beta2", "0.99", "--adam_weight_decay", "0.0", "--max_grad_norm", "1.0"),
    *("--use_ema", "true", "--ema_inv_gamma", "1.0", "--ema_power", "0.75", "--ema_max_decay", "0.9999"),
    *("--compile", "false", "--guidance_scale", "1"),
]
#: the continuous-time VDM (``--model vdm``) with the default's everything else, for its row at the same minutes
RECIPES = {"pinned_0.2.0": PINNED_0_2_0, "default": [], "vdm": ["--model", "vdm"]}
#: the recipe re-tune's candidates: the default with one choice changed (a batch with its learning rate, scaled by
#: the square root of the batch), each trained for the same minutes; run with ``--recipes default CANDIDATE ...``.
#: ``widths_16_32_32`` became the cpu recipe's default on 2026-12-07 (kept for the commands run before it);
#: ``widths_32_64_64`` is the network before it, with everything else today's default.
CANDIDATES = {
    "v_prediction": ["--prediction_type", "v_prediction"],
    "lr_2e-3": ["--learning_rate", "2e-3"],
    "lr_6e-4": ["--learning_rate", "6e-4"],
    "batch_64": ["--train_batch_size", "64", "--learning_rate", "1.4e-3"],
    "batch_16": ["--train_batch_size", "16", "--learning_rate", "7e-4"],
    "widths_48_96_96": ["--block_out_channels", "48", "96", "96"],
    "widths_16_32_32": ["--block_out_channels", "16", "32", "32"],
    "widths_24_48_48": ["--block_out_channels", "24", "48", "48"],
    "widths_32_64_64": ["--block_out_channels", "32", "64", "64"],
    "warmup_stable_decay": ["--lr_scheduler", "warmup_stable_decay", "--lr_decay_fraction", "0.2"],
    "warmup_stable_decay_0.4": ["--lr_scheduler", "warmup_stable_decay", "--lr_decay_fraction", "0.4"],
    "warmup_stable_decay_0.6": ["--lr_scheduler", "warmup_stable_decay", "--lr_decay_fraction", "0.6"],
    "fourier_7_8": ["--fourier_features", "7", "8"],
    "loss_vlb": ["--loss_type", "vlb"],
    "hybrid_decoder": ["--loss_type", "hybrid_decoder", "--timestep_sampler", "uniform"],
    "hybrid_decoder_oversampled": ["--loss_type", "hybrid_decoder", "--timestep_sampler", "decoder-oversampled"],
    "decoder_min_std_improved_diffusion": ["--decoder_min_std", IMPROVED_DIFFUSION_DECODER_MIN_STD],
    "no_autoguidance": ["--guidance_scale", "1"],
    **{
        f"decoder_share_1_{n}": ["--loss_type", "hybrid_decoder", "--decoder_share", str(1 / n)]
        for n in (128, 64, 16, 8)
    },
}
AVX2_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def score(folder: Path, seed: int, num_samples: int) -> dict:
    """``hf_ddpm evaluate`` of ``folder``: the bound on all t10k and ``num_samples`` samples of seed ``seed`` scored
    against all t10k, in a process of its own (the environment's kernels); kept in ``evaluate_seed{seed}.json``,
    which a later invocation reuses."""
    out = folder / f"evaluate_seed{seed}.json"
    if not out.exists():
        command = [
            *(str(Path(sys.executable).parent / "hf_ddpm"), "evaluate", str(folder), "--data", "embedded"),
            *("--split", "test", "--num_samples", str(num_samples), "--seed", str(seed), "--json", str(out)),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), minimum and maximum of ``values``."""
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": deviation, "min": min(values), "max": max(values)}


def sample_summary(row: dict) -> str:
    """'FD mean ± sd, confidence mean ± sd' of a row's sample metrics (their spread over sampling seeds)."""
    fd, confidence = row["frechet_distance"], row["mean_confidence"]
    return f"FD {fd['mean']:.1f} ± {fd['std']:.1f}, confidence {confidence['mean']:.3f} ± {confidence['std']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 15])
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[],
        help="instead of --minutes: train N steps (--max_train_steps N), the steps another machine's budget chose",
    )
    parser.add_argument("--recipes", nargs="+", choices=[*RECIPES, *CANDIDATES], default=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds of the sample metrics")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--emulate_avx2", action="store_true", help="AVX2 kernels only, float32 (see above)")
    parser.add_argument("--work_dir", type=Path, default=REPO / "benchmarks" / "runs" / "quality_per_minute")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "quality_per_minute.json")
    args = parser.parse_args()
    if args.emulate_avx2:
        os.environ.update(AVX2_ENVIRONMENT)  # inherited by every train.py and hf_ddpm evaluate process
        # Inductor's kernels of its own: kernels cached for this host's AVX-512 crashed (SIGSEGV) under AVX2 dispatch
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.work_dir / "inductor_cache_avx2")
    precision = ["--mixed_precision", "no"] if args.emulate_avx2 else []
    rows, machine = [], f"{cpu_name()}, {os.cpu_count()} cores"
    budgets = [(f"{n}steps", ["--max_train_steps", str(n)], None) for n in args.steps] or [
        (f"{m:g}min", ["--train_minutes", str(m)], m) for m in args.minutes
    ]
    for label, budget_flags, minutes in budgets:
        for name in args.recipes:
            folder = args.work_dir / f"{name}_{label}{'_avx2' if args.emulate_avx2 else ''}"
            finished = folder / "eval_results.json"  # a run an earlier invocation finished is scored, not retrained
            run = json.loads(finished.read_text()) if finished.exists() else None
            flags = [*{**RECIPES, **CANDIDATES}[name], *precision, "--logger", "none", *budget_flags]
            run = run or train(folder, [*flags, "--checkpointing_steps", str(NEVER)])  # one checkpoint, at the end
            # the end-of-training outputs: from the last step's log line to the last file the run writes
            outputs_seconds = finished.stat().st_mtime - (folder / "train_log.jsonl").stat().st_mtime
            scores, score_seconds = [], []
            for seed in args.seeds:
                start = time.perf_counter()
                scores.append(score(folder, seed, args.num_samples))
                score_seconds.append(time.perf_counter() - start)
            nll = spread([s["bits_per_dim"] for s in scores])
            quality = [s["sample_quality"] for s in scores]
            rows.append(
                {
                    "recipe": name,
                    "minutes": minutes,
                    "steps": run["steps"],
                    "compiled": json.loads((folder / "training_args.json").read_text())["compile"],
                    "train_seconds": run["train_seconds_this_run"],
                    "outputs_seconds": outputs_seconds,
                    "mixed_precision": run["mixed_precision"],
                    "nll_bits_per_dim": nll,
                    "nll_standard_error": [s["standard_error"] for s in scores],
                    "frechet_distance": spread([q["frechet_distance"] for q in quality]),
                    "mean_confidence": spread([q["mean_confidence"] for q in quality]),
                    "class_kl_from_uniform": spread([q["class_kl_from_uniform"] for q in quality]),
                    "evaluate_seconds": score_seconds,  # 0 where an earlier invocation's score was reused
                }
            )
            row = rows[-1]
            print(
                f"{name:14s} {label:>9s}: {row['steps']:6d} steps (compiled: {row['compiled']}) in "
                f"{row['train_seconds']:6.1f} s (+"
                f"{row['outputs_seconds']:.0f} s outputs), NLL {nll['mean']:.4f} (SE "
                f"{row['nll_standard_error'][0]:.4f}), {sample_summary(row)}",
                flush=True,
            )
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps({"machine": machine, "avx2_emulated": args.emulate_avx2, "rows": rows}, indent=2)
            )


if __name__ == "__main__":
    main()
