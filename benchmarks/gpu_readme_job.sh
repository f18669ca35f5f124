#!/usr/bin/env bash
# On one CUDA GPU, the measurements of the GPU recipe, in one command (what benchmarks/README.md reports):
#   1. benchmarks/throughput.py --device cuda: train.py's step (data on the device, bf16, fused AdamW, foreach EMA)
#      at batch 32 / 256 / 512 / 1024 eager and 512 compiled, against the bf16 matmul peak of the same run;
#   2. the README's main job as written (`accelerate launch training/train.py`, which picks --recipe gpu there),
#      timed from launch to exit: compilation, the end-of-run bound, plots, samples and card included;
#   3. its model scored on all 10,000 t10k digits and 1,000 samples (`hf_ddpm evaluate`).
# Usage: OUT=results_folder bash benchmarks/gpu_readme_job.sh   (hf_ddpm and diffusers installed or on PYTHONPATH)
set -u
OUT=${OUT:-benchmarks/runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
JOB=${JOB:-/tmp/ddpm-mnist-gpu}
LAUNCH="accelerate launch"
command -v accelerate >/dev/null || LAUNCH="python3 -m accelerate.commands.launch"
rm -rf "$JOB"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)"
    echo "== throughput"
    timeout 240 python3 benchmarks/throughput.py --device cuda --json "$OUT/throughput_gpu.json"
    echo "== the README job"
    start=$(date +%s.%N)
    timeout 300 $LAUNCH training/train.py --output_dir "$JOB"
    status=$?
    end=$(date +%s.%N)
    echo "README job: exit $status, wall seconds $(python3 -c "print(round($end - $start, 1))")"
    echo "== scored on all t10k and 1,000 samples"
    start=$(date +%s.%N)
    timeout 300 python3 -m hf_ddpm.cli evaluate "$JOB" --data embedded --split test --num_samples 1000 --json "$OUT/t10k_eval.json"
    end=$(date +%s.%N)
    echo "evaluate: wall seconds $(python3 -c "print(round($end - $start, 1))")"
} 2>&1 | tr "\r" "\n" | grep -v -E "it/s\]\s*$|s/it\]\s*$" | tee "$OUT/log.txt"
cp "$JOB/eval_results.json" "$JOB/train_log.jsonl" "$JOB/samples.png" "$OUT/" 2>/dev/null
true
