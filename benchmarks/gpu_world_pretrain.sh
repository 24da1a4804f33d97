#!/usr/bin/env bash
# Pretrain the world's models on one GPU: the base SDXL pipeline (VAE, then UNet + text encoders) in one process
# and, beside it on the same GPU, the CLIP then the DINO evaluator in another (lora2.world.evaluators.train_evaluators;
# world2's DINO detail pairs are rendered by worker processes meanwhile). Each phase runs the steps its wall-clock
# budget (PretrainScale.*_seconds) allows at its measured rate, and saves. PARTS (default "base clip dino") picks the
# models to train; a grown scale (world2) starts from the first world's committed models (lora2.world.grow).
# INIT_FROM=<base pipeline folder> continues that base (UNet + text encoders, VAE kept) instead of starting anew;
# BASE_SECONDS overrides the UNet phase's budget (e.g. 480 when no VAE phase runs); BASE_BATCH and BASE_LR its
# batch size and peak learning rate.
# Every phase's step count and fingerprints go to $OUT/pretrain_record.json (lora2.world.replay); REPLAY=<such a
# record> replays that run step for step instead (the same weights on the same kind of GPU, or an error naming the
# phase at its first differing fingerprint) and SAMPLES=0 leaves out the sample grid.
# Results: $OUT/evaluators.tar (clip/, dino/), the base as 15 MB parts $OUT/base.tar.part-*,
# $OUT/pretrain_record.json and $OUT/logs.tgz (logs, records and samples.png, 4 held-out prompts x 4 seeds).
#
# usage: OUT=/tmp/out [PARTS="base clip"] bash benchmarks/gpu_world_pretrain.sh [full|tiny|world2|world2-tiny] [cuda|cpu]
# Unpack: cat $OUT/base.tar.part-* | tar -xf - -C DEST; tar -xf $OUT/evaluators.tar -C DEST
set -uo pipefail
SCALE=${1:-full}
DEVICE=${2:-cuda}
OUT=${OUT:-/tmp/world_pretrain_out}
WORK=${WORK:-/tmp/world_models}
PARTS=${PARTS:-base clip dino}
LOGS=$WORK/logs
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
mkdir -p "$OUT" "$WORK" "$LOGS"
start=$(date +%s)
(nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true) >"$LOGS/env.log" 2>&1
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
  >>"$LOGS/env.log" 2>&1

base_pid=
if [[ " $PARTS " == *" base "* ]]; then
  python3 - "$WORK" "$SCALE" "$DEVICE" "$LOGS" >"$LOGS/base.log" 2>&1 <<'PY' &
import logging, os, sys, time
from dataclasses import replace
from pathlib import Path
import numpy as np, torch
from PIL import Image
from diffusers import StableDiffusionXLPipeline
from lora2.world import generator
from lora2.world.pretrain import SCALES, pretrain_base
from lora2.world.replay import PretrainRecord
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
work, scale, device, logs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
env = {k: os.environ.get(k) or None for k in ("BASE_SECONDS", "BASE_BATCH", "BASE_LR", "INIT_FROM", "REPLAY")}
cfg = SCALES[scale] if env["BASE_LR"] is None else replace(SCALES[scale], base_lr=float(env["BASE_LR"]))
record = PretrainRecord(env["REPLAY"])
try:
    path = pretrain_base(
        work / "base", device=device, scale=cfg, init_from=env["INIT_FROM"], record=record,
        seconds=float(env["BASE_SECONDS"]) if env["BASE_SECONDS"] else None,
        batch_size=int(env["BASE_BATCH"]) if env["BASE_BATCH"] else None,
    )
finally:
    record.write(logs / "record_base.json")
if os.environ.get("SAMPLES") == "0":
    sys.exit(0)
# Sanity grid: 4 held-out (shape, colour) prompts x 4 seeds, as plain diffusers generates them.
t0 = time.monotonic()
pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.float32).to(device)
pipe.set_progress_bar_config(disable=True)
_, prompts, _ = generator.sample_batch(4, seed=123, size=8, held_out="only")
rows = []
for prompt in prompts:
    images = pipe([prompt] * 4, num_inference_steps=25, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator(device).manual_seed(0)).images
    rows.append(np.concatenate(list(images), axis=1))
    print("sample prompt:", prompt, flush=True)
Image.fromarray((np.concatenate(rows) * 255).round().astype(np.uint8)).save(logs / "samples.png")
print(f"samples in {time.monotonic() - t0:.1f} s", flush=True)
PY
  base_pid=$!
fi

python3 - "$WORK" "$SCALE" "$DEVICE" $PARTS >"$LOGS/evaluators.log" 2>&1 <<'PY' &
import logging, os, sys
from pathlib import Path
from lora2.world.evaluators import train_evaluators
from lora2.world.replay import PretrainRecord
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
work, scale, device, parts = Path(sys.argv[1]), sys.argv[2], sys.argv[3], tuple(sys.argv[4:])
record = PretrainRecord(os.environ.get("REPLAY") or None)
try:
    train_evaluators(work, scale, device, parts, record=record)
finally:
    record.write(work / "logs" / "record_evaluators.json")
PY
eval_pid=$!

wait $eval_pid
echo "evaluators exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOGS/env.log"
evaluators=()
for m in clip dino; do [[ " $PARTS " == *" $m "* && -d "$WORK/$m" ]] && evaluators+=("$m"); done
[ ${#evaluators[@]} -gt 0 ] && tar -C "$WORK" -cf "$OUT/evaluators.tar" "${evaluators[@]}"
if [ -n "$base_pid" ]; then
  wait $base_pid
  echo "base exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOGS/env.log"
  [ -d "$WORK/base" ] && tar -C "$WORK" -cf - base | split -b 15m - "$OUT/base.tar.part-"
fi
python3 - "$LOGS" "$OUT/pretrain_record.json" <<'PY'
import json, sys
from pathlib import Path
logs, out = Path(sys.argv[1]), Path(sys.argv[2])
records = [json.loads(p.read_text()) for p in sorted(logs.glob("record_*.json"))]
merged = {**records[0], "phases": {k: v for r in records for k, v in r["phases"].items()}} if records else {}
out.write_text(json.dumps(merged, indent=1) + "\n")
PY
ls -la "$OUT" | tee -a "$LOGS/env.log"
tar czf "$OUT/logs.tgz" -C "$WORK" logs
tail -n 3 "$LOGS"/*.log
