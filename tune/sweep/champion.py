"""After the sweep: the best trial's checkpoint on the test split, its retention, its registration.

Evaluation loads the checkpoint exactly as the served model does (serving.ranker.load_ranker_parts),
so the metrics on the version and the rankings it serves come from the same weights and code.
Registration is the last step of the pipeline: a crash anywhere before leaves the registry as it was.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import polars as pl

from gems.data.shards import read_items, read_split
from gems.evaluate import evaluate_with_config
from gems.evaluate_fused import evaluate_with_bm25_fusion
from gems.metrics import flatten_metrics
from gems.model import load_backbone
from gems.retention import retention_with_config
from serving.ranker import load_ranker_parts
from tune.config import JobConfig
from tune.registry.models import (
    VersionInfo,
    log_ranker,
    metric_tags,
    promote,
    register_version,
    servable_model_dir,
)
from tune.registry.tracking import TAG_PREFIX, run_tags
from tune.sweep.tuner import BestTrial

log = logging.getLogger(__name__)

PARAM_TAG_PREFIX = f"{TAG_PREFIX}param."  # version tag gems.param.<field> = value (nightly reads it)
TOP_K_ARTIFACT = "evaluation/test_top_k.parquet"


@dataclass
class TestReport:
    metrics: dict[str, float]  # test/<task>/<protocol>/<metric>, test/unified, retention/*
    top_k: pl.DataFrame | None
    retention_skipped: list[str] = field(default_factory=list)
    bm25_weight: float | None = None  # the served search fusion's weight (eval.bm25_fusion), chosen on val

    @property
    def unified(self) -> float:
        return self.metrics["test/unified"]


def evaluate_checkpoint(cfg: JobConfig, checkpoint: Path, shard_dir: Path) -> TestReport:
    """Test-split metrics (both protocols, per task) of the ranking the model serves, and retention
    vs the base backbone. With ``eval.bm25_fusion`` the served search ranking is fused with BM25 at
    the weight chosen on val; ``test/model/*`` then holds the model alone on the same rows."""
    model, tokenizer, catalog, token_ids = load_ranker_parts(servable_model_dir(checkpoint),
                                                             shard_dir / "items.parquet")
    test = read_split(shard_dir, "test")
    weight: float | None = None
    if cfg.eval.bm25_fusion:
        both = evaluate_with_bm25_fusion(model, tokenizer, test, read_split(shard_dir, "val"),
                                         read_items(shard_dir), catalog.item_ids, token_ids, cfg,
                                         top_k=cfg.mlflow.top_k)
        result, weight = both.fused, both.weight
        metrics = {"test/bm25_weight": weight, "test/model/unified": both.plain.unified,
                   **flatten_metrics(both.plain.metrics, prefix="test/model/")}
    else:
        result = evaluate_with_config(model, tokenizer, test, catalog.item_ids, token_ids, cfg,
                                      top_k=cfg.mlflow.top_k, progress=False)
        metrics = {}
    metrics.update({"test/unified": result.unified, **flatten_metrics(result.metrics, prefix="test/")})
    skipped: list[str] = []
    if cfg.eval.retention:
        base, _ = load_backbone(cfg.model, cfg.resolve(cfg.model.cache_dir))
        retention = retention_with_config(base, model, tokenizer, cfg)
        metrics.update(retention.metrics())
        skipped = list(retention.skipped)
    return TestReport(metrics=metrics, top_k=result.top_k, retention_skipped=skipped, bm25_weight=weight)


def log_test_report(report: TestReport) -> None:
    """Metrics on the active (parent) run, plus every test example's ranked top-k as Parquet."""
    mlflow.log_metrics(report.metrics)
    if report.retention_skipped:
        mlflow.log_dict({"skipped": report.retention_skipped}, "evaluation/retention_skipped.json")
    if report.top_k is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(TOP_K_ARTIFACT).name
            report.top_k.write_parquet(path)
            mlflow.log_artifact(str(path), str(Path(TOP_K_ARTIFACT).parent))


def version_tags(cfg: JobConfig, best: BestTrial, report: TestReport, manifest: Mapping[str, Any] | None,
                 sweep: str, run_id: str) -> dict[str, str]:
    """What a registered version carries: provenance, data watermark, test metrics, chosen params."""
    tags = {**run_tags(cfg, manifest), f"{TAG_PREFIX}sweep": sweep, f"{TAG_PREFIX}trial_id": best.trial_id,
            f"{TAG_PREFIX}run_id": run_id}
    tags.update(metric_tags({k.removeprefix("test/"): v for k, v in report.metrics.items()
                             if k.startswith("test/")}))
    tags.update({k: f"{v:.6g}" for k, v in report.metrics.items() if k.startswith("retention/")})
    tags.update({f"{PARAM_TAG_PREFIX}{k}": str(v) for k, v in sorted(best.params.items())})
    tags[f"{TAG_PREFIX}val_unified"] = f"{best.metrics.get('unified', float('nan')):.6g}"
    return tags


def describe(best: BestTrial, report: TestReport, sweep: str, run_id: str,
             manifest: Mapping[str, Any] | None) -> str:
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in sorted(best.params.items()))
    m, nan = report.metrics, float("nan")
    lines = [f"Best trial {best.trial_id} of sweep {sweep} (MLflow run {run_id}).",
             f"Params: {params or 'defaults'}.",
             f"Val unified NDCG@10 {best.metrics.get('unified', nan):.4f}; "
             f"test unified {m['test/unified']:.4f} (search {m.get('test/search/full/ndcg_at_10', nan):.4f}, "
             f"rec {m.get('test/rec/full/ndcg_at_10', nan):.4f}), full-catalog protocol."]
    if "test/bm25_weight" in m:
        alone = m.get("test/model/search/full/ndcg_at_10", nan)
        lines.append(f"Search is served fused with BM25 of the query at w {m['test/bm25_weight']:.2f} "
                     f"(chosen on val); the model alone: search {alone:.4f}.")
    if "retention/ppl_ratio" in m:
        lines.append(f"Retention: perplexity ratio {m['retention/ppl_ratio']:.4f}, "
                     f"KL {m.get('retention/kl', 0):.4g}.")
    if manifest:
        lines.append(f"Data fingerprint {manifest.get('fingerprint')}, "
                     f"watermark {json.dumps(manifest.get('watermark'), sort_keys=True)}.")
    return "\n".join(lines)


def register_champion(cfg: JobConfig, best: BestTrial, report: TestReport, shard_dir: Path,
                      manifest: Mapping[str, Any] | None, sweep: str, run_id: str) -> VersionInfo:
    """Log the checkpoint as the ranking pyfunc (active run), register it, make it the champion."""
    info = log_ranker(Path(best.checkpoint_path), shard_dir / "items.parquet", cfg,
                      bm25_weight=report.bm25_weight)
    version = register_version(info.model_uri, cfg.mlflow.registered_model,
                               version_tags(cfg, best, report, manifest, sweep, run_id),
                               describe(best, report, sweep, run_id, manifest))
    previous = promote(cfg.mlflow.registered_model, version.version)
    if previous is not None and previous.version != version.version:
        log.info("champion moved from version %s to %s", previous.version, version.version)
    return version
