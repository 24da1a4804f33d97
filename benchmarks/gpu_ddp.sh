#!/usr/bin/env bash
# The trainer on 2 GPUs of one host (issue 4): (1) the user command, `torchrun -m lora2.cli train`, 2 processes with
# batch 1 each; (2) the same run on 1 GPU with batch 2 (same global batch and data order) for time and loss;
# (3) benchmarks/ddp_check.py: both processes end with the same ranks and bit-identical adapters.
# Results: $OUT/ddp.tgz (run logs, metrics, adapters, ddp_check.json, summary).
#
# usage (device, 2 GPUs): OUT=... bash benchmarks/gpu_ddp.sh [SUBJECT] [STEPS]
set -uo pipefail
SUBJECT=${1:-badge_cross}
STEPS=${2:-300}
export PYTHONUNBUFFERED=1 LORA2_CACHE=${LORA2_CACHE:-/tmp/lora2cache} HF_HUB_OFFLINE=1
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
WORK=/tmp/ddp
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
DATA=$(python3 -c "from lora2.world import subjects_dir; print(subjects_dir())")/$SUBJECT
COMMON=(--instance-data-dir "$DATA" --mixed-precision bf16 --max-train-steps "$STEPS" --learning-rate 1e-3
  --seed 0 --checkpointing-steps 100 --sample-steps 1)
t0=$(date +%s)
torchrun --standalone --nproc_per_node 2 -m lora2.cli train "${COMMON[@]}" --train-batch-size 1 \
  --output-dir "$WORK/two_gpus" >"$WORK/two_gpus.log" 2>&1
echo "two_gpus exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$WORK/summary.txt"
t0=$(date +%s)
CUDA_VISIBLE_DEVICES=${SINGLE_GPU:-1} python3 -m lora2.cli train "${COMMON[@]}" --train-batch-size 2 \
  --output-dir "$WORK/one_gpu" >"$WORK/one_gpu.log" 2>&1
echo "one_gpu exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$WORK/summary.txt"
t0=$(date +%s)
torchrun --standalone --nproc_per_node 2 benchmarks/ddp_check.py --instance-data-dir "$DATA" \
  --output-dir "$WORK/check" --result "$WORK/ddp_check.json" max_train_steps=100 train_batch_size=1 \
  mixed_precision=bf16 learning_rate=1e-3 nu_lr=0.05 rank_check_steps=10 sample_steps=1 \
  >"$WORK/check.log" 2>&1
echo "check exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$WORK/summary.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv >>"$WORK/summary.txt" 2>&1
tar czf "$OUT/ddp.tgz" -C /tmp --exclude='events.out.*' --exclude='checkpoint-*' ddp
