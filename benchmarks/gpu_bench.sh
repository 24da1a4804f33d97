#!/usr/bin/env bash
# One device call of the world grid (docs/RESULTS.md): `lora2 bench` with a time limit on a bench folder under /tmp
# (kept between chained calls while the machine stays warm; stopped jobs resume), then `lora2 report`. Into $OUT:
# bench.log, and bench.tgz: the report (report.md, cells.json with every cell's scores, ranks and size, the plots),
# cells.jsonl and each cell's status and logs; not the run folders (adapters, checkpoints: 6.7 GB for 294 cells).
#
# usage (device, repository root, diffusers wheels in .whl/):
#   OUT=... LIMIT=520 JOBS=12 SEEDS="0 1 2" SUBJECTS=all bash benchmarks/gpu_bench.sh METHOD [METHOD ...]
# (BENCH=/tmp/NAME and SUBJECTS="a b" run part of the grid in its own folder; `lora2 report` pools the folders)
set -uo pipefail
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then  # once per machine (concurrent calls share it)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 LORA2_CACHE=/tmp/lora2cache HF_HUB_OFFLINE=1
BENCH=${BENCH:-/tmp/bench}
# shellcheck disable=SC2086  # SUBJECTS and SEEDS are lists
python3 -m lora2.cli bench --subjects ${SUBJECTS:-all} --methods "$@" --seeds ${SEEDS:-0 1 2} --out "$BENCH" --steps 300 \
  --train-arg learning_rate=1e-3 --train-arg sample_steps=1 --train-arg checkpointing_steps=1000 \
  --eval-arg num_images=2 --jobs-per-gpu "${JOBS:-12}" --time-limit "${LIMIT:-520}" >>"$OUT/bench.log" 2>&1
python3 -m lora2.cli report "$BENCH" >>"$OUT/bench.log" 2>&1
tar czf "$OUT/bench.tgz" -C "$(dirname "$BENCH")" --exclude='run' "$(basename "$BENCH")"
grep -c '"event": "done"' "$BENCH/cells.jsonl"
tail -3 "$OUT/bench.log"
