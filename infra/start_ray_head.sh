#!/usr/bin/env bash
# Start a local Ray head bound to 127.0.0.1 on free ports, for `ray job submit`.
#
#   infra/start_ray_head.sh            # prints the exports to use, writes .state/ray_head.env
#   source .state/ray_head.env && RAY_AUTH_MODE=token ray job submit --working-dir . -- \
#       python pipelines/full.py --set state_dir=$PWD/.state
#   ray stop                           # stops Ray on this machine when you are done
#
# Env: NUM_CPUS (default: all), RAY_TEMP_DIR (default: Ray's), STATE_DIR (default: ./.state).
# The head runs with this checkout's .venv first on PATH, so a job's `python` is the venv's python.
# `ray start --head` enables token authentication and writes ~/.ray/auth_token; the submitting
# client needs RAY_AUTH_MODE=token (it then finds the token file).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV_BIN="$ROOT/.venv/bin"
[ -x "$VENV_BIN/ray" ] || { echo "no $VENV_BIN/ray: run 'make setup' first" >&2; exit 1; }
STATE_DIR="${STATE_DIR:-$ROOT/.state}"
mkdir -p "$STATE_DIR"

# Every port the head listens on, not just the GCS and dashboard: the defaults (e.g. the dashboard
# agent's 52365) collide with any other Ray instance on the machine.
read -r GCS_PORT DASH_PORT CLIENT_PORT NM_PORT OM_PORT RTE_PORT AGENT_GRPC AGENT_HTTP METRICS < <(
  "$VENV_BIN/python" - <<'PY'
import socket
socks = [socket.socket() for _ in range(9)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
PY
)

ARGS=(--head --node-ip-address=127.0.0.1 --port="$GCS_PORT" --dashboard-host=127.0.0.1
      --dashboard-port="$DASH_PORT" --ray-client-server-port="$CLIENT_PORT"
      --node-manager-port="$NM_PORT" --object-manager-port="$OM_PORT" --runtime-env-agent-port="$RTE_PORT"
      --dashboard-agent-grpc-port="$AGENT_GRPC" --dashboard-agent-listen-port="$AGENT_HTTP"
      --metrics-export-port="$METRICS" --disable-usage-stats)
[ -n "${NUM_CPUS:-}" ] && ARGS+=(--num-cpus="$NUM_CPUS")
[ -n "${RAY_TEMP_DIR:-}" ] && ARGS+=(--temp-dir="$RAY_TEMP_DIR")

PATH="$VENV_BIN:$PATH" "$VENV_BIN/ray" start "${ARGS[@]}"

# The job server needs the head's dashboard agent, which comes up a little after `ray start`.
RAY_AUTH_MODE=token "$VENV_BIN/python" - "http://127.0.0.1:$DASH_PORT" <<'PY'
import sys, time
from ray.job_submission import JobSubmissionClient
deadline = time.monotonic() + 120
while True:
    try:
        JobSubmissionClient(sys.argv[1]).list_jobs()
        break
    except Exception as err:  # not up yet
        if time.monotonic() > deadline:
            sys.exit(f"Ray job server at {sys.argv[1]} not ready after 120 s: {err}")
        time.sleep(1)
PY

cat > "$STATE_DIR/ray_head.env" <<ENV
export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT
export RAY_GCS_ADDRESS=127.0.0.1:$GCS_PORT
export RAY_AUTH_MODE=token
ENV
echo "Ray head: GCS 127.0.0.1:$GCS_PORT, dashboard/jobs http://127.0.0.1:$DASH_PORT"
echo "Use it:   source $STATE_DIR/ray_head.env"
