"""One nested MLflow run per Tune trial, written by the driver only.

Trials report to Ray (``ray.tune.report``); this Tune callback runs in the driver process and
turns the reports into child runs of the pipeline's parent run, live, so the MLflow UI shows a
sweep while it runs. Keeping MLflow out of the trial processes means an embedded SQLite store
never has two writers. Child runs are keyed by Tune trial id, so a resumed sweep continues the
runs of its unfinished trials instead of duplicating them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.tune import Callback
from ray.tune.experiment import Trial

from tune.registry.run_params import log_new_params, param_value
from tune.registry.tracking import TAG_PREFIX
from tune.sweep import plots

TRIAL_ID_TAG = f"{TAG_PREFIX}trial_id"
TUNE_BOOKKEEPING = {"timestamp", "pid", "training_iteration", "time_since_restore",
                    "iterations_since_restore", "time_this_iter_s", "done", "step"}


def numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a Tune result, minus Tune's own bookkeeping."""
    out = {}
    for key, value in result.items():
        if key in TUNE_BOOKKEEPING or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def result_step(result: Mapping[str, Any]) -> int:
    """The optimizer step a report belongs to (Tune's iteration when the trial reports none)."""
    step = result.get("step")
    return int(step) if isinstance(step, int | float) else int(result.get("training_iteration", 0))


def trial_error_text(trial: Trial, limit: int = 4000) -> str:
    """The end of the trial's error trace (the local error file is written before callbacks run)."""
    local = trial.error_file
    if local and Path(local).is_file():
        return Path(local).read_text()[-limit:]
    error = trial.get_error()
    return str(error)[-limit:] if error else "unknown error (see the trial's error.txt)"


class MlflowTrialRuns(Callback):
    """Tune callback: child run per trial with params, per-step metrics, tags, plots, status."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 tags: Mapping[str, str] | None = None, system_metrics: bool = True,
                 params: Mapping[str, str] | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.params = dict(params or {})  # the sweep's fixed hyperparameters (tune.registry.run_params)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.system_metrics = system_metrics
        self.run_ids: dict[str, str] = {}
        self._monitors: dict[str, SystemMetricsMonitor] = {}
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into its experiment state; clients and threads stay behind.
        state = self.__dict__.copy()
        state["_client"], state["_monitors"] = None, {}
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def existing_runs(self) -> dict[str, str]:
        """trial id -> child run id for the children the parent already has (after a resume)."""
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{self.parent_run_id}'")
        return {r.data.tags[TRIAL_ID_TAG]: r.info.run_id for r in runs if TRIAL_ID_TAG in r.data.tags}

    def run_for(self, trial: Trial) -> str:
        """The trial's child run, created on first sight."""
        if trial.trial_id not in self.run_ids:
            self.run_ids.update(self.existing_runs())
        if trial.trial_id not in self.run_ids:
            tags = {**self.tags, MLFLOW_PARENT_RUN_ID: self.parent_run_id, TRIAL_ID_TAG: trial.trial_id}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"trial-{trial.trial_id}")
            self.run_ids[trial.trial_id] = run.info.run_id
        return self.run_ids[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self.run_for(trial)
        sampled = {k: param_value(v) for k, v in trial.config.items() if not isinstance(v, dict)}
        log_new_params(run_id, {**self.params, **sampled}, self.client)
        self.client.log_batch(run_id, tags=[RunTag(f"{TAG_PREFIX}trial_status", "RUNNING")])
        if self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        if self.system_metrics and trial.trial_id not in self._monitors:
            monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=True,
                                           tracking_uri=self.tracking_uri)
            monitor.start()
            self._monitors[trial.trial_id] = monitor

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict,
                        **info: Any) -> None:
        run_id = self.run_for(trial)
        now, step = int(time.time() * 1000), result_step(result)
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def _finish(self, trial: Trial, status: str, tags: Mapping[str, str]) -> None:
        run_id = self.run_for(trial)
        monitor = self._monitors.pop(trial.trial_id, None)
        if monitor is not None:
            monitor.finish()
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.log_dynamics_plot(run_id, trial.trial_id)
        self.client.set_terminated(run_id, status=status)

    def log_dynamics_plot(self, run_id: str, trial_id: str) -> None:
        """Conflict coefficient and gate weights over steps, read back from the run's history."""
        keys = [k for k in self.client.get_run(run_id).data.metrics
                if ("conflict" in k or "rho" in k or "gate" in k or k.endswith("/full/ndcg_at_10"))
                and not k.startswith("system/")]
        history = {k: [(m.step, m.value) for m in self.client.get_metric_history(run_id, k)] for k in keys}
        fig = plots.plot_training_dynamics(history, title=f"trial {trial_id}")
        if fig is not None:
            self.client.log_figure(run_id, fig, "plots/training_dynamics.png")
            plots.close(fig)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        last = trial.last_result or {}
        ended = bool(last.get("done"))  # False: stopped by an interrupt, resumed by a re-run
        self._finish(trial, RunStatus.to_string(RunStatus.FINISHED if ended else RunStatus.KILLED),
                     {f"{TAG_PREFIX}trial_status": "TERMINATED" if ended else "INTERRUPTED",
                      f"{TAG_PREFIX}last_step": str(result_step(last)) if last else "none"})

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        message = trial_error_text(trial)
        self._finish(trial, RunStatus.to_string(RunStatus.FAILED),
                     {f"{TAG_PREFIX}trial_status": "ERROR", f"{TAG_PREFIX}error": message})

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial_id in list(self._monitors):
            self._monitors.pop(trial_id).finish()
