"""Where MLflow writes, checked before any training, and what every pipeline run records.

Only the driver process writes to MLflow (trials report to Ray; see tune/sweep/trial_runs.py), so an
embedded SQLite store never sees two writers. The embedded store lives at an absolute path under
the state dir: a relative path would land inside Ray's unpacked job working_dir and vanish.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import polars as pl
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gems.config import PROJECT_ROOT, Config
from tune.config import JobConfig

REMOTE_SCHEMES = ("http://", "https://")
TAG_PREFIX = "gems."


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any training starts."""


# mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI (for child processes); a value this
# process exported itself is not the user's choice and must not pin a later config to that store.
_uris_we_exported: set[str] = set()


def _user_env_uri() -> str | None:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return None if env in _uris_we_exported else env


def resolve_tracking_uri(cfg: JobConfig) -> str:
    """cfg.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<abs state_dir>/mlflow.db."""
    uri = cfg.mlflow.tracking_uri or _user_env_uri() or ""
    if not uri.strip():
        return f"sqlite:///{cfg.state_path / 'mlflow.db'}"
    uri = uri.strip()
    if uri.startswith("sqlite:///"):
        db_path = uri[len("sqlite:///"):]
        if not Path(db_path).is_absolute():
            raise TrackingError(
                f"tracking URI {uri!r} uses a relative SQLite path; inside a Ray job it would land in "
                "the unpacked working_dir and be lost. Use sqlite:////absolute/path/mlflow.db")
    elif "://" not in uri and not Path(uri).is_absolute():
        raise TrackingError(f"tracking URI {uri!r} is a relative path; use an absolute one")
    return uri


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (seconds, not after hours of training) when a tracking server does not answer."""
    if uri.startswith(REMOTE_SCHEMES):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as response:
                if response.status >= 400:
                    raise TrackingError(f"MLflow server {uri} answered {response.status} on /health")
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({err}); start it (infra/mlflow_server.sh) "
                "or point MLFLOW_TRACKING_URI / mlflow.tracking_uri at a reachable server") from None
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def setup_tracking(cfg: JobConfig) -> str:
    """Resolve and check the URI, point MLflow at it and return the experiment id.

    With a local store the experiment's artifact root is pinned under the state dir too (MLflow's
    default, ./mlartifacts, is relative to the current directory, i.e. Ray's working_dir).
    """
    user_uri = _user_env_uri()
    uri = resolve_tracking_uri(cfg)
    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    if uri != user_uri and os.environ.get("MLFLOW_TRACKING_URI") == uri:
        _uris_we_exported.add(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment_id = _experiment_id(cfg, uri)
    except MlflowException as err:
        if err.get_http_status_code() not in (401, 403):
            raise
        raise TrackingError(refused_message(uri, err.get_http_status_code())) from None
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _experiment_id(cfg: JobConfig, uri: str) -> str:
    """The configured experiment, created on first use (a local store's artifacts under state)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if not uri.startswith(REMOTE_SCHEMES):
        artifact_location = (cfg.state_path / "mlartifacts").as_uri()
    return client.create_experiment(cfg.mlflow.experiment, artifact_location=artifact_location)


def refused_message(uri: str, status: int) -> str:
    """Why a server that answers /health refuses the job, and what to set (an auth server, e.g.
    infra/mlflow_server.sh --auth, answers /health to anyone and 401/403 to the API)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = f"user {user!r}" if user else "a request without credentials (MLFLOW_TRACKING_USERNAME unset)"
    return (f"MLflow server {uri} refused {who} with HTTP {status}; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account that may write to the "
            "experiment")


def ui_command(uri: str) -> str:
    """What a user types to browse the runs."""
    if uri.startswith(REMOTE_SCHEMES):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def git_sha() -> str | None:
    """The code version: $GEMS_GIT_SHA (set at job submission), else the checkout's HEAD."""
    if os.environ.get("GEMS_GIT_SHA"):
        return os.environ["GEMS_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_tags(cfg: Config, manifest: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags every run of a pipeline carries: code version, data fingerprint, watermark, method."""
    tags = {f"{TAG_PREFIX}config_name": cfg.name, f"{TAG_PREFIX}method": cfg.gems.method,
            f"{TAG_PREFIX}backbone": cfg.model.name_or_path}
    sha = git_sha()
    if sha:
        tags[f"{TAG_PREFIX}git_sha"] = sha
    if manifest:
        if manifest.get("fingerprint"):
            tags[f"{TAG_PREFIX}data_fingerprint"] = str(manifest["fingerprint"])
        if manifest.get("watermark") is not None:
            tags[f"{TAG_PREFIX}watermark"] = watermark_text(manifest["watermark"])
    return tags


def watermark_text(watermark: Any) -> str:
    """The watermark as one tag value: the newest day the data covers (``YYYY-MM-DD``).

    A manifest watermark ``{"partitions": [...], "event_days": [...]}`` gives its newest
    partition (event day when unpartitioned); a list gives its newest entry.
    """
    if isinstance(watermark, dict):
        days = watermark.get("partitions") or watermark.get("event_days") or []
        return str(max(days)) if days else json.dumps(watermark, sort_keys=True)
    if isinstance(watermark, list | tuple):
        return str(max(watermark)) if watermark else ""
    return str(watermark)


@contextmanager
def parent_run(run_name: str, tags: Mapping[str, str], run_id: str | None = None,
               system_metrics: bool = True) -> Iterator[mlflow.ActiveRun]:
    """The pipeline's run; a crash marks it FAILED (MLflow's context manager does that)."""
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=dict(tags),
                          log_system_metrics=system_metrics) as run:
        yield run


def find_resumable_run(experiment_id: str, key: str) -> str | None:
    """The unfinished parent run of an interrupted sweep with the same key, to continue it."""
    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_PREFIX}sweep_key` = '{key}' and "
        "attributes.status != 'FINISHED'", max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def quarantine_summary(shard_dir: Path, manifest: Mapping[str, Any] | None, examples: int = 3) -> dict:
    """Counts by reason plus a few example rows per reason, from the quarantine shards."""
    summary: dict[str, Any] = {"counts": dict((manifest or {}).get("quarantine", {}) or {}), "examples": {}}
    files = sorted((shard_dir / "quarantine").glob("*.parquet"))
    if files:
        frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
        if "reason" in frame.columns and frame.height:
            counts = frame.group_by("reason").len().sort("reason")
            summary["counts"] = {r: int(n) for r, n in counts.iter_rows()}
            for reason in summary["counts"]:
                rows = frame.filter(pl.col("reason") == reason).head(examples)
                summary["examples"][reason] = json.loads(rows.write_json())
    return summary


def log_run_context(cfg: Config, manifest: Mapping[str, Any] | None, shard_dir: Path | None) -> None:
    """Artifacts of the active run: resolved config, data manifest, quarantine summary."""
    mlflow.log_dict(json.loads(cfg.model_dump_json()), "config/resolved_config.json")
    if manifest is not None:
        mlflow.log_dict(dict(manifest), "data/manifest.json")
    if shard_dir is not None:
        mlflow.log_dict(quarantine_summary(shard_dir, manifest), "data/quarantine_summary.json")


def log_dataset_inputs(splits: Mapping[str, pl.DataFrame], shard_dir: Path, fingerprint: str | None) -> None:
    """Each prompt split as an MLflow dataset input (shows in the run's Datasets panel)."""
    contexts = {"train": "training", "val": "validation", "test": "testing"}
    for split, frame in splits.items():
        digest = f"{fingerprint[:8]}-{split}" if fingerprint else None
        dataset = mlflow.data.from_polars(frame, source=str(shard_dir / split), name=f"prompts-{split}",
                                          digest=digest)
        mlflow.log_input(dataset, context=contexts.get(split, split))
