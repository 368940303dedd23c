"""Waiting for a server a test started (a model server, a tracking server) to answer."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path


def wait_until_up(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 300) -> None:
    """Poll ``url`` until it answers; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            log_tail = log_path.read_text()[-3000:]
            assert proc.poll() is None and time.monotonic() < deadline, log_tail
            time.sleep(2)
