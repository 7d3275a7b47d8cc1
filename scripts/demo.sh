#!/usr/bin/env bash
# Set up (if needed) and run the tiny cascade recipe (sft -> rollout -> mpo -> gspo) on this CPU.
# Extra arguments are recipe overrides, e.g. seed=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CASCADE_RL_CACHE=${CASCADE_RL_CACHE:-$PWD/.cache/cascade_rl}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/cascade-rl run recipes/tiny_cascade.yaml "$@"
