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

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from gems.checkpoint import CheckpointError, read_trainer_state  # noqa: E402
from gems.config import Config, load_config  # noqa: E402
from gems.data.events import InputError  # noqa: E402
from gems.data.plan import check_inputs  # noqa: E402
from pipelines.preflight import EXIT_CONFIG, PREFLIGHT_ERRORS, exit_code  # noqa: E402
from tune.bases import prepare_bases  # noqa: E402
from tune.trainer import TrainOutcome, run_training  # noqa: E402

# Seconds, not minutes: the tiny random Llama, a small simulated log, a few steps.
SMOKE = ["model.name_or_path=tiny-llama", "data.source=synthetic", "data.synthetic_users=30",
         "data.synthetic_items=40", "data.synthetic_days=1", "data.num_buckets=2",
         "data.output_dir=smoke/shards", "data.path=smoke/raw", "gems.r_shared=4", "gems.t_svd=2",
         "gems.k=8", "gems.general_max_tokens=512", "train.num_workers=1", "train.max_steps=4",
         "train.batch_size=4", "train.max_seq_len=96", "train.checkpoint_every=2",
         "train.report_every=1", "train.warmup_steps=1", "train.lr=1e-3",
         "train.storage_path=smoke/ray_results", "eval.max_examples=8"]

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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="demo", help="YAML config (name in pipelines/configs or path)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set train.max_steps=10")
    ap.add_argument("--resume", type=Path, default=None, metavar="CKPT",
                    help="continue from a checkpoint dir (same config and data): exact continuation")
    ap.add_argument("--run-name", default=None, help="Ray Train run name (default: fresh, unique); "
                    "re-using the name of an interrupted run resumes it from its latest checkpoint")
    ap.add_argument("--smoke-test", action="store_true", help="tiny model and data, a few steps")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = load_config(args.config, list(args.set) + (SMOKE if args.smoke_test else []))
        if args.resume is not None:
            read_trainer_state(args.resume)  # fail before starting Ray, not inside workers
        if not (cfg.resolve(cfg.data.output_dir) / "manifest.json").is_file():
            check_inputs(cfg)  # shards_ready will preprocess: its inputs fail here, in seconds
    except PREFLIGHT_ERRORS as err:
        return exit_code(err)
    except CheckpointError as err:
        print(f"cannot resume: {err}", file=sys.stderr)
        return EXIT_CONFIG
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, ignore_reinit_error=True)
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
