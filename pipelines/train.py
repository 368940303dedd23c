"""Fine-tune the backbone on the prompt shards with Ray Train (GEMS or a baseline).

Run: .venv/bin/python pipelines/train.py --config demo [--set train.max_steps=10 ...]
     .venv/bin/python pipelines/train.py --config demo --smoke-test
     .venv/bin/python pipelines/train.py --config demo --resume <checkpoint dir>
Preprocesses first when the shards are missing, builds the null-space bases once (GEMS, k > 0),
trains, and prints where the final checkpoint is and the final metrics. It logs nothing to MLflow
(Ray Train's storage holds the run), so it needs no tracking store; the config, a --resume
checkpoint and, when it must preprocess, the inputs are checked before Ray starts (exit codes:
pipelines/preflight.py).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from gems.checkpoint import CheckpointError, read_trainer_state  # noqa: E402
from gems.config import Config  # noqa: E402
from gems.data.events import InputError  # noqa: E402
from gems.data.plan import check_inputs  # noqa: E402
from pipelines.cli import Job, job_parser, load_job_config, setup_logging, start_ray  # noqa: E402
from pipelines.preflight import EXIT_CONFIG, PREFLIGHT_ERRORS, exit_code  # noqa: E402
from tune.train.bases import prepare_bases  # noqa: E402
from tune.train.trainer import TrainOutcome, run_training  # noqa: E402

JOB = Job("train", "demo", own_smoke_config=False)

SUMMARY_KEYS = ("step", "train/loss", "train/loss_search", "train/loss_rec", "train/gate_search",
                "train/gate_rec", "train/conflict_before_mean_rho", "train/tokens_per_s", "val/unified",
                "val/search/full/ndcg_at_10", "val/rec/full/ndcg_at_10", "val/search/full/hit_at_10",
                "val/rec/full/hit_at_10")


def shards_ready(cfg: Config) -> Path:
    """The shard dir, preprocessing the configured source first if it has no manifest yet."""
    shard_dir = cfg.resolve(cfg.data.output_dir)
    if not (shard_dir / "manifest.json").is_file():
        from tune.ingest.preprocess import run_preprocess

        logging.info("no shards in %s: preprocessing %s first", shard_dir, cfg.data.source)
        run_preprocess(cfg)
    return shard_dir


def bases_in_task(cfg: Config) -> Path | None:
    """Null-space bases built (or found in the cache) by a one-shot Ray task, so the driver never
    holds a backbone copy while the workers train (on a cluster it is the head node)."""
    if cfg.gems.method != "gems" or (cfg.gems.k == 0 and cfg.gems.energy is None):
        return None
    task = ray.remote(max_calls=1, num_cpus=cfg.train.cpus_per_worker,
                      num_gpus=1 if cfg.train.use_gpu else 0)(prepare_bases)
    return ray.get(task.remote(cfg))


def summary(outcome: TrainOutcome) -> dict[str, object]:
    return {"checkpoint": str(outcome.checkpoint_path), "run_path": outcome.run_path,
            "precision": outcome.precision.get("precision"),
            "metrics": {k: outcome.metrics[k] for k in SUMMARY_KEYS if k in outcome.metrics}}


def main(argv: list[str] | None = None) -> int:
    ap = job_parser(__doc__, JOB, set_example="train.max_steps=10",
                    smoke_help="tiny model and data, a few steps", num_cpus=True)
    ap.add_argument("--resume", type=Path, default=None, metavar="CKPT",
                    help="continue from a checkpoint dir (same config and data): exact continuation")
    ap.add_argument("--run-name", default=None, help="Ray Train run name (default: fresh, unique); "
                    "re-using the name of an interrupted run resumes it from its latest checkpoint")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        cfg = load_job_config(args, JOB)
        if args.resume is not None:
            read_trainer_state(args.resume)  # fail before starting Ray, not inside workers
        if not (cfg.resolve(cfg.data.output_dir) / "manifest.json").is_file():
            check_inputs(cfg)  # shards_ready will preprocess: its inputs fail here, in seconds
    except PREFLIGHT_ERRORS as err:
        return exit_code(err)
    except CheckpointError as err:
        print(f"cannot resume: {err}", file=sys.stderr)
        return EXIT_CONFIG
    start_ray(args.num_cpus)
    try:
        shard_dir = shards_ready(cfg)
    except InputError as err:  # incl. no examples: found while preprocessing, reported the same way
        return exit_code(err)
    outcome = run_training(cfg, shard_dir, bases_in_task(cfg), run_name=args.run_name,
                           resume_from=args.resume)
    print(json.dumps(summary(outcome), indent=2))
    print(f"checkpoint: {outcome.checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
