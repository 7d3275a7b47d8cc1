#!/usr/bin/env bash
# vLLM engine start and generate speed on one GPU for the start-up knobs, each a fresh process with a cold compile
# cache (its own VLLM_CACHE_ROOT): rollout.engine_process separate vs inline, rollout.compile true vs false.
# Qwen3-0.6B shape, 256 prompts x 512 tokens, the plain and worker paths. About 1.5 minutes per line on an H200.
# Writes $OUT_DIR/rollout_cuda_<engine_process>_<compile>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
rc=0
for cfg in ${CONFIGS:-separate:compile inline:compile inline:nocompile}; do
  proc=${cfg%%:*} comp=${cfg##*:}
  flags=(--engine-process "$proc")
  [ "$comp" = nocompile ] && flags+=(--no-compile)
  VLLM_CACHE_ROOT=$(mktemp -d) timeout -s INT -k 20 "${ROLLOUT_TIMEOUT_S:-200}" "$PY" bench/bench_rollout.py \
      --device cuda --paths plain,worker --rounds 1 "${flags[@]}" --note "engine_process=$proc $comp, cold cache" \
      --out "${OUT_DIR:-bench/results}/rollout_cuda_${proc}_${comp}.json" || rc=$?
done
exit $rc
