"""The night's journal in MLflow: its run, what it registered, and how versions describe it.

One run per night (tag ``gems.nightly_key`` = holdout day) records each finished phase as a tag;
tonight's registered version carries the watermark, the hyperparameters it was trained with (read
back as the next night's warm-start parameters), its holdout metrics and the decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run

from tune.config import JobConfig
from tune.nightly.decision import Decision
from tune.nightly.plan import NightPlan
from tune.nightly.warm_start import PARAM_TAG_PREFIX, params_from_run
from tune.registry.models import VersionInfo, find_versions, log_ranker, metric_tags, register_version
from tune.registry.tracking import TAG_PREFIX, run_tags

KEY_TAG = f"{TAG_PREFIX}nightly_key"
T = f"{TAG_PREFIX}nightly."  # the night's journal tags
CHAMPION_AT_START, ATTEMPTS, TRAINED_IN = f"{T}champion_version", f"{T}attempts", f"{T}trained_in_attempt"
CHECKPOINT, MODEL_URI, VERSION, DECISION = f"{T}checkpoint", f"{T}model_uri", f"{T}version", f"{T}decision"
EVALUATED, RUN_ID = f"{T}evaluated", f"{T}run_id"
UNIFIED = "test/unified"


def find_night_run(experiment_id: str, key: str) -> Run | None:
    """The latest run of night ``key`` (finished, failed or still marked running), if any."""
    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def version_tags(cfg: JobConfig, manifest: Mapping[str, Any], plan: NightPlan, run_id: str,
                 parent: VersionInfo, params: Mapping[str, float | int],
                 metrics: Mapping[str, float]) -> dict[str, str]:
    """Provenance, watermark (the holdout day), training params and holdout metrics of tonight's model."""
    challenger = {k[len("challenger/"):]: v for k, v in metrics.items() if k.startswith("challenger/test/")}
    tags = {**run_tags(cfg, manifest), KEY_TAG: plan.key, RUN_ID: run_id,
            f"{TAG_PREFIX}parent_version": parent.version,
            f"{TAG_PREFIX}eval_protocol": f"time cut: trained on <= {plan.training_days[-1]}, "
                                          f"tested on {plan.holdout_day}",
            **{f"{PARAM_TAG_PREFIX}{k}": str(v) for k, v in params.items()},
            **metric_tags({k[len("test/"):]: v for k, v in challenger.items()})}
    return tags


def register_once(cfg: JobConfig, run: Run, checkpoint: Path, shard_dir: Path, tcfg: JobConfig,
                  tags: Mapping[str, str], description: str, bm25_weight: float | None = None) -> VersionInfo:
    """Tonight's version, registered once (found again by run id after a crash); ``bm25_weight``:
    the search fusion weight it was evaluated with, which it serves with."""
    name = cfg.mlflow.registered_model
    client = MlflowClient()
    known = find_versions(name, RUN_ID, run.info.run_id)
    if known:
        return known[-1]
    model_uri = run.data.tags.get(MODEL_URI)
    if model_uri is None:
        model_uri = log_ranker(checkpoint, shard_dir / "items.parquet", tcfg,
                               bm25_weight=bm25_weight).model_uri
        client.set_tag(run.info.run_id, MODEL_URI, model_uri)
    return register_version(model_uri, name, tags, description, alias=None)


def describe_night(parent: VersionInfo, plan: NightPlan, metrics: Mapping[str, float],
                   decision: Decision | None) -> str:
    """The version's description: what it was trained on, how it compared, what was decided."""
    head = (f"Nightly {plan.key}: v{parent.version} fine-tuned on {list(plan.training_days)}, evaluated with "
            f"the champion on holdout day {plan.holdout_day}: unified "
            f"{metrics.get('challenger/' + UNIFIED, math.nan):.4f} vs champion "
            f"{metrics.get('champion/' + UNIFIED, math.nan):.4f}.")
    if decision is None:
        return head + " Decision pending."
    return f"{head} {decision.verdict.capitalize()}: " + "; ".join(decision.reasons) + "."


def params_from_run_data(run: Run) -> dict[str, float | int]:
    """Params logged by an earlier attempt of the same night (``param.<field>``)."""
    logged = run.data.params
    return params_from_run({k[len("param."):]: v for k, v in logged.items() if k.startswith("param.")})
