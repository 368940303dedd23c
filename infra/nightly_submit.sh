#!/usr/bin/env bash
# Submit tonight's GEMS-SR nightly retraining as a Ray job. This is what cron
# (infra/cron/nightly.cron) and the systemd timer (infra/systemd/gems-nightly.*) run.
#
#   infra/nightly_submit.sh [--retry] [-- extra arguments for pipelines/nightly.py]
#
# The submission id is nightly-<UTC date>: Ray refuses a second job with the same id, so a
# double trigger (cron and timer both installed, a manual run, a timer catching up after boot)
# only reports the night's existing job. After a failed night, --retry submits
# nightly-<date>-retry-<time>; the nightly job itself resumes where the failed one stopped.
#
# Environment (all optional):
#   GEMS_REPO            checkout uploaded as the job's working_dir (default: this script's repo)
#   GEMS_NIGHTLY_CONFIG  config name or path for pipelines/nightly.py (default: demo)
#   GEMS_NIGHT           the night's date label (default: today, UTC)
#   RAY_ADDRESS          job server of the Ray head (default: http://127.0.0.1:8265)
#   RAY_BIN              the ray CLI (default: $GEMS_REPO/.venv/bin/ray, else ray on PATH)
#   GEMS_PYTHON          python the entrypoint runs on the head node (default: python)
#   MLFLOW_TRACKING_URI  passed on to the job when set, with MLFLOW_TRACKING_USERNAME /
#                        MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN for a server with
#                        login (infra/mlflow_server.sh --auth); Ray shows a job's env_vars to
#                        holders of the head's token, a dry run prints the secrets as ***
#   GEMS_SUBMIT_DRY_RUN  1 = print the submit command and exit (used by the tests)
set -euo pipefail

REPO="${GEMS_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
CONFIG="${GEMS_NIGHTLY_CONFIG:-demo}"
NIGHT="${GEMS_NIGHT:-$(date -u +%F)}"
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
if [[ -z "${RAY_BIN:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY_BIN="$REPO/.venv/bin/ray"; else RAY_BIN="ray"; fi
fi
PYTHON="${GEMS_PYTHON:-python}"

RETRY=0
if [[ "${1:-}" == "--retry" ]]; then RETRY=1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi

SUBMISSION_ID="nightly-${NIGHT}"
if (( RETRY )); then SUBMISSION_ID="${SUBMISSION_ID}-retry-$(date -u +%H%M%S)"; fi

# `ray start --head` enables token authentication; the client finds ~/.ray/auth_token itself (or
# the file in RAY_AUTH_TOKEN_PATH, as infra/start_ray_head.sh's env file exports it).
if [[ -z "${RAY_AUTH_MODE:-}" && ( -f "${HOME:-/nonexistent}/.ray/auth_token" || -n "${RAY_AUTH_TOKEN_PATH:-}" ) ]]; then
  export RAY_AUTH_MODE=token
fi

# The uploaded working_dir has no .git: pass the code version and the tracking server (with its
# credentials, MLflow's own variables) along; JSON built by Python, so any password survives.
GEMS_GIT_SHA="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)"
export GEMS_NIGHT="$NIGHT" GEMS_GIT_SHA
PY_BIN="$REPO/.venv/bin/python"
[[ -x "$PY_BIN" ]] || PY_BIN=python3  # cron's PATH may hold no python3: the checkout's venv first
runtime_env() {  # $1 = 1: secrets as *** (what a dry run prints)
  "$PY_BIN" - "$1" <<'PY'
import json, os, sys
keys = ("GEMS_NIGHT", "GEMS_GIT_SHA", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
secret = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
env = {k: "***" if sys.argv[1] == "1" and k in secret else os.environ[k] for k in keys if os.environ.get(k)}
print(json.dumps({"env_vars": env}))
PY
}
RUNTIME_ENV="$(runtime_env "${GEMS_SUBMIT_DRY_RUN:-0}")"

SUBMIT=("$RAY_BIN" job submit --no-wait --address "$RAY_ADDRESS" --submission-id "$SUBMISSION_ID"
        --working-dir "$REPO" --runtime-env-json "$RUNTIME_ENV"
        -- "$PYTHON" pipelines/nightly.py --config "$CONFIG" "$@")

if [[ "${GEMS_SUBMIT_DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${SUBMIT[@]}"
  echo
  exit 0
fi

job_status() {  # prints the job's status (SUCCEEDED, FAILED, RUNNING, ...); nothing if there is no such job
  local out
  out="$("$RAY_BIN" job status --address "$RAY_ADDRESS" "$1" 2>&1)" || return 0
  case "$out" in
    *"Job '$1' succeeded"*) echo SUCCEEDED ;;
    *"Job '$1' failed"*) echo FAILED ;;
    *"Job '$1' was stopped"*) echo STOPPED ;;
    *"Status for job '$1': "*) sed -n "s/.*Status for job '[^']*': \([A-Z_]*\).*/\1/p" <<<"$out" | tail -n 1 ;;
    *) echo UNKNOWN ;;
  esac
}

existing="$(job_status "$SUBMISSION_ID")"
if [[ -n "$existing" ]]; then
  echo "nightly: ${SUBMISSION_ID} was already submitted (status ${existing}); nothing to do."
  if [[ "$existing" == "FAILED" || "$existing" == "STOPPED" ]]; then
    echo "nightly: rerun with '$0 --retry' to resume that night."
  fi
  exit 0
fi

echo "nightly: submitting ${SUBMISSION_ID} to ${RAY_ADDRESS} (config ${CONFIG})"
if ! "${SUBMIT[@]}"; then
  if [[ -n "$(job_status "$SUBMISSION_ID")" ]]; then
    echo "nightly: ${SUBMISSION_ID} was submitted by a concurrent trigger; nothing to do."
    exit 0
  fi
  echo "nightly: submission of ${SUBMISSION_ID} failed" >&2
  exit 1
fi

"$RAY_BIN" job logs --address "$RAY_ADDRESS" --follow "$SUBMISSION_ID" || true
final="$(job_status "$SUBMISSION_ID")"
echo "nightly: ${SUBMISSION_ID} finished with status ${final:-UNKNOWN}"
[[ "$final" == "SUCCEEDED" ]]
