"""pipelines/full.py refuses to start work it cannot record, and bad configs, in seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / "full.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_unreachable_tracking_server_fails_before_any_work(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    started = time.monotonic()
    out = _run(["--smoke-test", "--set", f"state_dir={tmp_path / 'state'}"], env, tmp_path)
    assert out.returncode == 3, out.stderr[-2000:]
    assert f"http://127.0.0.1:{port}" in out.stderr and "unreachable" in out.stderr
    assert time.monotonic() - started < 60  # mostly interpreter start-up and imports
    assert not (tmp_path / "state").exists(), "nothing may be written (no data, no Ray, no training)"
    assert "Started a local Ray instance" not in out.stderr


@pytest.mark.slow
def test_missing_events_fail_before_ray_starts(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-events"
    out = _run(["--smoke-test", "--set", f"state_dir={tmp_path / 'state'}", "--set", "data.source=events",
                "--set", f"data.path={missing}", "--set", f"data.items_path={tmp_path / 'items.jsonl'}"],
               dict(os.environ), tmp_path)
    assert out.returncode == 5, out.stderr[-2000:]
    assert "input error" in out.stderr and str(missing) in out.stderr
    assert "Started a local Ray instance" not in out.stderr
