#!/usr/bin/env bash
# Serve the embedded MLflow store (the SQLite DB the jobs write under the state dir); with --auth,
# MLflow's basic-auth app, so a team can share it: every request needs a user and password.
#
#   infra/mlflow_server.sh                 # http://127.0.0.1:5000, no login: this machine only
#   PORT=5001 STATE_DIR=/data/gems infra/mlflow_server.sh
#   MLFLOW_AUTH_ADMIN_PASSWORD_FILE=/run/secrets/mlflow-admin HOST=10.0.0.5 infra/mlflow_server.sh --auth
#
# Env: STATE_DIR (default ./.state), HOST (default 127.0.0.1; another address needs --auth), PORT
#      (default 5000), WORKERS (default: MLflow's 4).
# --auth: users and permissions live in <state>/mlflow_auth.db. The first start creates the admin
#   user (MLFLOW_AUTH_ADMIN_USERNAME, default admin) with the password from
#   MLFLOW_AUTH_ADMIN_PASSWORD or from the file named by MLFLOW_AUTH_ADMIN_PASSWORD_FILE; there is
#   no default password, and the server does not start without one. Later starts ignore it (change
#   passwords and add users with mlflow.server.get_app_client("basic-auth", tracking_uri=...)).
#   Signed-in users READ every experiment (MLFLOW_AUTH_DEFAULT_PERMISSION to change) and own what
#   they create. The CSRF key comes from MLFLOW_FLASK_SERVER_SECRET_KEY, else from
#   <state>/mlflow_flask_secret (made once, mode 600).
# Jobs then log through the server with MLflow's own variables (see infra/README.md):
#   MLFLOW_TRACKING_URI=http://HOST:PORT MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...
# For browsing only, `mlflow ui --backend-store-uri sqlite:///<abs state>/mlflow.db` is enough.
set -euo pipefail
AUTH=0
for arg in "$@"; do
  case "$arg" in
    --auth) AUTH=1 ;;
    *) echo "unknown argument $arg (usage: infra/mlflow_server.sh [--auth])" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
case "$HOST" in
  127.0.0.1|localhost|::1) ;;
  *) [ "$AUTH" = 1 ] || { echo "HOST=$HOST serves beyond this machine: add --auth (every request then" \
                                 "needs a user and password)" >&2; exit 2; } ;;
esac
mkdir -p "${STATE_DIR:-.state}"
STATE_DIR="$(cd "${STATE_DIR:-.state}" && pwd)"  # absolute: the jobs' embedded store lives here
ARGS=(--backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" --artifacts-destination "$STATE_DIR/mlartifacts"
      --host "$HOST" --port "$PORT")
[ -n "${WORKERS:-}" ] && ARGS+=(--workers "$WORKERS")
# MLflow 3's server-side job runner (GenAI prompt optimisation etc.) starts ~8 processes the jobs
# here never use; off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

if [ "$AUTH" = 1 ]; then
  if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] && [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD_FILE:-}" ]; then
    [ -r "$MLFLOW_AUTH_ADMIN_PASSWORD_FILE" ] || {
      echo "MLFLOW_AUTH_ADMIN_PASSWORD_FILE=$MLFLOW_AUTH_ADMIN_PASSWORD_FILE cannot be read" >&2; exit 2; }
    MLFLOW_AUTH_ADMIN_PASSWORD="$(head -n 1 "$MLFLOW_AUTH_ADMIN_PASSWORD_FILE")"
  fi
  if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] && [ ! -s "$STATE_DIR/mlflow_auth.db" ]; then
    echo "--auth needs the admin password for the first start: set MLFLOW_AUTH_ADMIN_PASSWORD or" \
         "MLFLOW_AUTH_ADMIN_PASSWORD_FILE (there is no default)" >&2
    exit 2
  fi
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    SECRET="$STATE_DIR/mlflow_flask_secret"
    [ -s "$SECRET" ] || (umask 077 && .venv/bin/python -c "import secrets; print(secrets.token_hex(32))" > "$SECRET")
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$SECRET")"
  fi
  AUTH_INI="$STATE_DIR/mlflow_auth.ini"
  cat > "$AUTH_INI" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = sqlite:///$STATE_DIR/mlflow_auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  export MLFLOW_AUTH_CONFIG_PATH="$AUTH_INI" MLFLOW_FLASK_SERVER_SECRET_KEY
  [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] && export MLFLOW_AUTH_ADMIN_PASSWORD
  ARGS+=(--app-name basic-auth)
fi
exec .venv/bin/mlflow server "${ARGS[@]}"
