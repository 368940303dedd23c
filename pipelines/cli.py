"""What the five job scripts share: the command line, the config a run loads, Ray's start-up.

A job script (pipelines/<job>.py) is a thin ``main()``: it builds its parser here, loads its config
here, runs the library, and maps failures to the exit codes of pipelines/preflight.py. The only
line each script keeps for itself is the ``sys.path`` insert that lets ``python pipelines/<job>.py``
import this module at all.

``--smoke-test`` reads ``pipelines/configs/smoke/<job>.yaml``: the sections and fields a smoke run
changes, applied as ``--set`` overrides (each file says what it sits on and in which order).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gems.config import ConfigError
from pipelines.preflight import job_config
from tune.config import JobConfig, load_config
from tune.local_ray import init_address, local_runtime_env

SMOKE_DIR = Path(__file__).resolve().parent / "configs" / "smoke"
LOG_FORMAT = "%(asctime)s %(name)s %(message)s"


@dataclass(frozen=True)
class Job:
    """How one job reads its config from the command line.

    ``own_smoke_config``: --smoke-test loads the tiny config (and refuses --config), else it adds to
    --config. In every job --set is applied last: what a user sets explicitly changes a smoke run too.
    """

    name: str
    default_config: str
    own_smoke_config: bool = True


def smoke_overrides(job: str) -> list[str]:
    """``configs/smoke/<job>.yaml`` as ``section.field=value`` overrides (JSON values: a YAML subset
    that reads back as exactly the value the file holds)."""
    path = SMOKE_DIR / f"{job}.yaml"
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")

    def flat(node: dict[str, Any], prefix: str) -> list[str]:
        return [item for key, value in node.items()
                for item in (flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                             else [f"{prefix}{key}={json.dumps(value)}"])]

    return flat(raw, "")


def job_parser(doc: str, job: Job, *, set_example: str, smoke_help: str, num_cpus: bool = False,
               epilog: bool = False, set_scope: str = "") -> argparse.ArgumentParser:
    """The parser every job starts from: --config, --set, --smoke-test (and --num-cpus for the jobs
    that start a local Ray); the job adds its own flags."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc if epilog else None,
                                 formatter_class=(argparse.RawDescriptionHelpFormatter if epilog
                                                  else argparse.HelpFormatter))
    if job.own_smoke_config:
        ap.add_argument("--config", default=None, help="YAML config (name in pipelines/configs or a "
                        f"path; default {job.default_config})")
    else:
        ap.add_argument("--config", default=job.default_config,
                        help="YAML config (name in pipelines/configs or path)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a config field{set_scope}, e.g. --set {set_example}")
    ap.add_argument("--smoke-test", action="store_true", help=smoke_help)
    if num_cpus:
        ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    return ap


def job_overrides(args: argparse.Namespace, job: Job) -> list[str]:
    """For a smoke run the job's smoke file, then --set (the user's explicit settings win)."""
    if not args.smoke_test:
        return list(args.set)
    return [*smoke_overrides(job.name), *args.set]


def config_name(args: argparse.Namespace, job: Job) -> str:
    """The config file the run loads (raises ConfigError for --smoke-test with --config, for a job
    whose smoke run brings its own)."""
    if job.own_smoke_config:
        return job_config(args.config, args.smoke_test, job.default_config)
    return args.config


def load_job_config(args: argparse.Namespace, job: Job) -> JobConfig:
    """The run's config; a bad one raises ConfigError (exit 2 with its message: preflight.exit_code)."""
    return load_config(config_name(args, job), job_overrides(args, job))


def setup_logging(fmt: str = LOG_FORMAT) -> None:
    logging.basicConfig(level=logging.INFO, format=fmt)


def start_ray(num_cpus: int | None = None, *, dashboard: bool | None = False,
              driver_logs: bool | None = None, join_env_cluster: bool = False) -> None:
    """``ray.init`` for a job, after its pre-flight checks passed (Ray's start-up takes 5-20 s).

    ``join_env_cluster``: connect to the cluster RAY_ADDRESS names (a job-server URL there is for
    ``ray job submit``, not for ``ray.init``, and is dropped); ``num_cpus`` then does not apply.
    ``None`` leaves an option at Ray's default.
    """
    import ray

    if join_env_cluster and os.environ.get("RAY_ADDRESS", "").startswith("http"):
        os.environ.pop("RAY_ADDRESS")
    address = init_address()  # RAY_ADDRESS's cluster (``ray job submit``), else a local instance
    local = address == "local"
    ray.init(address=address, num_cpus=num_cpus if local else None, include_dashboard=dashboard,
             ignore_reinit_error=True, log_to_driver=driver_logs,
             runtime_env=local_runtime_env(dashboard) if local else None)
