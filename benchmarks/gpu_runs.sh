#!/usr/bin/env bash
# The GPU measurements of the open speed and quality work, in stages that fit one 10-minute device call each:
#   STAGES="profile attention" OUT=results_dir DATA_DIR=folder_with_Beauty.txt bash benchmarks/gpu_runs.sh
# Stages: check (correctness of the packed kernels), profile (eager vs compiled kernels), attention (module and
# model tables: eager, compiled, graph, host), train / train_compiled (packed vs padded training throughput, eager
# or under --torch_compile), quality_beauty / quality_ml100k (packed vs padded, 3 seeds), ablation_beauty / ablation_ml100k
# (issue 14's table). Text logs read Beauty.txt / ml-100k.inter without the
# `datasets` library, so nothing needs installing on a machine with torch, triton and transformers.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
DATA_DIR=${DATA_DIR:-../shared/data}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
stage() { [[ " ${STAGES:-check profile attention train} " == *" $1 "* ]]; }
if stage check; then
  timeout 200 python3 scripts/check_triton_attention.py --kind varlen --output "$OUT/triton_varlen.json" 2>&1 | tee "$OUT/check.log" | tail -12
fi
if stage profile; then
  timeout 150 python3 benchmarks/profile_attention.py --lengths 200 4096 --compiled --rows 25 2>&1 | tee "$OUT/attention_profile_modes.txt"
fi
if stage attention; then
  timeout ${ATTENTION_LIMIT:-300} python3 scripts/benchmark_attention.py --skip-reference \
    --lengths ${LENGTHS:-200 1024 4096 16384} --model-lengths ${MODEL_LENGTHS:-200 4096} --output-dir "$OUT" 2>&1 \
    | tee "$OUT/attention.log" | tail -20
fi
if stage train; then
  timeout ${TRAIN_LIMIT:-420} python3 scripts/benchmark_training.py --data_dir "$DATA_DIR" --max_seconds ${MAX_SECONDS:-10} \
    --output "$OUT/training_benchmark" 2>&1 | tee "$OUT/train.log" | tail -40
fi
if stage train_compiled; then
  timeout 480 python3 scripts/benchmark_training.py --data_dir "$DATA_DIR" --max_seconds 10 --warmup_steps 5 \
    --torch_compile --output "$OUT/training_benchmark_compiled" 2>&1 | tail -40
fi
# quality_beauty, quality_ml100k: packed vs padded, 3 seeds, one dataset per stage and 6 runs at once (24 training
# processes on one 80 GB GPU ran out of memory and starved for CPU)
for dataset in beauty ml100k; do
  if stage quality_$dataset; then
    OMP_NUM_THREADS=1 timeout 580 python3 scripts/benchmark_quality.py --data_dir "$DATA_DIR" \
      --runs $dataset-blossom $dataset-dense --layouts packed padded --seeds 0 1 2 \
      --blossom_backend blossom_triton --max_parallel 6 --time_limit_s 540 --output_root /tmp/quality \
      --results "$OUT/quality_$dataset.json" 2>&1 | tee "$OUT/quality_$dataset.log" | tail -40
  fi
done
# ablation_beauty, ablation_ml100k: issue 14's table, one dataset per stage (18 runs, 6 at once)
for dataset in beauty ml100k; do
  if stage ablation_$dataset; then
    OMP_NUM_THREADS=1 timeout 580 python3 scripts/benchmark_quality.py --data_dir "$DATA_DIR" --table ablation \
      --runs $dataset-blossom $dataset-ltis $dataset-stis $dataset-nogate $dataset-nocomp $dataset-dense \
      --seeds 0 1 2 --max_parallel 6 --time_limit_s 540 --output_root /tmp/ablation \
      --results "$OUT/ablation_$dataset.json" 2>&1 | tee "$OUT/ablation_$dataset.log" | tail -40
  fi
done
