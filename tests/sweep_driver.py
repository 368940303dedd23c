"""A real sweep (real Ray Tune, Optuna, MLflow) whose trials are cheap stand-ins for training.

Run as a script by tests/tune/sweep/test_sweep.py so each sweep gets its own fresh local Ray and can be
interrupted with SIGINT like a user's Ctrl-C. The stand-in trial validates its point exactly as
the real one does (``apply_params``), marks each execution in a directory, and reports the same
metric names as the real trial's relay (``tune.sweep.tuner``), including GEMS's gate/conflict series.

    python tests/sweep_driver.py <state_dir> <marker_dir> <tracking_uri> [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
import ray.tune  # noqa: E402

from tune.config import config_from_dict, load_config  # noqa: E402
from tune.registry.tracking import run_tags, setup_tracking  # noqa: E402
from tune.sweep.parent_run import pipeline_run, run_logged_sweep  # noqa: E402
from tune.sweep.space import apply_params  # noqa: E402
from tune.sweep.tuner import (  # noqa: E402
    CHECKPOINT_PATH,
    EVALS,
    REC_NDCG,
    SEARCH_NDCG,
    UNIFIED,
    SweepInputs,
    SweepInterrupted,
    best_trial,
    sweep_name,
)

REPORTS, SECONDS_PER_REPORT = 3, 1.0
EXIT_INTERRUPTED = 3


def stand_in_trial(params: dict[str, Any], inputs: SweepInputs) -> None:
    """Scores peak at tau = 1; the gate drifts toward search as steps go by."""
    cfg = apply_params(config_from_dict(inputs.config), params)  # ConfigError for a bad point
    trial_id = ray.tune.get_context().get_trial_id()
    markers = Path(inputs.shard_dir)
    (markers / f"start-{trial_id}-{time.monotonic_ns()}").touch()
    quality = 1.0 / (1.0 + abs(cfg.gems.tau - 1.0))
    checkpoint = markers / f"checkpoint-{trial_id}"
    checkpoint.mkdir(exist_ok=True)
    for i in range(1, REPORTS + 1):
        time.sleep(SECONDS_PER_REPORT)
        search, rec = 0.1 * quality * i, 0.05 * quality * i
        ray.tune.report({"step": 2 * i, "train/loss": 3.0 / i, "train/gate_search": 0.5 + 0.05 * i,
                         "train/gate_rec": 0.5 - 0.05 * i, "train/conflict_before_mean_rho": -0.2 + 0.1 * i,
                         UNIFIED: (search + rec) / 2, SEARCH_NDCG: search, REC_NDCG: rec, EVALS: i,
                         CHECKPOINT_PATH: str(checkpoint)})
    (markers / f"done-{trial_id}").touch()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir")
    parser.add_argument("marker_dir")
    parser.add_argument("tracking_uri")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = load_config("tiny", [f"state_dir={args.state_dir}", f"mlflow.tracking_uri={args.tracking_uri}",
                               *args.set])
    experiment_id = setup_tracking(cfg)
    manifest = {"fingerprint": "f" * 16, "watermark": ["2026-01-01"]}
    tags = run_tags(cfg, manifest)
    name = sweep_name(cfg, manifest["fingerprint"])
    inputs = SweepInputs(config=cfg.model_dump(), shard_dir=args.marker_dir)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pipeline_run(experiment_id, name, "sweep-test", tags, system_metrics=False) as run:
            outcome = run_logged_sweep(cfg, inputs, name, run.run_id, args.tracking_uri, experiment_id, tags,
                                       trainable=stand_in_trial, system_metrics=False)
            best = best_trial(outcome.results)
            print(json.dumps({"parent_run_id": run.run_id, "best_trial_id": best.trial_id,
                              "restored": outcome.restored, "sweep": name}))
    except SweepInterrupted as err:
        print(f"INTERRUPTED: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
