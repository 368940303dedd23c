"""Nightly retraining: new day partitions -> warm-started challenger -> paired holdout -> decision.

One night is keyed by its holdout day D (the newest partition) and recorded as one MLflow run
tagged ``gems.nightly_key=D``. The run doubles as the night's journal, so the job is idempotent
and crash-safe:

- each phase records its result on the run (shards on disk, checkpoint path, logged model URI,
  registered version, metrics of both models) and a rerun skips every phase already recorded:
  a crash after training resumes at evaluation and never trains again;
- the ``champion`` alias moves only at the end (``previous`` first, then ``champion``), and the
  decision tag is written after it: until then the night is unfinished and the next run
  completes it; once written, any later run for the same logs says "already decided";
- with no partition newer than the champion's watermark the job does nothing and says so, and a
  lock file per night makes a concurrent second run of the same night a no-op.

Modules of tune.nightly: plan (which days), log_slice (what is read), warm_start (from the
champion), holdout (both models on the holdout), decision (the rule), journal (the journal and the
registered version).

Crash injection for tests: ``GEMS_NIGHTLY_CRASH_AT=<point>`` raises at that point.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlflow
from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities import Run

from gems.data.shards import read_manifest
from tune.config import JobConfig, config_from_dict
from tune.ingest.preprocess import run_preprocess
from tune.nightly.decision import decide
from tune.nightly.holdout import run_evaluation, scores_of
from tune.nightly.journal import (
    ATTEMPTS,
    CHAMPION_AT_START,
    CHECKPOINT,
    DECISION,
    EVALUATED,
    KEY_TAG,
    TRAINED_IN,
    VERSION,
    T,
    describe_night,
    find_night_run,
    params_from_run_data,
    register_once,
    version_tags,
)
from tune.nightly.log_slice import build_view
from tune.nightly.plan import NightlyError, NightPlan, list_partitions, parse_watermark, plan_night
from tune.nightly.warm_start import WarmStart, champion_params, fetch_champion, with_params
from tune.registry.models import CHALLENGER, VersionInfo, get_champion, promote, set_alias
from tune.registry.run_params import config_params, log_new_params
from tune.registry.tracking import TAG_PREFIX, resolve_tracking_uri, run_tags, setup_tracking

log = logging.getLogger(__name__)

CRASH_ENV = "GEMS_NIGHTLY_CRASH_AT"
CRASH_POINTS = ("after_preprocess", "after_train", "after_evaluate", "after_register", "before_promote")
Status = Literal["no_new_data", "already_decided", "in_progress", "promoted", "rejected"]


class InjectedCrash(RuntimeError):
    """Raised at the point named by GEMS_NIGHTLY_CRASH_AT (tests of crash safety)."""


@dataclass
class NightlyOutcome:
    status: Status
    message: str
    night: str | None = None
    run_id: str | None = None
    champion: str | None = None  # the champion version after this run
    challenger: str | None = None  # tonight's version
    metrics: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        raise InjectedCrash(f"injected crash at {name} ({CRASH_ENV})")


def _check_crash_env() -> None:
    value = os.environ.get(CRASH_ENV)
    if value and value not in CRASH_POINTS:
        raise NightlyError(f"{CRASH_ENV}={value!r} is not a crash point; use one of {CRASH_POINTS}")


# ------------------------------------------------------------------------------ inputs


def log_locations(cfg: JobConfig) -> tuple[Path, Path]:
    """(events directory with dt= partitions, item table) of the configured logs."""
    d = cfg.data
    if d.source == "synthetic":
        root = cfg.resolve(d.path or "raw/synthetic")
        return root / "events", root / "items.parquet"
    if d.source == "events":
        if d.path is None or d.items_path is None:
            raise NightlyError("data.path and data.items_path are required for nightly runs on events")
        return cfg.resolve(d.path), cfg.resolve(d.items_path)
    raise NightlyError(f"data.source={d.source!r}: nightly runs need day-partitioned logs (data.source "
                       "events or synthetic); convert the logs to dt=YYYY-MM-DD/ partitions first")


def check_night_inputs(cfg: JobConfig, simulated: bool = False) -> list[str]:
    """The cheap checks, run before Ray starts: the crash point, where the logs are, and that they
    hold at least one day partition (a smoke test simulates its days later, so only the layout is
    checked). Returns the partitions found."""
    _check_crash_env()
    events_root, _ = log_locations(cfg)
    if simulated:
        return []
    partitions = list_partitions(events_root)
    if not partitions:
        raise NightlyError(f"no day partitions with data under {events_root}")
    return partitions


def night_dir(cfg: JobConfig, key: str) -> Path:
    return cfg.resolve("nightly") / key


def night_data_config(cfg: JobConfig, plan: NightPlan, view_dir: Path, items_path: Path,
                      shard_dir: Path) -> JobConfig:
    """Preprocessing of the night's view with a time cut at the holdout day."""
    raw = cfg.model_dump(mode="json")
    raw["data"].update(source="events", path=str(view_dir), items_path=str(items_path),
                       split_mode="time_cut", cut_day=plan.holdout_day, output_dir=str(shard_dir))
    return config_from_dict(raw)


