"""A sweep inside the pipeline's MLflow parent run: child runs live, summary figures at the end.

The parent run is keyed by the sweep's name (a tag), so re-running an interrupted pipeline
reopens the same parent run and the restored Tune experiment continues its child runs; a sweep
whose parent run already finished is reported as done instead of being repeated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import mlflow
import optuna
from mlflow import MlflowClient

from tune.config import JobConfig
from tune.registry.run_params import config_params, log_new_params
from tune.registry.tracking import TAG_PREFIX
from tune.sweep import plots
from tune.sweep.trial_runs import MlflowTrialRuns
from tune.sweep.tuner import (
    REC_NDCG,
    SEARCH_NDCG,
    UNIFIED,
    SweepInputs,
    SweepOutcome,
    Trainable,
    run_sweep,
    train_trial,
    trial_rows,
)

log = logging.getLogger(__name__)

SWEEP_TAG = f"{TAG_PREFIX}sweep"
REGISTERED_TAG = f"{TAG_PREFIX}registered_model_uri"
RunState = Literal["new", "resumed", "finished"]


@dataclass(frozen=True)
class PipelineRun:
    run_id: str
    state: RunState
    registered_uri: str | None = None


def latest_pipeline_run(experiment_id: str, sweep: str) -> Any | None:
    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


@contextmanager
def pipeline_run(experiment_id: str, sweep: str, run_name: str, tags: Mapping[str, str],
                 system_metrics: bool = True) -> Iterator[PipelineRun]:
    """Open (or reopen) the parent run of ``sweep``; yields its id and whether it is new.

    A finished parent run is not reopened: the caller reports what it produced and stops.
    """
    previous = latest_pipeline_run(experiment_id, sweep)
    if previous is not None and previous.info.status == "FINISHED":
        yield PipelineRun(previous.info.run_id, "finished", previous.data.tags.get(REGISTERED_TAG))
        return
    resume_id = previous.info.run_id if previous is not None else None
    with mlflow.start_run(run_id=resume_id, run_name=None if resume_id else run_name,
                          experiment_id=None if resume_id else experiment_id,
                          tags=None if resume_id else {**tags, SWEEP_TAG: sweep},
                          log_system_metrics=system_metrics) as run:
        yield PipelineRun(run.info.run_id, "resumed" if resume_id else "new")


def run_logged_sweep(cfg: JobConfig, inputs: SweepInputs, name: str, parent_run_id: str, tracking_uri: str,
                     experiment_id: str, tags: Mapping[str, str], trainable: Trainable = train_trial,
                     system_metrics: bool = True) -> SweepOutcome:
    """run_sweep with one MLflow child run per trial, then the sweep's figures on the parent.

    Every run gets every hyperparameter as a param (tune.registry.run_params): the parent the fixed ones and
    the search space, each trial the fixed ones and its sampled point."""
    log_new_params(parent_run_id, config_params(cfg, searched=cfg.tune.space))
    callback = MlflowTrialRuns(tracking_uri, experiment_id, parent_run_id, tags,
                               system_metrics=system_metrics, params=config_params(cfg))
    outcome = run_sweep(cfg, inputs, name, callbacks=[callback], trainable=trainable)
    log_sweep_summary(outcome, list(cfg.tune.space))
    return outcome


def _importances(study: optuna.Study, multi: bool) -> dict[str, dict[str, float]]:
    """fANOVA importances per objective; empty when there are too few finished trials."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    targets: dict[str, Any] = ({"search": lambda t: t.values[0], "rec": lambda t: t.values[1]} if multi
                               else {"unified": None})
    out = {}
    for label, target in targets.items():
        try:
            out[label] = optuna.importance.get_param_importances(study, target=target)
        except (RuntimeError, ValueError) as err:  # e.g. all values equal: nothing to attribute
            log.warning("parameter importances for %s unavailable: %s", label, err)
    return out


def log_sweep_summary(outcome: SweepOutcome, params: list[str], best_trial_id: str | None = None) -> None:
    """Trial table, search-vs-rec scatter with Pareto front, parallel coordinates, importances."""
    rows = trial_rows(outcome.results)
    mlflow.log_table({k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r})},
                     "sweep/trials.json")
    finished = [r for r in rows if r["state"] == "TERMINATED" and SEARCH_NDCG in r and REC_NDCG in r]
    points = [plots.TrialPoint(str(r["trial_id"]), float(r[SEARCH_NDCG]), float(r[REC_NDCG]))
              for r in finished]
    if best_trial_id is None and finished:
        best_trial_id = str(max(finished, key=lambda r: r.get(UNIFIED, -math.inf))["trial_id"])
    figures = {"sweep/search_vs_rec.png": plots.plot_search_vs_rec(points, best=best_trial_id),
               "sweep/parallel_coordinates.png": plots.plot_parallel_coordinates(finished, params, UNIFIED)}
    multi = len(outcome.study.directions) > 1
    for label, importances in _importances(outcome.study, multi).items():
        figures[f"sweep/param_importances_{label}.png"] = plots.plot_param_importances(
            importances, f"Optuna parameter importances ({label} objective)")
        mlflow.log_dict(importances, f"sweep/param_importances_{label}.json")
    for path, fig in figures.items():
        if fig is not None:
            mlflow.log_figure(fig, path)
            plots.close(fig)
    front = plots.pareto_front(points)
    mlflow.log_dict({"sweep": outcome.name, "experiment_path": outcome.experiment_path,
                     "restored": outcome.restored, "best_trial_id": best_trial_id,
                     "pareto_front": [p.name for p in front],
                     "trials": {"total": len(rows), "failed": outcome.results.num_errors}},
                    "sweep/summary.json")
    mlflow.log_metrics({"sweep/trials": len(rows), "sweep/failed_trials": outcome.results.num_errors})
