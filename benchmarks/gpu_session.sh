#!/usr/bin/env bash
# One device call: (1) the SDXL step-time rows after the layer's launch-count work, (2) a method grid on world
# subjects with `lora2 bench`, then `lora2 report`. Everything lands in $OUT (perf JSON, bench.tgz, logs).
#
# usage (device): OUT=... bash benchmarks/gpu_session.sh PERF_BUDGET_S BENCH_LIMIT_S [SUBJECT ...]
# PERF_BUDGET_S=0 skips the step-time rows.
set -uo pipefail
PERF_BUDGET=${1:-120}
BENCH_LIMIT=${2:-300}
export PYTHONUNBUFFERED=1 LORA2_CACHE=/tmp/lora2cache HF_HUB_OFFLINE=1
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
SUBJECTS=("${@:3}")
[ ${#SUBJECTS[@]} -gt 0 ] || SUBJECTS=(olive_star teal_ring target_circle badge_cross flower_hexagon kaleidoscope_ring)
mkdir -p "$OUT/perf"
[ "$PERF_BUDGET" -gt 0 ] && python3 benchmarks/sdxl_train_step.py --out-dir "$OUT/perf" --backbones sdxl --batches 1 \
  --only floor,peft,lora2 --warmup 2 --steps 10 --budget-s "$PERF_BUDGET" >"$OUT/perf.log" 2>&1
rm -f "$OUT/perf/"*profile* 2>/dev/null
python3 -m lora2.cli bench --subjects "${SUBJECTS[@]}" \
  --methods fixed-8 fixed-64 fixed-512 lora2 lora2-sum lora2-noreg svd-512-to-lora2 --seeds 0 \
  --out /tmp/bench --steps 300 --train-arg learning_rate=1e-3 --train-arg sample_steps=1 --eval-arg num_images=2 \
  --jobs-per-gpu 10 --time-limit "$BENCH_LIMIT" >"$OUT/bench.log" 2>&1
python3 -m lora2.cli report /tmp/bench >>"$OUT/bench.log" 2>&1
tar czf "$OUT/bench.tgz" -C /tmp --exclude='*.safetensors' --exclude='events.out.*' --exclude='class_images' bench
ls -la "$OUT"
tail -5 "$OUT/perf.log"; tail -20 "$OUT/bench.log"
