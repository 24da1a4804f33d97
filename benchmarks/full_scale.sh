#!/usr/bin/env bash
# One device call of benchmarks/full_scale.py (issue 16), run from the repository root with `.whl` (the diffusers
# wheel) and `.gpu` (made by `python benchmarks/full_scale.py prepare --dest .gpu`) carried. Installs the wheels into
# /tmp/site and builds the random-weight pipelines into /tmp/fs once per machine, then runs each argument as one
# full_scale.py command (`run --rows …` or `vs-script …`) in order, under one time budget shared by all (a row or
# run that would end past it is recorded as "not_run"). Results of earlier calls on the same warm machine (or a
# carried .gpu/full_scale.json) are merged into. Into $OUT: full_scale.json, logs.tgz (every row's log and probe
# records), full_scale.log (one line per row), build.log; the Markdown table is printed last.
#
# usage (device, repository root):
#   BUDGET=540 bash benchmarks/full_scale.sh "vs-script --repeats 2 --steps 25 --configs fixed64 adaptive" \
#     "run --rows sdxl-generate sdxl-eval"
# BUDGET: seconds for the whole command (default 540, for a 600 s call); BACKBONES: the pipelines to build;
# FS, WORK, STATE, BUILD_FLAGS, PYTHON: pipelines, run folders, results kept between calls, build flags, the
# interpreter (CPU smoke test:
# FS=/tmp/fs_tiny BUILD_FLAGS="--tiny --device cpu --dtype fp32" and phases with --device cpu).
set -uo pipefail
start=$(date +%s)
out=${OUT:?OUT must name the output folder}
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then # once per machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py=${PYTHON:-python3}
set -f # from here on, row globs such as sdxl-* go to full_scale.py, not to the shell
fs=${FS:-/tmp/fs}
state=${STATE:-/tmp/fs_state}
# shellcheck disable=SC2086  # BACKBONES and BUILD_FLAGS are lists
"$py" benchmarks/full_scale.py build --configs .gpu/configs --out "$fs" --backbones ${BACKBONES:-sdxl koala-700m sd15} \
  ${BUILD_FLAGS:---device cuda --dtype fp16} --skip-existing >>"$out/build.log" 2>&1 || {
  tail -20 "$out/build.log"
  exit 1
}
grep -h 'parameters;' "$out/build.log"
mkdir -p "$state"
if [ -f "$state/full_scale.json" ]; then
  cp "$state/full_scale.json" "$out/full_scale.json"
elif [ -f .gpu/full_scale.json ]; then
  cp .gpu/full_scale.json "$out/full_scale.json"
fi
for phase in "$@"; do
  left=$((${BUDGET:-540} - $(date +%s) + start))
  # a phase is a command line: eval keeps its quoted words (--extra-args '--flag value') together
  eval "\"$py\" benchmarks/full_scale.py $phase --pipelines '$fs' --data .gpu --work '${WORK:-/tmp/fs_work}' \
    --out '$out/full_scale.json' --budget-s $left" 2>&1 | tee -a "$out/full_scale.log"
  [ -f "$out/full_scale.json" ] && cp "$out/full_scale.json" "$state/full_scale.json"
done
"$py" benchmarks/full_scale.py table "$out/full_scale.json"
