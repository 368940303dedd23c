"""A shared MLflow server with login: `infra/mlflow_server.sh --auth` as a real `mlflow server` process
(MLflow's basic-auth app, admin password from a file). A request without credentials is refused; a
team member's job logs a run through MLflow's own MLFLOW_TRACKING_USERNAME / _PASSWORD; a job
without them ends in seconds with exit 3 and says what to set; the script refuses to start without
an admin password and refuses to serve beyond loopback without --auth."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.server import get_app_client
from servers import wait_until_up

from pipelines.nightly import main as nightly_main
from tune.config import load_config
from tune.registry.run_params import config_params, log_new_params
from tune.registry.tracking import setup_tracking

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "mlflow_server.sh"
API = "/api/2.0/mlflow/experiments/search?max_results=1"


@dataclass
class Server:
    url: str
    admin_password: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    state = tmp_path_factory.mktemp("mlflow-auth")
    password = secrets.token_urlsafe(18)
    (state / "admin-password").write_text(password + "\n")
    port = _free_port()
    env = _clean_env(STATE_DIR=str(state), PORT=str(port), WORKERS="1",
                     MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(state / "admin-password"))
    with open(state / "server.log", "w") as log:
        proc = subprocess.Popen([str(SCRIPT), "--auth"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, state / "server.log")
        yield Server(url=url, admin_password=password)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _status(url: str, user: str | None = None, password: str = "") -> int:
    request = urllib.request.Request(url)
    if user is not None:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_requests_without_valid_credentials_are_refused(server: Server) -> None:
    assert _status(server.url + API) == 401
    assert _status(server.url + API, "admin", "not-the-password") == 401
    assert _status(server.url + API, "admin", server.admin_password) == 200


@pytest.mark.slow
def test_a_team_member_job_logs_through_mlflows_credential_variables(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.admin_password)
    alice_password = secrets.token_urlsafe(18)
    get_app_client("basic-auth", tracking_uri=server.url).create_user("alice", alice_password)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", alice_password)
    cfg = load_config("tiny", [f"state_dir={tmp_path}", "mlflow.experiment=team"])
    experiment_id = setup_tracking(cfg)  # what every job runs first
    with mlflow.start_run(experiment_id=experiment_id, run_name="alice-job") as run:
        log_new_params(run.info.run_id, config_params(cfg))
        mlflow.log_metric("val/unified", 0.25)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.admin_password)
    logged = MlflowClient(server.url).get_run(run.info.run_id)
    assert logged.info.status == "FINISHED" and logged.data.metrics["val/unified"] == 0.25
    assert logged.data.params["train.lr"] == str(cfg.train.lr)


@pytest.mark.slow
def test_a_job_without_credentials_exits_3_before_ray(
        server: Server, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert nightly_main(["--config", "tiny", "--set", f"state_dir={tmp_path}"]) == 3
    err = capsys.readouterr().err
    assert f"MLflow server {server.url} refused a request without credentials" in err
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in err and "Traceback" not in err


def test_auth_without_an_admin_password_is_refused(tmp_path: Path) -> None:
    env = _clean_env(STATE_DIR=str(tmp_path), PORT=str(_free_port()))
    out = subprocess.run([str(SCRIPT), "--auth"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "there is no default" in out.stderr
    assert not (tmp_path / "mlflow_auth.db").exists()


def test_serving_beyond_loopback_needs_auth(tmp_path: Path) -> None:
    out = subprocess.run([str(SCRIPT)], env=_clean_env(STATE_DIR=str(tmp_path), HOST="0.0.0.0"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "HOST=0.0.0.0 serves beyond this machine: add --auth" in out.stderr
