"""Logs that arrive day by day, and a first champion, for the nightly smoke test and its e2e test.

The simulator writes every day at once; ``land_day`` publishes one day into a live log directory
the way a log shipper would (the partition appears complete, and the item table grows by the
items released that day), so the nightly job sees yesterday's world and then today's.
``bootstrap_champion`` is the day-one job without the sweep (preprocess -> train -> register
as champion with the data's watermark): the same library calls pipelines/full.py makes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import polars as pl

from gems.config import Config
from gems.data.simulate import SimulationParams, day_name, simulate
from tune.config import JobConfig
from tune.ingest.preprocess import run_preprocess
from tune.nightly.warm_start import PARAM_TAG_PREFIX
from tune.registry.models import CHAMPION, VersionInfo, log_ranker, metric_tags, register_version
from tune.registry.tracking import run_tags, setup_tracking

SOURCE_DIR = "simulated"  # every simulated day, under the state dir
TUNED_FIELDS = ("gems.r_shared", "gems.t_svd", "gems.k", "gems.alpha", "gems.tau", "train.lr")


def simulate_source(cfg: Config, days: int) -> tuple[Path, SimulationParams]:
    """All ``days`` simulated once (users/items/seed from cfg.data) under the state dir."""
    d = cfg.data
    params = SimulationParams(users=d.synthetic_users, items=d.synthetic_items, days=days, seed=d.seed,
                              events_per_user_day=d.synthetic_events_per_user_day)
    root = cfg.resolve(SOURCE_DIR)
    if not (root / "items.parquet").exists() or len(list((root / "events").glob("dt=*"))) != days:
        simulate(root, params)
    return root, params


def land_day(source: Path, live: Path, params: SimulationParams, day: int) -> str:
    """Publish simulated day ``day`` (0-based) into ``live``: its partition and the items released
    by then. Partitions appear by rename, never half-written."""
    name = day_name(params, day)
    partition = live / "events" / f"dt={name}"
    if not partition.exists():
        staging = live / "events" / f"_dt={name}.landing"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source / "events" / f"dt={name}", staging)
        os.replace(staging, partition)
    items = pl.read_parquet(source / "items.parquet").filter(pl.col("release_date") <= name)
    tmp = live / ".items.parquet.tmp"
    items.write_parquet(tmp)
    os.replace(tmp, live / "items.parquet")
    return name


def bootstrap_champion(cfg: JobConfig) -> VersionInfo:
    """Train on the logs as they are and register the result as ``champion`` (no sweep)."""
    from tune.train.bases import prepare_bases
    from tune.train.trainer import run_training

    setup_tracking(cfg)
    manifest = run_preprocess(cfg)
    shard_dir = cfg.resolve(cfg.data.output_dir)
    outcome = run_training(cfg, shard_dir, prepare_bases(cfg))
    assert outcome.checkpoint_path is not None
    val = {k[len("val/"):]: float(v) for k, v in outcome.metrics.items() if k.startswith("val/")}
    params = {f: getattr(getattr(cfg, f.split(".")[0]), f.split(".")[1]) for f in TUNED_FIELDS}
    with mlflow.start_run(run_name=f"{cfg.name}-bootstrap", tags=run_tags(cfg, manifest)):
        mlflow.log_metrics({f"val/{k}": v for k, v in val.items()})
        info = log_ranker(outcome.checkpoint_path, shard_dir / "items.parquet", cfg)
        tags = {**run_tags(cfg, manifest), **metric_tags(val, prefix="val."),
                **{f"{PARAM_TAG_PREFIX}{k}": str(v) for k, v in params.items()}}
        return register_version(info.model_uri, cfg.mlflow.registered_model, tags,
                                f"Bootstrap champion trained on {manifest['watermark']['partitions']}",
                                alias=CHAMPION)
