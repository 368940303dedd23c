"""The main job: preprocess -> null-space bases -> Tune + Optuna sweep -> test evaluation -> champion.

Run: .venv/bin/python pipelines/full.py                      (the embedded default: demo.yaml)
     .venv/bin/python pipelines/full.py --config C [--set k=v ...]
     .venv/bin/python pipelines/full.py --smoke-test          (tiny model, 2 trials, about a minute)
     ray job submit --working-dir . -- python pipelines/full.py --set state_dir=/abs/path
Tracking: MLFLOW_TRACKING_URI (or mlflow.tracking_uri), else SQLite under the state dir. An
unreachable tracking server fails here in seconds, before any work. Re-running an interrupted job
resumes its sweep (finished trials kept); re-running a finished one reports what it registered.
The registry changes only at the very end, so a crash leaves it as it was.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlflow  # noqa: E402

from pipelines.cli import Job, job_parser, load_job_config, setup_logging, start_ray  # noqa: E402
from pipelines.preflight import EXIT_INTERRUPTED, PREFLIGHT_ERRORS, exit_code  # noqa: E402
from tune.config import JobConfig  # noqa: E402
from tune.registry.tracking import (  # noqa: E402
    log_dataset_inputs,
    log_run_context,
    run_tags,
    setup_tracking,
    ui_command,
)

# Ray, torch and the training stack are imported only after the tracking store answered: a
# misconfigured job then fails in seconds instead of after loading everything.

log = logging.getLogger("gems.full")

JOB = Job("full", "demo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return job_parser(__doc__, JOB, set_example="tune.num_samples=8",
                      smoke_help="tiny model, tiny data, 2 trials", epilog=True).parse_args(argv)


def load(args: argparse.Namespace) -> JobConfig:
    cfg = load_job_config(args, JOB)
    # Pin the state dir before anything runs elsewhere: trials and jobs must agree on one path.
    cfg.state_dir = str(cfg.state_path)
    if "runtime_resources" in cfg.state_dir:
        log.warning("state dir %s is inside Ray's unpacked working_dir and is lost with the job; "
                    "pass --set state_dir=/absolute/path", cfg.state_dir)
    return cfg


def main(argv: list[str] | None = None) -> int:
    setup_logging("%(asctime)s %(name)s %(levelname)s %(message)s")
    started = time.monotonic()
    args = parse_args(argv)
    try:
        cfg = load(args)
        tracking_uri_env = os.environ.get("MLFLOW_TRACKING_URI")
        experiment_id = setup_tracking(cfg)  # before any work: a dead server fails in seconds
    except PREFLIGHT_ERRORS as err:
        return exit_code(err)
    tracking_uri = mlflow.get_tracking_uri()
    source = ("config" if cfg.mlflow.tracking_uri else "MLFLOW_TRACKING_URI" if tracking_uri_env
              else "state dir")
    log.info("tracking at %s (from %s)", tracking_uri, source)

    from gems.data.events import InputError
    from gems.data.plan import check_inputs
    from gems.data.shards import read_split
    from tune.ingest.preprocess import run_preprocess
    from tune.sweep.bases import sweep_bases
    from tune.sweep.champion import evaluate_checkpoint, log_test_report, register_champion
    from tune.sweep.parent_run import REGISTERED_TAG, pipeline_run, run_logged_sweep
    from tune.sweep.space import apply_params
    from tune.sweep.tuner import SweepInputs, SweepInterrupted, best_trial, sweep_name

    stages: dict[str, float] = {}  # seconds per stage, logged on the parent run

    def lap(stage: str) -> None:
        stages[f"pipeline/{stage}_s"] = time.monotonic() - started - sum(stages.values())

    try:
        check_inputs(cfg)  # a missing or unusable input fails in seconds, before Ray starts
    except InputError as err:
        return exit_code(err)
    start_ray(dashboard=None)  # joins the cluster under `ray job submit`, else starts one
    lap("startup")

    try:
        manifest = run_preprocess(cfg)
    except InputError as err:  # incl. NoExamplesError: nothing published, the summary says why
        return exit_code(err)
    lap("preprocess")
    shard_dir = cfg.resolve(cfg.data.output_dir)
    name = sweep_name(cfg, manifest.get("fingerprint"))
    tags = run_tags(cfg, manifest)
    try:
        with pipeline_run(experiment_id, name, f"{cfg.name}-full", tags) as run:
            if run.state == "finished":
                print(f"sweep {name} already finished in MLflow run {run.run_id}; registered: "
                      f"{run.registered_uri}. Use --set tune.resume=false for a new sweep.")
                return 0
            if run.state == "new":
                log_run_context(cfg, manifest, shard_dir)
                splits = {s: read_split(shard_dir, s) for s in ("train", "val", "test")}
                log_dataset_inputs(splits, shard_dir, manifest.get("fingerprint"))
            bases = sweep_bases(cfg)
            lap("nullspace_bases")
            inputs = SweepInputs(config=cfg.model_dump(), shard_dir=str(shard_dir),
                                 bases_path=str(bases) if bases else None)
            outcome = run_logged_sweep(cfg, inputs, name, run.run_id, tracking_uri, experiment_id, tags)
            lap("sweep")
            best = best_trial(outcome.results)
            mlflow.log_params({f"best.{k}": v for k, v in best.params.items()}
                              | {"best.trial_id": best.trial_id})
            best_cfg = apply_params(cfg, best.params)
            report = evaluate_checkpoint(best_cfg, Path(best.checkpoint_path), shard_dir)
            lap("test_evaluation")
            log_test_report(report)
            version = register_champion(best_cfg, best, report, shard_dir, manifest, name, run.run_id)
            lap("registration")
            mlflow.set_tag(REGISTERED_TAG, f"models:/{version.name}/{version.version}")
            mlflow.log_metrics({**stages, "pipeline/wall_time_s": time.monotonic() - started})
    except SweepInterrupted as err:
        print(str(err), file=sys.stderr)
        return EXIT_INTERRUPTED
    print("\n".join([
        f"best trial {best.trial_id}: val unified {best.metrics['unified']:.4f}, "
        f"test unified {report.unified:.4f}",
        f"registered: models:/{version.name}/{version.version}  (alias: models:/{version.name}@champion)",
        f"MLflow run: {run.run_id}",
        f"browse: {ui_command(tracking_uri)}",
        f"wall time: {time.monotonic() - started:.0f} s ("
        + ", ".join(f"{k[len('pipeline/'):-2]} {v:.0f}" for k, v in stages.items()) + ")"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
