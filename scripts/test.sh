#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest (e.g. -m soak, -k gspo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CASCADE_RL_CACHE=${CASCADE_RL_CACHE:-$PWD/.cache/cascade_rl}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
# lint and types first: a reviewer's first look, and seconds instead of the suite's minutes
.venv/bin/ruff check .
.venv/bin/python -m mypy
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as failure" >&2
  exit 1
fi
exit "$rc"
