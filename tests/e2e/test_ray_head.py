"""`infra/start_ray_head.sh` as an operator runs it: every port of the head listens on loopback only,
token auth is on, and an address that means "every interface" is refused.

The head gets its own temp dir, state dir, token file and free ports; its processes are found by
that temp dir (and by the session the script ran in) and stopped alone, never with `ray stop`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from head_processes import head_processes, stop_head

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "start_ray_head.sh"


@dataclass
class Head:
    exports: dict[str, str]
    token: str
    pids: set[int]


def _env(tmp_path: Path, temp_dir: str, token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "NUM_CPUS": "1", "RAY_TEMP_DIR": temp_dir, "STATE_DIR": str(tmp_path / "state"),
            "RAY_AUTH_TOKEN_PATH": str(token_path), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def _session_processes(sid: int) -> list[psutil.Process]:
    """Processes left in the session the script ran in (daemons that `ray start` spawned)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return found


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    tmp_path = tmp_path_factory.mktemp("head")
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = uuid.uuid4().hex
    (tmp_path / "token").write_text(token)  # never the user's ~/.ray/auth_token
    proc = subprocess.Popen([str(SCRIPT)], env=_env(tmp_path, temp_dir, tmp_path / "token"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        exports = dict(re.findall(r"export (\w+)=(\S+)", (tmp_path / "state" / "ray_head.env").read_text()))
        pids = {p.pid for p in head_processes(temp_dir)} | {p.pid for p in _session_processes(proc.pid)}
        yield Head(exports=exports, token=token, pids=pids)
    finally:
        stop_head(temp_dir)
        for left in _session_processes(proc.pid):
            left.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.slow
def test_every_port_of_the_head_listens_on_loopback_only(head: Head) -> None:
    listening = sorted({(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
                        for c in psutil.net_connections("inet")
                        if c.status == psutil.CONN_LISTEN and c.pid in head.pids})
    print("head listens on", listening)
    ports = {port for _, port, _ in listening}
    gcs_port = int(head.exports["RAY_GCS_ADDRESS"].rsplit(":", 1)[1])
    dashboard_port = int(head.exports["RAY_ADDRESS"].rsplit(":", 1)[1])
    assert {gcs_port, dashboard_port} <= ports, listening
    assert len(listening) >= 6, listening  # GCS, raylet (2), dashboard, agents, client server
    exposed = [entry for entry in listening if not _is_loopback(entry[0])]
    assert not exposed, f"listening beyond loopback: {exposed} (all: {listening})"
    assert head.exports["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    assert head.exports["RAY_AUTH_MODE"] == "token"


@pytest.mark.slow
def test_the_job_server_needs_the_token(head: Head) -> None:
    url = head.exports["RAY_ADDRESS"] + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


DRIVER = ("import os, ray; ray.init(address=os.environ['RAY_GCS_ADDRESS'], log_to_driver=False); "
          "print(ray.get(ray.remote(lambda: 'ran on ' + ray.util.get_node_ip_address()).remote()))")


@pytest.mark.slow
def test_a_driver_with_the_env_file_runs_a_task_on_the_head(head: Head) -> None:
    """What `source ray_head.env` gives a shell: the token and the loopback resolution Ray needs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | head.exports
    out = subprocess.run([sys.executable, "-c", DRIVER], env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip().endswith("ran on 127.0.0.1"), out.stderr[-3000:]


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_every_interface_is_refused(address: str, tmp_path: Path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # should a head start after all, it is ours
    env = {**_env(tmp_path, temp_dir, tmp_path / "token"), "RAY_HEAD_IP": address, "STATE_DIR": str(tmp_path)}
    try:
        out = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert out.returncode == 2
    assert f"RAY_HEAD_IP={address} would listen on every interface" in out.stderr
    assert not (tmp_path / "ray_head.env").exists()
