"""The processes of one Ray head started by a test, found by its private temp dir and stopped alone.

Never `ray stop`: it stops every Ray instance of the user on the machine, other sessions' included.
"""

from __future__ import annotations

import contextlib
import signal

import psutil


def head_processes(marker: str) -> list[psutil.Process]:
    """Processes whose command line names ``marker`` (the head's own --temp-dir)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_head(temp_dir: str) -> None:
    """SIGTERM this head's processes, SIGKILL what is left after 15 s."""
    procs = head_processes(temp_dir)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
