#!/usr/bin/env bash
# The GPU measurements of the open speed and quality work, in stages that fit one 10-minute device call each:
#   STAGES="profile attention" OUT=results_dir DATA_DIR=folder_with_Beauty.txt bash benchmarks/gpu_runs.sh
# Stages: gpu_tests (pytest's CUDA-only tests), check (correctness of the packed kernels; check_tf32: float32 at
# "high" precision; check_model: whole models against blossom_torch), tune (launch settings to choose), profile (eager
# vs compiled kernels), attention (module and model tables: eager, compiled, graph, host), train (packed vs padded
# training throughput), train_modes (eager, compiled and CUDA graphs, packed), quality_beauty / quality_ml100k (packed
# vs padded, 3 seeds), tune_ml100k / tune_beauty (validation-only tuning), card_beauty (the model card's checkpoint),
# ablation_beauty / ablation_ml100k (issue 14's table). Text logs read Beauty.txt / ml-100k.inter without the
# `datasets` library, so nothing needs installing on a machine with torch, triton and transformers.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
if [[ -n "${OUT:-}" ]]; then
  # a device call brings back at most 8 files: everything the stages write is also packed into one archive, made
  # outside $OUT and then moved in (not when writing into the repository's own results)
  OUT=${OUT%/}
  trap 'tar czf /tmp/gpu_runs_files.tgz -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv /tmp/gpu_runs_files.tgz "$OUT/all_files.tgz"' EXIT
fi
OUT=${OUT:-benchmarks/results}
DATA_DIR=${DATA_DIR:-../shared/data}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
stage() { [[ " ${STAGES:-check profile attention train} " == *" $1 "* ]]; }
if stage check; then
  timeout 200 python3 scripts/check_triton_attention.py --kind varlen --output "$OUT/triton_varlen.json" 2>&1 | tee "$OUT/check.log" | tail -12
fi
# gpu_tests: the tests that need a CUDA GPU and compiled kernels (the captured training step against the
# uncaptured one)
if stage gpu_tests; then
  TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q -p no:logging -p no:cacheprovider \
    tests/test_cuda_graph_step.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
# check_model: whole models, blossom_triton against blossom_torch (the compressor and gated-sum paths around the kernels)
if stage check_model; then
  timeout 200 python3 scripts/check_triton_attention.py --kind model --output "$OUT/triton_model.json" 2>&1 \
    | tee "$OUT/check_model.log" | tail -6
fi
# check_tf32: the same sweep with float32 at torch's "high" precision (train.py --tf32: three TF32 passes)
if stage check_tf32; then
  timeout 200 python3 scripts/check_triton_attention.py --kind varlen --float32_matmul_precision high \
    --output "$OUT/triton_varlen_tf32.json" 2>&1 | tee "$OUT/check_tf32.log" | tail -12
fi
# tune: per-kernel CUDA time of launch settings still to choose (TUNE_LENGTHS, TUNE_VARIANTS: tune_kernels.py's
# variants; by default the gathered kernels' chunks and a longer compressed dk/dv segment against the chosen ones);
# TUNING keeps its defaults until measured
if stage tune; then
  timeout ${TUNE_KERNELS_LIMIT:-200} python3 benchmarks/tune_kernels.py --lengths ${TUNE_LENGTHS:-1024 4096 16384} \
    --variants ${TUNE_VARIANTS:-base dqchunk8k chunk4k seg4096} 2>&1 | tee "$OUT/tune_kernels.txt" \
    | grep -v Warn
fi
# profile: PROFILE_IMPLEMENTATIONS (blossom_triton, eager and compiled; sdpa eager, for its kernels side by side)
if stage profile; then
  for impl in ${PROFILE_IMPLEMENTATIONS:-blossom_triton}; do
    [[ $impl == blossom_triton ]] && compiled=--compiled || compiled=
    timeout ${PROFILE_LIMIT:-150} python3 benchmarks/profile_attention.py --implementation $impl \
      --lengths ${PROFILE_LENGTHS:-200 4096} $compiled --rows 25 2>&1 | grep -v Warn \
      | tee "$OUT/attention_profile_$impl.txt"
  done
fi
# attention: LENGTHS (module table) and MODEL_LENGTHS (whole model) default to the issue's lengths; empty skips one
if stage attention; then
  timeout ${ATTENTION_LIMIT:-300} python3 scripts/benchmark_attention.py --skip-reference \
    --lengths ${LENGTHS-200 1024 4096 16384} --model-lengths ${MODEL_LENGTHS-200 4096} --output-dir "$OUT" 2>&1 \
    | tee "$OUT/attention.log" | tail -20
fi
if stage train; then
  timeout ${TRAIN_LIMIT:-420} python3 scripts/benchmark_training.py --data_dir "$DATA_DIR" --max_seconds ${MAX_SECONDS:-10} \
    --output "$OUT/training_benchmark" 2>&1 | tee "$OUT/train.log" | tail -40
fi
# train_modes: eager against --torch_compile (graphs: --torch_compile_mode reduce-overhead, forward and backward replayed
# from CUDA graphs; step_graph: --cuda_graph_step, the whole step replayed from one) on packed rows at max length 200
# and 16,384 (MODE_DATASETS), with the busiest
# kernels of three profiled steps per row (what bounds each step); TRAIN_MODES picks the modes of one call
if stage train_modes; then
  for mode in ${TRAIN_MODES:-eager compiled graphs step_graph}; do
    case $mode in
      eager) flags="--torch_compile false" ;;
      compiled) flags="--torch_compile --torch_compile_mode default --cuda_graph_step false" ;;
      graphs) flags="--torch_compile --torch_compile_mode reduce-overhead --cuda_graph_step false" ;;
      step_graph) flags="--torch_compile --cuda_graph_step" ;;
    esac
    timeout ${MODE_LIMIT:-250} python3 scripts/benchmark_training.py --data_dir "$DATA_DIR" \
      --datasets ${MODE_DATASETS:-beauty200 ml100k200 longtail16k} \
      --layouts packed --max_seconds 4 --max_steps 40 --profile_steps 3 --no_plot $flags --output "$OUT/training_$mode" \
      > "$OUT/training_$mode.log" 2>&1; tail -14 "$OUT/training_$mode.log"
  done
