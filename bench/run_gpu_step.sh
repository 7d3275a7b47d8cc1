#!/usr/bin/env bash
# GSPO step benchmark on one GPU (colocated learner + vLLM with sleep mode): baseline and new paths side by side on
# one warm start per shape, Qwen3-0.6B and Qwen3-1.7B random-weight shapes. About 4 minutes per shape on an H100
# (first step of each variant is a warm-up; 1.7B runs 2 steps per variant to stay within ~8 minutes in all).
# Writes bench/results/step_cuda_<shape>.json. Run from anywhere; each line may also be run on its own.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
# SIGINT on timeout: the bench shuts its actors down (vLLM and the learner free the GPU for the next line)
rc=0
# 0.6B: groups started in the old order (learners, then vLLM), so the start-up split shows each component alone
timeout -s INT -k 30 330 "$PY" bench/bench_step.py --shape qwen3-0.6b --start sequential \
    --out bench/results/step_cuda_qwen3-0.6b.json || rc=$?
# 1.7B: groups started concurrently (vLLM's engine once the learner holds its memory)
timeout -s INT -k 30 360 "$PY" bench/bench_step.py --shape qwen3-1.7b --start overlap --steps 2 \
    --out bench/results/step_cuda_qwen3-1.7b.json || rc=$?
exit $rc
