#!/usr/bin/env bash
# GSPO step benchmark on one GPU (colocated learner + vLLM with sleep mode): the baseline, new and fused paths side
# by side on one warm start, Qwen3-0.6B and Qwen3-1.7B random-weight shapes, 64 prompts x G=8 x 1,024 tokens (the
# issue's workload). The first step of each variant is a warm-up. About 8 minutes per shape on an H100 (start-up
# ~2.5 min, ~35 s a step, the profiled update ~75 s). Writes bench/results/step_cuda_<shape>.json after each
# variant. Run from anywhere; each line may also be run on its own.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
WORK=(--prompts 64 --group-size 8 --response-tokens 1024 --steps 2 --start overlap)
# SIGINT on timeout: the bench shuts its actors down (vLLM and the learner free the GPU for the next line)
rc=0
timeout -s INT -k 30 600 "$PY" bench/bench_step.py --shape qwen3-0.6b "${WORK[@]}" \
    --out bench/results/step_cuda_qwen3-0.6b.json || rc=$?
timeout -s INT -k 30 720 "$PY" bench/bench_step.py --shape qwen3-1.7b "${WORK[@]}" \
    --out bench/results/step_cuda_qwen3-1.7b.json || rc=$?
exit $rc