def challenger_config(cfg: JobConfig, warm: WarmStart, params: Mapping[str, float | int]) -> JobConfig:
    """The champion's hyperparameters (then nightly.override_params) on the champion's weights."""
    tuned = with_params(cfg, {**params, **cfg.nightly.override_params})
    raw = tuned.model_dump(mode="json")
    raw["model"]["name_or_path"] = str(warm.model_dir)
    if cfg.nightly.max_steps is not None:
        raw["train"]["max_steps"] = cfg.nightly.max_steps
    return config_from_dict(raw)


def _shards_match(shard_dir: Path, plan: NightPlan) -> bool:
    try:
        manifest = read_manifest(shard_dir)
    except FileNotFoundError:
        return False
    read = manifest.get("watermark", {}).get("partitions") or []
    # History days without rows of tonight's users are absent from the view, hence the subset test.
    return (plan.holdout_day in read and set(read) <= set(plan.partitions)
            and manifest.get("config", {}).get("data", {}).get("cut_day") == plan.holdout_day)


def preprocess_night(cfg: JobConfig, plan: NightPlan, events_root: Path,
                     items_path: Path) -> tuple[Path, dict]:
    """The night's prompt shards (reused when a previous attempt already published them)."""
    work = night_dir(cfg, plan.key)
    shard_dir = work / "shards"
    if not _shards_match(shard_dir, plan):
        stats = build_view(events_root, plan, work / "events")
        log.info("night %s: view of %s (history of %d users, %d/%d history rows kept)", plan.key,
                 list(plan.partitions), stats.users, stats.history_rows_kept, stats.history_rows_in)
        run_preprocess(night_data_config(cfg, plan, work / "events", items_path, shard_dir))
    manifest = read_manifest(shard_dir)
    counts = manifest["counts"]
    if not sum(counts["test"].values()):
        raise NightlyError(f"holdout day {plan.holdout_day} produced no test examples (no clicks of known "
                           "users that day?); nothing to compare the models on")
    if not sum(counts["train"].values()):
        raise NightlyError(f"no training examples before {plan.holdout_day} in {list(plan.partitions)}; "
                           "raise nightly.history_days")
    return shard_dir, manifest


# ------------------------------------------------------------------------------ training


def train_challenger(cfg: JobConfig, tcfg: JobConfig, shard_dir: Path, manifest: Mapping[str, Any],
                     plan: NightPlan, run_id: str,
                     experiment_id: str) -> tuple[Path, dict[str, float | int], list[dict]]:
    """Fine-tune the challenger (fixed params, or a small sweep); returns checkpoint, params, history.

    The null-space bases are the base backbone's (cfg.model), as for the champion: every night's
    update stays orthogonal to the same general-domain directions, so protection does not erode
    from night to night, and the cached bases are reused instead of re-estimated.
    """
    from tune.sweep.bases import sweep_bases
    from tune.sweep.parent_run import run_logged_sweep
    from tune.sweep.tuner import SweepInputs, best_trial, sweep_name
    from tune.train.bases import prepare_bases
    from tune.train.trainer import run_training

    base = tcfg.model_copy(update={"model": cfg.model})
    if cfg.nightly.sweep:
        bases = sweep_bases(base)
        inputs = SweepInputs(config=tcfg.model_dump(mode="json"), shard_dir=str(shard_dir),
                             bases_path=str(bases) if bases else None)
        outcome = run_logged_sweep(tcfg, inputs, sweep_name(tcfg, manifest.get("fingerprint")), run_id,
                                   resolve_tracking_uri(cfg), experiment_id, run_tags(cfg, manifest))
        best = best_trial(outcome.results)
        return Path(best.checkpoint_path), dict(best.params), []
    result = run_training(tcfg, shard_dir, prepare_bases(base), run_name=f"{cfg.name}-nightly-{plan.key}")
    if result.checkpoint_path is None:
        raise NightlyError("training finished without a local checkpoint (train.storage_path must be a "
                           "local or mounted path for nightly runs)")
    return result.checkpoint_path, {}, result.history


