#!/usr/bin/env bash
# The second world (issue 19) on one GPU, in steps that each fit a 10-minute device call:
#   pretrain  the first world's models grown to world2 (lora2.world.grow) and trained on at 128 px: UNet + text
#             encoders, and beside them the CLIP and DINO evaluators (DINO with world2's detail siblings), with
#             benchmarks/gpu_world_pretrain.sh at scale world2; skipped when $WORLD2 already holds base/, clip/, dino/;
#   gate      the discrimination gate, benchmarks/world2_gate.py run (resumable: a call stopped by its time limit
#             leaves finished cells in $GATE, and the next call on the same warm machine continues);
#   compare   after the gate passed: benchmarks/world2_compare.py run in the gate's folder (resumable like the gate),
#             then its analysis once every cell is in (world2_compare.json, world2_pareto.png into $OUT);
#   all       pretrain and gate, under one budget (after pretraining, benchmarks/world2_checks.py dino prints its
#             mean over the detailed subjects).
# Everything lives under /tmp on the device (WORLD2=/tmp/world2, GATE=/tmp/world2_gate): chain the calls while the
# machine stays warm. What comes back in $OUT: base.tar.part-*, evaluators.tar, pretrain_record.json, logs.tgz
# (pretrain, as gpu_world_pretrain.sh writes them; REPLAY=benchmarks/results/world2_v2_pretrain.json SAMPLES=0
# replays the recorded pretraining instead, checked fingerprint by fingerprint), world2_gate.json and
# world2_gate_cells.json once the gate's first ranks are confirmed (gate step only), gate.log, gate.tgz (the bench
# folder, of the run folders only eval.json).
#
# usage (device, repository root, diffusers wheels in .whl/):
#   OUT=... LIMIT=540 JOBS=16 bash benchmarks/gpu_world2.sh all     # pretrain (~8 min), then the gate in what is left
#   OUT=... LIMIT=540 JOBS=16 bash benchmarks/gpu_world2.sh gate      # again until world2_gate.json comes back
#   OUT=... LIMIT=540 JOBS=16 bash benchmarks/gpu_world2.sh compare   # again until world2_compare.json comes back
#   GATE=/tmp/world2_gate_multi GATE_ARGS=--multi OUT=... LIMIT=540 JOBS=16 bash benchmarks/gpu_world2.sh gate
#                                       # the gate with one adapter for all subjects (world2_gate.py --multi)
#   GATE=/tmp/world2_gate_crowd GATE_ARGS=--crowd OUT=... LIMIT=540 JOBS=16 bash benchmarks/gpu_world2.sh gate
#                                       # one adapter for the thirty crowd subjects (world2_gate.py --crowd)
#   GATE=/tmp/world2_gate_families GATE_ARGS="--families --learning-rates 1e-3 3e-3 1e-2" OUT=... LIMIT=570 JOBS=16 \
#     bash benchmarks/gpu_world2.sh gate  # one adapter for the six families' thirty subjects (--families)
#   GATE=/tmp/world2_gate_lookalikes GATE_ARGS="--lookalikes --ranks 4 64 --learning-rates 1e-3 3e-3 1e-2" OUT=... \
#     LIMIT=560 JOBS=16 bash benchmarks/gpu_world2.sh gate  # five groups of six look-alikes (--lookalikes; --siblings)
# CPU smoke test of the same steps (tiny data, world2's architecture):
#   OUT=/tmp/o SCALE=world2-tiny DEVICE=cpu GATE_ARGS=--tiny JOBS=2 WORLD2=/tmp/w2 GATE=/tmp/g2 \
#     bash benchmarks/gpu_world2.sh all
set -uo pipefail
step=${1:-all}
start=$(date +%s)
out=${OUT:?OUT must name the output folder}
mkdir -p "$out"
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then # once per machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LORA2_CACHE=/tmp/lora2cache
world=${WORLD2:-/tmp/world2}
gate=${GATE:-/tmp/world2_gate}

# The bench folder without the cells' run folders (adapters, checkpoints, images stay on the device) but with each
# run's eval.json, which holds the cell's scores, ranks and size (lora2.eval.report.collect reads them).
archive() {
  (cd "$(dirname "$gate")" && { find "$(basename "$gate")/bench" -name run -prune -o -type f -print;
    find "$(basename "$gate")/bench" -path '*/run/eval.json'; } | tar czf "$1" -T -)
}

if [[ $step == pretrain || $step == all ]]; then
  if [ -f "$world/base/model_index.json" ] && [ -f "$world/clip/config.json" ] && [ -f "$world/dino/config.json" ]; then
    echo "pretrain: $world already holds base, clip and dino"
  else
    OUT="$out" WORK="$world" PARTS="base clip dino" bash benchmarks/gpu_world_pretrain.sh "${SCALE:-world2}" \
      "${DEVICE:-cuda}"
    echo "pretrain: $(($(date +%s) - start)) s"
  fi
  # Does the DINO evaluator see the subjects' detail? ("altered" below "same", "pose_matched" below 1)
  python3 benchmarks/world2_checks.py dino --dino "$world/dino" | tail -n 7
fi

if [[ $step == gate || $step == all ]]; then
  left=$((${LIMIT:-540} - $(date +%s) + start))
  # shellcheck disable=SC2086  # GATE_ARGS is a list of options
  python3 benchmarks/world2_gate.py run --world "$world" --out "$gate" --parallel "${JOBS:-16}" \
    --time-limit "$left" ${GATE_ARGS:-} >>"$out/gate.log" 2>&1
  echo "gate exit $? after $(($(date +%s) - start)) s"
  # after a pretraining the models fill 6 of the 8 files a call brings back: the gate files wait for the next call
  if [[ $step == gate ]]; then
    for f in world2_gate.json world2_gate_cells.json; do [ -f "$gate/$f" ] && cp "$gate/$f" "$out/"; done
  fi
  archive "$out/gate.tgz"
  grep -c '"event": "done"' "$gate/bench/cells.jsonl"
  tail -3 "$out/gate.log"
fi

if [[ $step == compare ]]; then
  left=$((${LIMIT:-540} - $(date +%s) + start))
  python3 benchmarks/world2_compare.py run --gate "$gate" --world "$world" --parallel "${JOBS:-16}" \
    --time-limit "$left" >>"$out/compare.log" 2>&1
  code=$?
  echo "compare exit $code after $(($(date +%s) - start)) s"
  if [ $code -eq 0 ]; then
    python3 benchmarks/world2_compare.py analyze --gate "$gate" --json "$out/world2_compare.json" \
      --plot "$out/world2_pareto.png" >>"$out/compare.log" 2>&1
  fi
  archive "$out/gate.tgz"
  tail -3 "$out/compare.log"
fi
