#!/usr/bin/env bash
# Submit a recipe to a Ray cluster as a job:
#
#   cluster/submit.sh RECIPE [key=value ...]
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/submit.sh recipes/tiny_cascade.yaml seed=1 stages.3.gspo.num_steps=40
#
# It runs, from the repository root:
#   ray job submit --address ${RAY_ADDRESS:-http://127.0.0.1:8265} --runtime-env-json '<cluster/runtime_env.yaml
#       + py_modules + env_vars below>' --working-dir . [SUBMIT_ARGS] -- JOB_PYTHON -m cascade_rl run RECIPE [k=v ...]
#
# Environment:
#   RAY_ADDRESS     the cluster's dashboard / job API (default http://127.0.0.1:8265: a local head, or a remote
#                   one reached through `ray dashboard cluster/aws_gpu.yaml` / `kubectl port-forward`)
#   JOB_PYTHON      the interpreter that runs the job on the head node. Default: for a head on this machine
#                   (a loopback RAY_ADDRESS), the Python next to the `ray` used here (the venv's), so the job works
#                   whatever PATH the head was started with; for a remote cluster, `python` on the head's PATH
#                   (the image's). A job runs with the head's PATH, never this shell's.
#   PY_MODULES      space-separated local files or folders (a reward module outside the repository, e.g.
#                   "$HOME/my_rewards.py") shipped to every node with Ray's `py_modules` and importable by
#                   the driver and every worker: reward.terms.N.name=my_rewards:score
#   RAY_JOB_STOP_WAIT_TIME_S  seconds `ray job stop` waits after SIGTERM before SIGKILL (default here 120, Ray's
#                   own 3): the driver finishes its step and writes a checkpoint in that time
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
# The Python that `ray` runs with here: it reads the runtime env YAML, and runs a job on a head on this machine.
LOCAL_PY="$(dirname "$(command -v "$RAY_BIN")")/python"
[ -x "$LOCAL_PY" ] || LOCAL_PY=python3
ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
if [ -z "${JOB_PYTHON:-}" ]; then
  case "$ADDRESS" in
    *://127.0.0.1:* | *://localhost:* | 127.0.0.1:* | localhost:* | auto) JOB_PYTHON=$LOCAL_PY ;;
    *) JOB_PYTHON=python ;;
  esac
fi
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)  # the upload has no .git: the run tags this instead

RUNTIME_ENV=$(cd "$ROOT" && PY_MODULES="${PY_MODULES:-}" COMMIT="$COMMIT" \
  STOP_WAIT="${RAY_JOB_STOP_WAIT_TIME_S:-120}" "$LOCAL_PY" - <<'PY'
import json, os, sys, yaml
env = yaml.safe_load(open("cluster/runtime_env.yaml"))
env.setdefault("env_vars", {})["RAY_JOB_STOP_WAIT_TIME_S"] = os.environ["STOP_WAIT"]
if os.environ["COMMIT"]:
    env["env_vars"]["CASCADE_RL_GIT_COMMIT"] = os.environ["COMMIT"]
modules = [os.path.abspath(m) for m in os.environ["PY_MODULES"].split()]
for m in modules:
    if not os.path.exists(m):
        sys.exit(f"error: PY_MODULES names {m}, which does not exist")
if modules:
    env["py_modules"] = modules
print(json.dumps(env))
PY
)

# shellcheck disable=SC2206  # SUBMIT_ARGS is split on purpose (several options)
CMD=("$RAY_BIN" job submit --address "$ADDRESS"
     --runtime-env-json "$RUNTIME_ENV" --working-dir . ${SUBMIT_ARGS:-}
     -- "$JOB_PYTHON" -m cascade_rl run "$REL" "$@")

cd "$ROOT"
if [ "${DRY_RUN:-0}" = "1" ]; then
  [ -n "${RAY_AUTH_MODE:-}" ] && printf 'RAY_AUTH_MODE=%q ' "$RAY_AUTH_MODE"
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