def _log_history(history: list[dict]) -> None:
    for report in history:
        step = int(report.get("step", 0))
        values = {f"challenger/{k}": float(v) for k, v in report.items()
                  if k != "step" and isinstance(v, int | float) and math.isfinite(v)}
        if values:
            mlflow.log_metrics(values, step=step)


def _decided(run: Run, key: str, name: str) -> NightlyOutcome:
    """A night already decided: what it registered, and the champion as it is now (a later night
    may have moved it)."""
    tags = run.data.tags
    champion = get_champion(name)
    return NightlyOutcome(
        status="already_decided", night=key, run_id=run.info.run_id,
        message=f"night {key} was already decided ({tags[DECISION]}, version {tags.get(VERSION)}); "
                "nothing to do", champion=champion.version if champion else None,
        challenger=tags.get(VERSION), metrics=dict(run.data.metrics))


# ----------------------------------------------------------------------------------- main


def run_nightly(cfg: JobConfig) -> NightlyOutcome:
    """Run (or finish) tonight's retraining; Ray is initialised by the caller.

    A lock file per night (under the state dir) turns a concurrent second run into a no-op.
    """
    started = time.perf_counter()
    partitions = check_night_inputs(cfg)
    events_root, items_path = log_locations(cfg)
    lock_path = cfg.resolve("nightly") / f".{partitions[-1]}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return NightlyOutcome(status="in_progress", night=partitions[-1],
                              message=f"another run of night {partitions[-1]} is in progress ({lock_path}); "
                                      "nothing to do")
    try:
        return _run_night(cfg, setup_tracking(cfg), partitions, events_root, items_path, started)
    finally:
        lock.release()


