#!/usr/bin/env bash
# Pretrain the world's models on one GPU: the base SDXL pipeline (VAE, then UNet + text encoders) in one process
# and, beside it on the same GPU, the CLIP then the DINO evaluator in another. Each phase stops at its wall-clock
# budget (PretrainScale.*_seconds) and saves. Results: $OUT/{base,clip,dino}.tar, $OUT/samples.png, logs.
#
# usage: OUT=/tmp/out bash benchmarks/gpu_world_pretrain.sh [full|tiny] [cuda|cpu]
# Unpack: for m in base clip dino; do tar -xf $OUT/$m.tar -C src/lora2/world/assets; done
set -uo pipefail
SCALE=${1:-full}
DEVICE=${2:-cuda}
OUT=${OUT:-/tmp/world_pretrain_out}
WORK=${WORK:-/tmp/world_models}
export PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
mkdir -p "$OUT" "$WORK"
start=$(date +%s)
(nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true) >"$OUT/env.log" 2>&1
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
  >>"$OUT/env.log" 2>&1

python3 - "$WORK" "$SCALE" "$DEVICE" "$OUT" >"$OUT/base.log" 2>&1 <<'EOF' &
import logging, sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from diffusers import StableDiffusionXLPipeline
from lora2.world import generator
from lora2.world.pretrain import pretrain_base
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
work, scale, device, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
path = pretrain_base(work / "base", device=device, scale=scale)
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
Image.fromarray((np.concatenate(rows) * 255).round().astype(np.uint8)).save(out / "samples.png")
print(f"samples in {time.monotonic() - t0:.1f} s", flush=True)
EOF
base_pid=$!

python3 - "$WORK" "$SCALE" "$DEVICE" >"$OUT/evaluators.log" 2>&1 <<'EOF' &
import logging, sys
from pathlib import Path
from lora2.world.evaluators import train_clip, train_dino
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
work, scale, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
train_clip(work / "clip", device=device, scale=scale)
train_dino(work / "dino", device=device, scale=scale)
EOF
eval_pid=$!

wait $eval_pid
echo "evaluators exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
wait $base_pid
echo "base exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
for m in base clip dino; do
  [ -d "$WORK/$m" ] && tar -C "$WORK" -cf "$OUT/$m.tar" "$m"
done
ls -la "$OUT" | tee -a "$OUT/env.log"
tail -n 5 "$OUT/base.log" "$OUT/evaluators.log"
