#!/usr/bin/env bash
# Serve the embedded MLflow store (the SQLite DB the jobs write under the state dir) on 127.0.0.1.
#
#   infra/mlflow_server.sh                 # http://127.0.0.1:5000
#   PORT=5001 STATE_DIR=/data/gems infra/mlflow_server.sh
#
# Jobs can then log through the server: MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (see README).
# For browsing only, `mlflow ui --backend-store-uri sqlite:///<abs state>/mlflow.db` is enough.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${STATE_DIR:-.state}"
STATE_DIR="$(cd "${STATE_DIR:-.state}" && pwd)"  # absolute: the jobs' embedded store lives here
PORT="${PORT:-5000}"
exec .venv/bin/mlflow server \
  --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" \
  --artifacts-destination "$STATE_DIR/mlartifacts" \
  --host 127.0.0.1 --port "$PORT"
