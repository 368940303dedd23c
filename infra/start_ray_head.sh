#!/usr/bin/env bash
# Start a Ray head for `ray job submit`: loopback only (127.0.0.1) by default, free ports, token auth.
#
#   infra/start_ray_head.sh            # prints the exports to use, writes .state/ray_head.env
#   source .state/ray_head.env && ray job submit --working-dir . -- \
#       python pipelines/full.py --set state_dir=$PWD/.state
#   ray stop                           # stops every Ray instance of this user on this machine
#
# Env: NUM_CPUS (default: all), RAY_TEMP_DIR (default: Ray's), STATE_DIR (default: ./.state),
#      RAY_HEAD_IP (default 127.0.0.1): the one address every port of the head listens on. Set it to
#      this machine's address on a cluster network, on purpose, to let worker nodes join
#      (`ray start --address=$RAY_HEAD_IP:<GCS port>`). Then GCS and raylet listen on every
#      interface (Ray binds them to one address only when it is loopback): firewall the ports to
#      the cluster network (infra/README.md). 0.0.0.0 and :: are refused.
# Why loopback needs care: given --node-ip-address=127.0.0.1, `ray start` swaps in the machine's
# routable address, and then GCS, raylet and agents listen on every interface. Ray keeps 127.0.0.1
# only where it treats the machine as single-node (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 on the
# `ray start` command, which makes its node-address lookup answer loopback); a worker node cannot
# join such a head.
# Token auth is always on (RAY_AUTH_MODE=token): `ray start` writes ~/.ray/auth_token if no token
# exists (or uses RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); clients need the same token and
# RAY_AUTH_MODE=token (the env file sets it). The head runs with this checkout's .venv first on
# PATH, so a job's `python` is the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV_BIN="$ROOT/.venv/bin"
[ -x "$VENV_BIN/ray" ] || { echo "no $VENV_BIN/ray: run 'make setup' first" >&2; exit 1; }
STATE_DIR="${STATE_DIR:-$ROOT/.state}"
HEAD_IP="${RAY_HEAD_IP:-127.0.0.1}"
case "$HEAD_IP" in
  0.0.0.0|::|"*"|"")
    echo "RAY_HEAD_IP=$HEAD_IP would listen on every interface; give this machine's address on the" \
         "cluster network (e.g. 10.0.0.5), or leave it unset for 127.0.0.1" >&2
    exit 2 ;;
  localhost|127.0.0.1) HEAD_IP=127.0.0.1; LOOPBACK=(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) ;;
  *) LOOPBACK=() ;;
esac
mkdir -p "$STATE_DIR"

# Every port the head listens on, not just the GCS and dashboard: the defaults (e.g. the dashboard
# agent's 52365) collide with any other Ray instance on the machine.
read -r GCS_PORT DASH_PORT CLIENT_PORT NM_PORT OM_PORT RTE_PORT AGENT_GRPC AGENT_HTTP METRICS < <(
  "$VENV_BIN/python" - "$HEAD_IP" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(9)]
for s in socks:
    s.bind((sys.argv[1], 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
PY
)

ARGS=(--head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" --dashboard-host="$HEAD_IP"
      --dashboard-port="$DASH_PORT" --ray-client-server-port="$CLIENT_PORT"
      --node-manager-port="$NM_PORT" --object-manager-port="$OM_PORT" --runtime-env-agent-port="$RTE_PORT"
      --dashboard-agent-grpc-port="$AGENT_GRPC" --dashboard-agent-listen-port="$AGENT_HTTP"
      --metrics-export-port="$METRICS" --disable-usage-stats)
[ -n "${NUM_CPUS:-}" ] && ARGS+=(--num-cpus="$NUM_CPUS")
[ -n "${RAY_TEMP_DIR:-}" ] && ARGS+=(--temp-dir="$RAY_TEMP_DIR")

env "${LOOPBACK[@]}" RAY_AUTH_MODE=token PATH="$VENV_BIN:$PATH" "$VENV_BIN/ray" start "${ARGS[@]}"

# The job server needs the head's dashboard agent, which comes up a little after `ray start`.
RAY_AUTH_MODE=token "$VENV_BIN/python" - "http://$HEAD_IP:$DASH_PORT" <<'PY'
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

{
  echo "export RAY_ADDRESS=http://$HEAD_IP:$DASH_PORT"
  echo "export RAY_GCS_ADDRESS=$HEAD_IP:$GCS_PORT"
  echo "export RAY_AUTH_MODE=token"
  [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  # A driver outside a job (ray.init(address=...)) resolves 127.0.0.1 like the head only with this.
  [ "${#LOOPBACK[@]}" -gt 0 ] && echo "export ${LOOPBACK[0]}"
  true
} > "$STATE_DIR/ray_head.env"
echo "Ray head: GCS $HEAD_IP:$GCS_PORT, dashboard/jobs http://$HEAD_IP:$DASH_PORT (token auth)"
echo "Use it:   source $STATE_DIR/ray_head.env"