def _run_night(cfg: JobConfig, experiment_id: str, partitions: list[str], events_root: Path, items_path: Path,
               started: float) -> NightlyOutcome:
    name = cfg.mlflow.registered_model
    previous = find_night_run(experiment_id, partitions[-1])
    if previous is not None and DECISION in previous.data.tags:
        if previous.info.status != "FINISHED":
            MlflowClient().set_terminated(previous.info.run_id, "FINISHED")
        return _decided(previous, partitions[-1], name)

    client = MlflowClient()
    if previous is not None:
        start_version = previous.data.tags[CHAMPION_AT_START]
        parent = VersionInfo.from_mlflow(client.get_model_version(name, start_version))
    else:
        champion = get_champion(name)
        if champion is None:
            raise NightlyError(f"registered model {name!r} has no champion; run pipelines/full.py first")
        parent = champion
    watermark = parse_watermark(parent.watermark)
    if watermark is None:
        raise NightlyError(f"{parent.uri} has no {TAG_PREFIX}watermark tag, so the new partitions are "
                           "unknown; tag it with the newest day it was trained on (YYYY-MM-DD)")
    plan = plan_night(partitions, watermark, cfg.nightly.history_days)
    if plan is None:
        return NightlyOutcome(status="no_new_data", champion=parent.version,
                              message=f"no partition newer than the champion's watermark {watermark} "
                                      f"(newest: {partitions[-1]}); nothing to do")

    tags = {**run_tags(cfg, None), KEY_TAG: plan.key, CHAMPION_AT_START: parent.version,
            f"{T}new_partitions": json.dumps(list(plan.new_partitions)),
            f"{T}history_partitions": json.dumps(list(plan.history_partitions))}
    with mlflow.start_run(run_id=previous.info.run_id if previous else None,
                          run_name=None if previous else f"nightly-{plan.key}",
                          experiment_id=None if previous else experiment_id,
                          tags=None if previous else tags, log_system_metrics=False) as active:
        run = client.get_run(active.info.run_id)
        attempt = int(run.data.tags.get(ATTEMPTS, "0")) + 1
        mlflow.set_tag(ATTEMPTS, str(attempt))
        log.info("night %s (attempt %d): champion v%s, new %s, history %s", plan.key, attempt, parent.version,
                 list(plan.new_partitions), list(plan.history_partitions))

        shard_dir, manifest = preprocess_night(cfg, plan, events_root, items_path)
        mlflow.set_tags(run_tags(cfg, manifest))
        mlflow.log_dict(manifest, "data/manifest.json")
        crash_point("after_preprocess")

        warm = fetch_champion(parent, night_dir(cfg, plan.key) / "champion")
        params = champion_params(parent)
        tcfg = challenger_config(cfg, warm, params)
        checkpoint_tag = run.data.tags.get(CHECKPOINT)
        if checkpoint_tag and Path(checkpoint_tag).is_dir():
            checkpoint = Path(checkpoint_tag)
            used = params_from_run_data(run) or {**params, **cfg.nightly.override_params}
            log.info("night %s: challenger already trained (%s); not training again", plan.key, checkpoint)
        else:
            checkpoint, best, history = train_challenger(cfg, tcfg, shard_dir, manifest, plan,
                                                         active.info.run_id, experiment_id)
            used = {**params, **cfg.nightly.override_params, **best}
            mlflow.log_params({f"param.{k}": v for k, v in used.items()})
            log_new_params(active.info.run_id, config_params(tcfg, searched=tcfg.tune.space
                                                             if cfg.nightly.sweep else None))
            mlflow.log_dict(json.loads(tcfg.model_dump_json()), "config/challenger_config.json")
            _log_history(history)
            mlflow.set_tags({CHECKPOINT: str(checkpoint), TRAINED_IN: str(attempt)})
        crash_point("after_train")

        if EVALUATED in run.data.tags:
            metrics = dict(run.data.metrics)
        else:
            metrics = run_evaluation(tcfg, warm, checkpoint, shard_dir)
            mlflow.log_metrics(metrics)
            mlflow.set_tag(EVALUATED, "1")
        crash_point("after_evaluate")

        champion_scores, challenger_scores = scores_of(metrics, "champion"), scores_of(metrics, "challenger")
        version = register_once(cfg, client.get_run(active.info.run_id), checkpoint, shard_dir, tcfg,
                            version_tags(cfg, manifest, plan, active.info.run_id, parent, used, metrics),
                            describe_night(parent, plan, metrics, None),
                            bm25_weight=metrics.get("challenger/bm25_weight") or None)
        mlflow.set_tag(VERSION, version.version)
        crash_point("after_register")

        decision = decide(champion_scores, challenger_scores, cfg.nightly.tolerance,
                          cfg.nightly.retention_tolerance, cfg.nightly.max_kl)
        mlflow.log_dict(decision.as_dict(), "decision.json")
        mlflow.log_metrics({"decision/promoted": float(decision.promote),
                            "decision/unified_delta": decision.unified_delta,
                            **({"decision/perplexity_ratio": decision.perplexity_ratio}
                               if decision.perplexity_ratio is not None else {})})
        crash_point("before_promote")
        if decision.promote:
            promote(name, version.version)
        else:
            set_alias(name, CHALLENGER, version.version)
        client.set_model_version_tag(name, version.version, f"{TAG_PREFIX}nightly_decision", decision.verdict)
        client.update_model_version(name, version.version,
                                    description=describe_night(parent, plan, metrics, decision))
        wall = time.perf_counter() - started
        mlflow.log_metric("nightly/wall_s", wall)
        mlflow.set_tag(DECISION, decision.verdict)  # the night's commit marker: written last
    champion_now = get_champion(name)
    return NightlyOutcome(
        status="promoted" if decision.promote else "rejected", night=plan.key, run_id=active.info.run_id,
        champion=champion_now.version if champion_now else None, challenger=version.version,
        metrics={**metrics, "nightly/wall_s": wall}, reasons=list(decision.reasons),
        message=(f"night {plan.key}: v{version.version} {decision.verdict} against v{parent.version} "
                 f"(unified {challenger_scores.unified:.4f} vs {champion_scores.unified:.4f})"))

