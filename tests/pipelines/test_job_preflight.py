"""Every job fails in seconds, before Ray starts, with one line and its exit code (pipelines/preflight.py):
a dead tracking server (3), a contradictory command line (2), missing logs (2 nightly, 5 others)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from pipelines.compare import main as compare_main
from pipelines.full import main as full_main
from pipelines.nightly import main as nightly_main
from pipelines.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]
Main = Callable[[list[str] | None], int]


def _dead_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _args(job: str, tmp_path: Path) -> tuple[Main, list[str]]:
    state = ["--set", f"state_dir={tmp_path / 'state'}"]
    return {"full": (full_main, ["--config", "tiny", *state]),
            "nightly": (nightly_main, ["--config", "tiny", *state]),
            "compare": (compare_main, ["--config", "tiny", "--out", str(tmp_path / "out"), *state])}[job]


@pytest.mark.parametrize("job", ["full", "nightly", "compare"])
def test_unreachable_tracking_server_exits_3_before_ray(
        job: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    uri = _dead_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    main, args = _args(job, tmp_path)
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"tracking: MLflow tracking server {uri} is unreachable") and "Traceback" not in err
    assert not ray.is_initialized()
    assert not (tmp_path / "state").exists() and not (tmp_path / "out").exists(), "nothing may be written"


@pytest.mark.parametrize("job", ["full", "nightly", "compare"])
def test_smoke_test_with_a_config_is_refused(job: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main, args = _args(job, tmp_path)
    assert main(["--smoke-test", *args]) == 2
    err = capsys.readouterr().err
    assert "--smoke-test runs the tiny config" in err and "--config tiny" in err
    assert not ray.is_initialized()


def test_nightly_without_partitions_exits_2_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "events").mkdir()
    events = ["data.source=events", f"data.path={tmp_path / 'events'}", "data.items_path=items.parquet"]
    code = nightly_main(["--config", "tiny", "--set", f"state_dir={tmp_path}",
                         *[arg for o in events for arg in ("--set", o)]])
    assert code == 2
    assert f"nightly: no day partitions with data under {tmp_path / 'events'}" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_train_with_missing_events_exits_5_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-events"
    events = ["data.source=events", f"data.path={missing}", f"data.items_path={tmp_path / 'items.jsonl'}"]
    code = train_main(["--config", "tiny", "--set", f"state_dir={tmp_path}",
                       *[arg for o in events for arg in ("--set", o)]])
    assert code == 5
    assert f"input error: data.path does not exist: {missing}" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.slow
def test_nightly_with_a_dead_tracking_server_as_a_user_runs_it(tmp_path: Path) -> None:
    """The issue's repro: a traceback after ~21 s (Ray first); now one line, exit 3, no Ray."""
    uri = _dead_uri()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(ROOT / "pipelines" / "nightly.py"), "--smoke-test", "--set",
                          f"state_dir={tmp_path / 'state'}"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    seconds = time.monotonic() - started
    assert out.returncode == 3, out.stderr[-2000:]
    assert f"tracking: MLflow tracking server {uri} is unreachable" in out.stderr
    assert "Traceback" not in out.stderr and "Started a local Ray instance" not in out.stderr
    assert seconds < 60, seconds  # interpreter start-up and imports; Ray would add 5-20 s more
