#!/usr/bin/env bash
# Multimodal on one GPU: the tiny VLM cascade (sft -> rollout -> mpo -> gspo) with vLLM rollouts, colocated with
# the learner, then the GPU multimodal tests (vLLM's prompt ids and behaviour log-probs equal the learner's).
# About 8 minutes on an H100. Logs go to $OUT (or /tmp) as vlm_run.log and vlm_tests.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
LOGS=${OUT:-/tmp}
rc=0
timeout -s INT -k 30 330 "$PY" -m cascade_rl run recipes/tiny_vlm.yaml rollout.backend=vllm \
    rollout.placement=colocated rollout.num_gpus_per_worker=0.5 learner.num_gpus_per_rank=0.5 \
    rollout.gpu_memory_utilization=0.3 rollout.sleep_when_idle=true ray.num_cpus=16 run_dir=/tmp/runs/tiny_vlm \
    > "$LOGS/vlm_run.log" 2>&1 || rc=$?
echo "tiny_vlm run rc=$rc"; tail -25 "$LOGS/vlm_run.log"
timeout -s INT -k 30 240 "$PY" -m pytest -q -m gpu -x tests/actors/test_gpu_multimodal.py -p no:cacheprovider \
    > "$LOGS/vlm_tests.log" 2>&1 || rc=$?
echo "gpu multimodal tests rc=$rc"; tail -15 "$LOGS/vlm_tests.log"
exit $rc