fi
# quality_beauty, quality_ml100k: packed vs padded, 3 seeds, one dataset per stage, one training process at a time:
# 12 at once on one H100 ran at ~4,000 items/s each against 30,000-190,000 alone (time-sliced GPU, starved CPU).
# --time_limit_s stops the queue (a stopped run checkpoints); the same stage in a later call on the same warm machine
# continues it (--resume: finished runs are read, interrupted ones resume, the rest start). QUALITY_PARALLEL=3 shares the
# GPU between three processes (more results per call; the seconds-to-best column then counts shared time).
for dataset in beauty ml100k; do
  if stage quality_$dataset; then
    timeout $((${QUALITY_LIMIT:-530} + 40)) python3 scripts/benchmark_quality.py --data_dir "$DATA_DIR" \
      --runs ${QUALITY_RUNS:-$dataset-blossom $dataset-dense} --layouts ${LAYOUTS:-packed padded} --seeds 0 1 2 \
      --blossom_backend blossom_triton --max_parallel ${QUALITY_PARALLEL:-1} --time_limit_s ${QUALITY_LIMIT:-530} --resume \
      --output_root /tmp/quality --results "$OUT/quality_$dataset.json" > "$OUT/quality_$dataset.log" 2>&1
    grep -v '^\$' "$OUT/quality_$dataset.log" | tail -30
  fi
done
# tune_ml100k, tune_beauty: issue 14's validation-only tuning (packed, 3 seeds; the same number of variants for BlossomRec
# and dense). Runs skip the test split (--do_predict false); evaluate.py ranks the chosen variant's afterwards. Continues
# across calls on a warm machine like the quality stages. TUNE_MODELS picks the models of one call.
tune() {  # tune DATASET MODEL NAME=FLAGS...
  local dataset=$1 model=$2
  shift 2
  timeout $((${TUNE_LIMIT:-260} + 90)) python3 scripts/benchmark_quality.py --data_dir "$DATA_DIR" \
    --runs $dataset-$model --seeds 0 1 2 --blossom_backend blossom_triton --max_parallel ${TUNE_PARALLEL:-1} \
    --time_limit_s ${TUNE_LIMIT:-260} --resume --variants "$@" --output_root /tmp/tune \
    --results "$OUT/tune_${dataset}_$model.json" > "$OUT/tune_${dataset}_$model.log" 2>&1
  grep -A4 "chosen on validation" "$OUT/tune_${dataset}_$model.log"
}
if stage tune_ml100k; then
  shared=(base= drop3="--hidden_dropout_prob 0.3" warmup="--lr_scheduler_type cosine --warmup_steps 100"
          long="--max_seq_length 737")
  tune ml100k blossom "${shared[@]}" pubgate="--gate_init published"
  tune ml100k dense "${shared[@]}" lr5="--learning_rate 5e-4"
fi
if stage tune_beauty; then
  shared=(base= lr2e3="--learning_rate 2e-3" bs128="--per_device_train_batch_size 128" wd="--weight_decay 0.1"
          layers3="--num_hidden_layers 3")
  for model in ${TUNE_MODELS:-blossom dense}; do
    if [[ $model == blossom ]]; then
      tune beauty blossom "${shared[@]}" pubgate="--gate_init published" nogate="--gate_type fixed"
    else
      tune beauty dense "${shared[@]}" warmup="--lr_scheduler_type cosine --warmup_steps 100" \
        heads2="--num_attention_heads 2 --num_key_value_heads 2"
    fi
  done
fi
# card_beauty: the Beauty model card's checkpoint, trained as the README's recipe says (CARD_FLAGS: the chosen
# variant's train.py flags), seed 0, test split ranked; packed into $OUT/card_beauty.tgz without its checkpoints
if stage card_beauty; then
  timeout 300 python3 scripts/benchmark_quality.py --data_dir "$DATA_DIR" --runs beauty-blossom --seeds 0 \
    --blossom_backend blossom_triton --extra "${CARD_FLAGS:-}" --tag=-card --output_root /tmp/card \
    --results "$OUT/card_beauty.json" > "$OUT/card_beauty.log" 2>&1
  tail -3 "$OUT/card_beauty.log"
  tar czf "$OUT/card_beauty.tgz" -C /tmp/card --exclude checkpoints beauty-blossom-card-seed0
fi
# ablation_beauty, ablation_ml100k: issue 14's table, one dataset per stage, one process at a time
for dataset in beauty ml100k; do
  if stage ablation_$dataset; then
    timeout 570 python3 scripts/benchmark_quality.py --data_dir "$DATA_DIR" --table ablation \
      --runs $dataset-blossom $dataset-ltis $dataset-stis $dataset-nogate $dataset-nocomp $dataset-dense \
      --seeds 0 1 2 --max_parallel 1 --time_limit_s 530 --resume --output_root /tmp/ablation \
      --results "$OUT/ablation_$dataset.json" > "$OUT/ablation_$dataset.log" 2>&1
    grep -v '^\$' "$OUT/ablation_$dataset.log" | tail -30
  fi
done
