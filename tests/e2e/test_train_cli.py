"""pipelines/train.py as a user runs it: --smoke-test preprocesses, builds bases, trains on Ray
Train and prints the checkpoint and metrics; a bad --resume fails with a clear message."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gems.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

SCRIPT = PROJECT_ROOT / "pipelines" / "train.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=1200, cwd=PROJECT_ROOT)


def test_smoke_test_trains_and_reports(tmp_path: Path) -> None:
    proc = _run("--config", "tiny", "--smoke-test", "--num-cpus", "2", "--set", f"state_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):proc.stdout.rindex("}") + 1])
    assert re.search(r"step 2/4 \| loss [0-9.]+ .*\| s/step", proc.stdout + proc.stderr), \
        "rank 0's progress lines reach the terminal"

    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.is_dir() and checkpoint.is_relative_to(tmp_path)
    assert (checkpoint / "model" / "model.safetensors").is_file()
    assert summary["metrics"]["step"] == 4
    assert 0.0 <= summary["metrics"]["val/unified"] <= 1.0
    assert list((tmp_path / "cache" / "nullspace").glob("nullspace-*.safetensors"))  # bases built once


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    proc = _run("--config", "tiny", "--smoke-test", "--num-cpus", "2", "--set", f"state_dir={tmp_path}",
                "--resume", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert "cannot resume" in proc.stderr and "not a training checkpoint" in proc.stderr
