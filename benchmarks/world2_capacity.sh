#!/usr/bin/env bash
# Where might capacity bind on the second world? CPU diagnostics beside the gate (docs/WORLD.md, "Where capacity might
# bind"), on world2's models brought back from the device (WORLD2=/tmp/world2: base/, clip/, dino/) and its subjects
# (SUBJECTS=/tmp/world2_gate/subjects, as benchmarks/world2_gate.py writes them). One job per call, one core each:
#   steps SUBJECT RANK LR STEPS   one subject, fixed rank, longer than the gate's 300 steps, then lora2 eval as the
#                                 gate's cells (num_images 2, the 25 prompts)
#   multi RANK LR STEPS           one adapter on all 10 subjects at once, each with its own identifier in its
#                                 captions (metadata.jsonl: "a <identifier> <class>"), then lora2 eval per subject
#                                 with that identifier; the identifiers are in $DIAG/multi/identifiers.json
# Each result line (the eval summary means) is appended to $DIAG/results.txt; run folders and logs under $DIAG.
#
# usage: DIAG=/tmp/diag bash benchmarks/world2_capacity.sh steps mosaic_star 4 3e-3 1200
#        DIAG=/tmp/diag bash benchmarks/world2_capacity.sh multi 64 3e-4 3000
set -uo pipefail
world=${WORLD2:-/tmp/world2}
subjects=${SUBJECTS:-/tmp/world2_gate/subjects}
diag=${DIAG:-/tmp/world2_capacity}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$diag"
evaluators=(--dino-model "$world/dino" --clip-model "$world/clip" --num-images 2)

summary() { # label eval.json -> one line of results.txt
  python3 -c "import json, sys; e = json.load(open(sys.argv[2]))['summary']
print(sys.argv[1], {k: round(v['mean'], 4) for k, v in e.items()})" "$1" "$2" >>"$diag/results.txt"
}

multi_folder() { # all subjects' images in one folder, captions naming each subject's own identifier
  python3 - "$subjects" "$diag/multi" <<'PY'
import json, shutil, sys
from pathlib import Path
from lora2.data.dreambooth import load_subjects
subjects, dst = load_subjects(sys.argv[1]), Path(sys.argv[2])
(dst / "images").mkdir(parents=True, exist_ok=True)
identifiers = dict(zip(subjects, ["sks", "zwx", "qrv", "jkp", "vbn", "xtl", "wmf", "dgh", "pzk", "ykb"]))
lines = []
for name, identifier in identifiers.items():
    for image in subjects[name].image_paths:
        shutil.copy(image, dst / "images" / f"{name}_{image.name}")
        caption = subjects[name].instance_prompt(identifier)
        lines.append(json.dumps({"file_name": f"{name}_{image.name}", "text": caption}))
(dst / "images" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
(dst / "identifiers.json").write_text(json.dumps(identifiers, indent=1) + "\n")
PY
}

case ${1:-} in
  steps)
    subject=$2 rank=$3 lr=$4 steps=$5
    run=$diag/$subject-r$rank-lr$lr-n$steps
    lora2 train --instance-data-dir "$subjects/$subject" --output-dir "$run" --seed 0 --base "$world/base" \
      --max-train-steps "$steps" --rank-mode fixed --init-rank "$rank" --max-rank 512 --learning-rate "$lr" \
      --sample-steps 1 --checkpointing-steps 100000 >"$run.train.log" 2>&1 || exit 1
    lora2 eval --run "$run" "${evaluators[@]}" >"$run.eval.log" 2>&1 || exit 1
    summary "$subject r$rank lr$lr n$steps" "$run/eval.json"
    ;;
  multi)
    rank=$2 lr=$3 steps=$4
    run=$diag/multi-r$rank-lr$lr-n$steps
    [ -f "$diag/multi/identifiers.json" ] || multi_folder || exit 1
    # every caption holds the word "a", so the trainer keeps each caption as it is (lora2.train.captions)
    lora2 train --instance-data-dir "$diag/multi/images" --instance-prompt "a sks object" --identifier a \
      --output-dir "$run" --seed 0 --base "$world/base" --max-train-steps "$steps" --rank-mode fixed \
      --init-rank "$rank" --max-rank 512 --learning-rate "$lr" --sample-steps 1 --checkpointing-steps 100000 \
      >"$run.train.log" 2>&1 || exit 1
    pairs=$(python3 -c "import json, sys; [print(*p) for p in json.load(open(sys.argv[1])).items()]" \
      "$diag/multi/identifiers.json")
    while read -r subject identifier; do
      lora2 eval --base "$world/base" --lora "$run/pytorch_lora_weights.safetensors" --subject "$subjects/$subject" \
        --identifier "$identifier" --resolution 128 --output "$run/eval_$subject.json" "${evaluators[@]}" \
        >"$run.eval_$subject.log" 2>&1 </dev/null || exit 1
      summary "multi r$rank lr$lr n$steps $subject" "$run/eval_$subject.json"
    done <<<"$pairs"
    ;;
  *)
    echo "usage: $0 steps SUBJECT RANK LR STEPS | multi RANK LR STEPS" >&2
    exit 2
    ;;
esac
