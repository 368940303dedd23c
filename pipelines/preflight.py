"""The exit codes every job ends with, and the checks each makes before Ray starts.

A job that cannot record its results (tracking store down), cannot read its inputs, or was given a
contradictory command line must say so in one line within seconds: Ray's start-up alone takes
5-20 s, and a traceback after it hides the line that matters. Exit codes, the same in every job:
0 done, 2 config or command line, 3 tracking store, 4 interrupted sweep, 5 input data.
"""

from __future__ import annotations

import sys

from gems.config import ConfigError
from gems.data.events import InputError
from tune.registry.tracking import TrackingError

EXIT_CONFIG, EXIT_TRACKING, EXIT_INTERRUPTED, EXIT_INPUT = 2, 3, 4, 5
_EXITS: tuple[tuple[type[Exception], str, int], ...] = (
    (ConfigError, "", EXIT_CONFIG), (TrackingError, "tracking: ", EXIT_TRACKING),
    (InputError, "input error: ", EXIT_INPUT))
PREFLIGHT_ERRORS = tuple(kind for kind, _, _ in _EXITS)


def job_config(config: str | None, smoke_test: bool, default: str) -> str:
    """The config a job loads: --smoke-test brings its own (tiny), so naming another one as well
    is refused instead of silently ignored."""
    if smoke_test and config is not None:
        raise ConfigError(f"--smoke-test runs the tiny config with its own overrides and cannot be "
                          f"combined with --config {config}; drop one of them (change a smoke run "
                          "with --set)")
    return "tiny" if smoke_test else config or default


def exit_code(err: Exception) -> int:
    """Print a pre-flight failure as one line on stderr and return its exit code."""
    for kind, prefix, code in _EXITS:
        if isinstance(err, kind):
            print(f"{prefix}{err}", file=sys.stderr)
            return code
    raise err
