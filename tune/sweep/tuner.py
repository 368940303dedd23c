"""The hyperparameter sweep: Optuna (TPE or NSGA-II) behind a concurrency limit, ASHA on top.

Each Tune trial is a small function (Ray Train V2 style: ``Tuner(trainer)`` is deprecated) that
applies its sampled point to the config, builds the TorchTrainer and fits it; a Train callback
relays every worker report to Tune. Trials hold no CPU themselves (the Train workers do) and the
concurrency limit leaves ``tune.data_cpus`` free, so on a 2-core machine one trial runs at a time
and Ray Data never waits on CPUs that training holds.

The sweep's name derives from the config and data (``sweep_key``); an interrupted sweep with the
same name is restored (finished trials kept, unfinished ones resume from their last Train
checkpoint) and its Optuna study lives in an RDB (SQLite under the state dir by default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import ray.tune
from ray.tune import ResultGrid
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from tune.config import JobConfig, config_from_dict
from tune.sweep.space import apply_params, to_optuna, validate_points

log = logging.getLogger(__name__)

UNIFIED = "unified"  # mean of search and rec NDCG@10 on val: ASHA's and Tune's metric
SEARCH_NDCG, REC_NDCG = "val_search_ndcg10", "val_rec_ndcg10"  # NSGA-II's two objectives
EVALS = "evals"  # val evaluations so far: ASHA's clock, so it only judges real val metrics
CHECKPOINT_PATH = "checkpoint_path"
VAL_KEYS = {UNIFIED: "val/unified", SEARCH_NDCG: "val/search/full/ndcg_at_10",
            REC_NDCG: "val/rec/full/ndcg_at_10"}
TRIAL_MEMORY_BYTES = 256 * 1024**2  # a trial only waits on its Train run: memory, no CPU
Trainable = Callable[[dict[str, Any], "SweepInputs"], None]


@dataclass(frozen=True)
class SweepInputs:
    """What every trial needs besides its sampled point (shipped once via tune.with_parameters)."""

    config: dict[str, Any]
    shard_dir: str
    bases_path: str | None = None


class SweepInterrupted(RuntimeError):
    """The sweep stopped before all trials ended (Ctrl-C, ``ray job stop``); its state is saved."""


@dataclass
class SweepOutcome:
    results: ResultGrid
    study: optuna.Study
    experiment_path: str
    name: str
    restored: bool


class RelayToTune(TuneReportCallback):
    """Forward each rank-0 Train report to Tune with the sweep's metrics always present.

    Tune requires its metrics in every result, but val metrics exist only after an evaluation:
    until then they carry the last evaluated value (0 before the first) and ``evals`` counts
    evaluations, which is ASHA's time axis, so early stopping never judges a placeholder.
    ``checkpoint_path`` carries the newest checkpoint forward the same way.
    """

    def __init__(self) -> None:
        super().__init__()
        self.latest: dict[str, Any] = {UNIFIED: 0.0, SEARCH_NDCG: 0.0, REC_NDCG: 0.0, EVALS: 0}

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        report = dict(metrics[0])
        if VAL_KEYS[UNIFIED] in report:
            for key, source in VAL_KEYS.items():
                self.latest[key] = float(report.get(source, math.nan))
            self.latest[EVALS] += 1
        if checkpoint is not None:
            self.latest[CHECKPOINT_PATH] = checkpoint.path
        self._training_actor_item_queue.put({**report, **self.latest})


def train_trial(params: dict[str, Any], inputs: SweepInputs) -> None:
    """The default trainable: sampled point -> validated JobConfig -> TorchTrainer.fit().

    An invalid point raises ConfigError here, before any training: Tune records the trial as
    errored and the sweep goes on.
    """
    from tune.sweep.bases import bases_for_trial
    from tune.train.trainer import build_trainer

    cfg = apply_params(config_from_dict(inputs.config), params)
    cfg.train.eval_every = trial_eval_every(cfg)  # ASHA needs val metrics during the trial
    trial_id = ray.tune.get_context().get_trial_id()
    bases = bases_for_trial(cfg, Path(inputs.bases_path) if inputs.bases_path else None)
    trainer = build_trainer(cfg, Path(inputs.shard_dir), bases, run_name=f"trial-{trial_id}")
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), RelayToTune()]
    trainer.fit()


def sweep_key(cfg: JobConfig, fingerprint: str | None) -> str:
    """Same config + same data -> same key -> an interrupted sweep is resumed, not restarted."""
    payload = json.dumps({"config": cfg.model_dump(mode="json", exclude={"mlflow"}), "data": fingerprint},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def study_storage_url(cfg: JobConfig) -> str:
    """cfg.tune.study_storage, else an SQLite file under the state dir (its folder created)."""
    if cfg.tune.study_storage:
        return cfg.tune.study_storage
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{cfg.state_path / 'optuna.db'}"


def experiments_root(cfg: JobConfig) -> str:
    raw = cfg.train.storage_path
    return raw if "://" in raw else str(cfg.resolve(raw))


def max_concurrent_trials(cfg: JobConfig, cluster_cpus: float | None = None) -> int:
    """cfg.tune.max_concurrent, else how many trials' Train workers fit beside the data CPUs."""
    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    cpus = cluster_cpus if cluster_cpus is not None else float(ray.cluster_resources().get("CPU", 1))
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
    return max(1, int((cpus - cfg.tune.data_cpus) // per_trial))


def trial_eval_every(cfg: JobConfig) -> int | None:
    return cfg.tune.eval_every or cfg.train.eval_every


def evals_per_trial(cfg: JobConfig) -> int:
    """Val evaluations a full trial makes (every eval_every steps, and always at the end)."""
    every, steps = trial_eval_every(cfg), cfg.train.max_steps
    if not every:
        return 1
    return steps // every + (1 if steps % every else 0)


def build_scheduler(cfg: JobConfig) -> ASHAScheduler:
    max_t = evals_per_trial(cfg)
    # stop_last_trials=False: a trial that reaches max_t ends on its own (Train finishes cleanly)
    return ASHAScheduler(time_attr=EVALS, max_t=max_t, grace_period=min(cfg.tune.asha_grace_period, max_t),
                         reduction_factor=cfg.tune.asha_reduction_factor, stop_last_trials=False)


def build_sampler(cfg: JobConfig) -> optuna.samplers.BaseSampler:
    seed = cfg.train.seed
    if cfg.tune.algorithm == "nsga2":
        population = max(2, min(50, cfg.tune.num_samples // 2))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, cfg.tune.num_samples // 2))


def build_searcher(cfg: JobConfig, study_name: str, max_concurrent: int) -> ConcurrencyLimiter:
    """OptunaSearch over cfg.tune.space with RDB storage, wrapped in the concurrency limit."""
    multi = cfg.tune.algorithm == "nsga2"
    validate_points(cfg.tune.space, cfg.tune.points_to_evaluate)
    storage = optuna.storages.RDBStorage(study_storage_url(cfg))
    searcher = OptunaSearch(
        space=to_optuna(cfg.tune.space), metric=[SEARCH_NDCG, REC_NDCG] if multi else UNIFIED,
        mode=["max", "max"] if multi else "max", sampler=build_sampler(cfg), study_name=study_name,
        storage=storage, points_to_evaluate=[dict(p) for p in cfg.tune.points_to_evaluate] or None)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def sweep_name(cfg: JobConfig, fingerprint: str | None) -> str:
    """``<config name>-sweep-<key>``; with tune.resume off, the first unused ``-<n>`` suffix."""
    base = f"{cfg.name}-sweep-{sweep_key(cfg, fingerprint)}"
    if cfg.tune.resume or "://" in experiments_root(cfg):
        return base
    root, n = Path(experiments_root(cfg)), 1
    while (root / f"{base}-{n}").exists():
        n += 1
    return f"{base}-{n}"


def run_sweep(cfg: JobConfig, inputs: SweepInputs, name: str, callbacks: Sequence[ray.tune.Callback] = (),
              trainable: Trainable = train_trial) -> SweepOutcome:
    """Run (or resume) the sweep ``name``; failed trials are recorded, not raised."""
    root = experiments_root(cfg)
    path = f"{root.rstrip('/')}/{name}"
    trainable_fn = ray.tune.with_resources(ray.tune.with_parameters(trainable, inputs=inputs),
                                           {"cpu": 0, "memory": TRIAL_MEMORY_BYTES})
    restored = cfg.tune.resume and ray.tune.Tuner.can_restore(path)
    if restored:
        # Errored trials resume too (from their last checkpoint): a crash (lost node, killed
        # job) errors the running trial, and an invalid point just fails again in seconds.
        log.info("resuming sweep %s (finished trials are kept)", path)
        tuner = ray.tune.Tuner.restore(path, trainable=trainable_fn, resume_unfinished=True,
                                       resume_errored=True, restart_errored=False)
    else:
        limit = max_concurrent_trials(cfg)
        log.info("sweep %s: %d trials, %d at a time", name, cfg.tune.num_samples, limit)
        tuner = ray.tune.Tuner(
            trainable_fn,
            tune_config=ray.tune.TuneConfig(
                metric=UNIFIED, mode="max", num_samples=cfg.tune.num_samples,
                search_alg=build_searcher(cfg, name, limit), scheduler=build_scheduler(cfg),
                trial_name_creator=lambda t: f"trial-{t.trial_id}",
                trial_dirname_creator=lambda t: f"trial-{t.trial_id}"),
            run_config=ray.tune.RunConfig(
                name=name, storage_path=root, callbacks=list(callbacks),
                failure_config=ray.tune.FailureConfig(max_failures=0, fail_fast=False)))
    results = tuner.fit()
    # A trial ended when it errored or its last result says done (finished or stopped by ASHA);
    # on Ctrl-C Tune returns normally and marks running/pending trials terminated without that.
    ended = results.num_errors + sum(1 for r in results if r.error is None and (r.metrics or {}).get("done"))
    if ended < cfg.tune.num_samples:
        raise SweepInterrupted(f"sweep {name} stopped after {ended} of {cfg.tune.num_samples} trials; "
                               "run the same command again to resume it (finished trials are kept)")
    study = optuna.load_study(study_name=name, storage=study_storage_url(cfg))
    return SweepOutcome(results=results, study=study, experiment_path=path, name=name, restored=restored)


@dataclass(frozen=True)
class BestTrial:
    trial_id: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint_path: str


def best_trial(results: ResultGrid) -> BestTrial:
    """The finished trial with the highest unified val metric that has a checkpoint."""
    candidates = [r for r in results if r.error is None and r.metrics and r.metrics.get(EVALS, 0) > 0
                  and r.metrics.get(CHECKPOINT_PATH) and math.isfinite(r.metrics.get(UNIFIED, math.nan))]
    if not candidates:
        errors = [str(r.error).splitlines()[0] for r in results if r.error is not None]
        raise RuntimeError(f"no trial finished with a checkpoint and val metrics ({len(errors)} failed"
                           + (f"; first error: {errors[0]}" if errors else "") + ")")
    best = max(candidates, key=lambda r: r.metrics[UNIFIED])
    return BestTrial(trial_id=str(best.metrics["trial_id"]), params=dict(best.config or {}),
                     metrics=dict(best.metrics), checkpoint_path=str(best.metrics[CHECKPOINT_PATH]))


def trial_rows(results: ResultGrid) -> list[dict[str, Any]]:
    """One flat row per trial (params + final metrics + state) for plots and the summary table."""
    rows = []
    for r in results:
        metrics: Mapping[str, Any] = r.metrics or {}
        row: dict[str, Any] = {"trial_id": metrics.get("trial_id") or Path(str(r.path)).name,
                               "state": "ERROR" if r.error is not None else "TERMINATED",
                               **{k: v for k, v in (r.config or {}).items() if isinstance(v, int | float)}}
        for key in (UNIFIED, SEARCH_NDCG, REC_NDCG, EVALS, "step"):
            if key in metrics:
                row[key] = metrics[key]
        rows.append(row)
    return rows
