#!/usr/bin/env bash
# Submit a recipe to a Ray cluster as a job:
#
#   cluster/submit.sh RECIPE [key=value ...]
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/submit.sh recipes/tiny_cascade.yaml seed=1 stages.3.gspo.num_steps=40
#
# It runs, from the repository root:
#   ray job submit --address ${RAY_ADDRESS:-http://127.0.0.1:8265} --runtime-env cluster/runtime_env.yaml \
#       --working-dir . [SUBMIT_ARGS] -- cascade-rl run RECIPE [key=value ...]
#
# Environment:
#   RAY_ADDRESS     the cluster's dashboard / job API (default http://127.0.0.1:8265: a local head, or a remote
#                   one reached through `ray dashboard cluster/aws_gpu.yaml` / `kubectl port-forward`)
#   SUBMIT_ARGS     extra `ray job submit` options, e.g. "--no-wait --submission-id tiny-1"
#   RAY_AUTH_MODE   `token` for a cluster with token auth; the token is read from RAY_AUTH_TOKEN,
#                   RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (never pass it on the command line). Set to
#                   `token` here when unset and one of those exists: Ray 2.60's `ray start --head` turns token
#                   auth on by itself once ~/.ray/auth_token exists (any local ray.init() writes it), and
#                   sending the token to a cluster without auth is harmless.
#   DRY_RUN=1       print the command instead of running it
#
# The recipe must be inside the repository: it travels to the cluster with --working-dir.
set -euo pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; }
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  usage
  exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RECIPE=$1
shift
if [ ! -f "$RECIPE" ]; then
  echo "error: recipe not found: $RECIPE" >&2
  exit 2
fi
# The recipe's path relative to the repository root (the job's working directory on the cluster).
ABS="$(cd "$(dirname "$RECIPE")" && pwd)/$(basename "$RECIPE")"
case "$ABS" in
  "$ROOT"/*) REL=${ABS#"$ROOT"/} ;;
  *)
    echo "error: $RECIPE is outside the repository $ROOT; only the repository is uploaded (--working-dir)," >&2
    echo "       so copy the recipe under recipes/ first" >&2
    exit 2
    ;;
esac

if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] ||
                                    [ -f "$HOME/.ray/auth_token" ]; }; then
  export RAY_AUTH_MODE=token
fi

RAY_BIN=${RAY_BIN:-ray}
if ! command -v "$RAY_BIN" >/dev/null 2>&1 && [ -x "$ROOT/.venv/bin/ray" ]; then
  RAY_BIN="$ROOT/.venv/bin/ray"
fi

# shellcheck disable=SC2206  # SUBMIT_ARGS is split on purpose (several options)
CMD=("$RAY_BIN" job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}"
     --runtime-env cluster/runtime_env.yaml --working-dir . ${SUBMIT_ARGS:-}
     -- cascade-rl run "$REL" "$@")

cd "$ROOT"
if [ "${DRY_RUN:-0}" = "1" ]; then
  [ -n "${RAY_AUTH_MODE:-}" ] && printf 'RAY_AUTH_MODE=%q ' "$RAY_AUTH_MODE"
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
