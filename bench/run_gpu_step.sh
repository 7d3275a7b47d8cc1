#!/usr/bin/env bash
# GSPO step benchmark on one GPU (colocated learner + vLLM with sleep mode), the issue's workload: 64 prompts x G=8
# x 1,024 tokens, 2 mini-batch updates per step. The variants run side by side on one warm start (the first step of
# each is a warm-up). About 6-8 minutes per shape on an H100 (start-up ~2 min, ~30 s a step, the profiled update).
# Writes $OUT_DIR/step_cuda_<shape>.json after each variant. Run from anywhere; each line may also be run on its own.
#   SHAPES="qwen3-0.6b qwen3-1.7b" VARIANTS=baseline,new,fused STEP_ARGS="--engine-process inline" OUT_DIR=...
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
read -r -a EXTRA <<< "${STEP_ARGS:-}"
WORK=(--prompts 64 --group-size 8 --response-tokens 1024 --steps 2 --start overlap --variants "${VARIANTS:-baseline,new,fused}")
rc=0
for shape in ${SHAPES:-qwen3-0.6b qwen3-1.7b}; do
  # SIGINT on timeout: the bench shuts its actors down (vLLM and the learner free the GPU for the next line)
  timeout -s INT -k 30 "${STEP_TIMEOUT_S:-720}" "$PY" bench/bench_step.py --shape "$shape" "${WORK[@]}" "${EXTRA[@]}" \
      --out "${OUT_DIR:-bench/results}/step_cuda_$shape.json" || rc=$?
done
exit $rc
