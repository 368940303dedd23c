"""Nightly retraining on new log partitions: warm start from the champion, compare, maybe promote.

Run: .venv/bin/python pipelines/nightly.py --config demo            (after pipelines/full.py)
     .venv/bin/python pipelines/nightly.py --smoke-test              (self-contained: tiny model, 2 days)
     infra/nightly_submit.sh                                         (what cron / systemd run)
Prints what happened (no new data / already decided / promoted / rejected) and the metrics of
both models. Safe to run twice and after a crash (see tune/nightly.py). The tracking store, the
config and the log partitions are checked before Ray starts (exit codes: pipelines/preflight.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gems.config import load_config  # noqa: E402
from pipelines.preflight import EXIT_CONFIG, PREFLIGHT_ERRORS, exit_code, job_config  # noqa: E402
from tune.tracking import setup_tracking  # noqa: E402
from tune.watermark import NightlyError  # noqa: E402

# Tiny everything (the tiny config plus these), in its own state dir: two simulated days, a champion
# trained on day 1, tonight = day 2.
SMOKE = ["state_dir=.state/smoke-nightly", "data.source=events", "data.path=live/events",
         "data.items_path=live/items.parquet", "data.output_dir=shards", "data.synthetic_users=30",
         "data.synthetic_items=40", "data.num_buckets=2", "train.max_steps=3", "train.checkpoint_every=3",
         "train.report_every=3", "eval.max_examples=8", "eval.mmlu_questions=4",
         "eval.retention_max_tokens=128", "gems.general_max_tokens=256",
         "mlflow.experiment=gems-sr-smoke", "mlflow.registered_model=gems-sr-smoke"]
SMOKE_DAYS = 2


def _smoke_setup(config: str, overrides: list[str]) -> None:
    """Land simulated day 1 (and a champion trained on it) once, then day 2 for tonight."""
    from tune.night_smoke import bootstrap_champion, land_day, simulate_source
    from tune.registry import get_champion

    cfg = load_config(config, overrides)
    source, params = simulate_source(cfg, SMOKE_DAYS)
    live = cfg.resolve(cfg.data.path or "").parent
    setup_tracking(cfg)
    if get_champion(cfg.mlflow.registered_model) is None:
        land_day(source, live, params, 0)
        champion = bootstrap_champion(load_config(config, [*overrides, "data.output_dir=day1-shards"]))
        print(f"smoke test: champion {champion.uri} trained on day 1")
    land_day(source, live, params, SMOKE_DAYS - 1)


def _champion_version(name: str) -> str | None:
    """The champion now (an outcome that did not look, e.g. a night in progress elsewhere)."""
    from tune.registry import get_champion

    champion = get_champion(name)
    return champion.version if champion else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None,
                    help="YAML config (name in pipelines/configs or path; default demo)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set nightly.tolerance=0.01")
    ap.add_argument("--smoke-test", action="store_true",
                    help="tiny config, simulated days 1-2 under .state/smoke-nightly (overridable)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = [*SMOKE, *args.set] if args.smoke_test else list(args.set)
    try:
        config = job_config(args.config, args.smoke_test, "demo")
        cfg = load_config(config, overrides)
        setup_tracking(cfg)  # a dead tracking server fails here, in seconds, before Ray starts
    except PREFLIGHT_ERRORS as err:
        return exit_code(err)
    from tune.nightly import check_night_inputs, run_nightly

    try:
        check_night_inputs(cfg, simulated=args.smoke_test)
    except NightlyError as err:
        print(f"nightly: {err}", file=sys.stderr)
        return EXIT_CONFIG
    import ray

    if os.environ.get("RAY_ADDRESS", "").startswith("http"):
        os.environ.pop("RAY_ADDRESS")  # a job-server URL is for `ray job submit`, not for ray.init
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or None, num_cpus=None if address else args.num_cpus, include_dashboard=False,
             ignore_reinit_error=True, log_to_driver=False)
    try:
        if args.smoke_test:
            _smoke_setup(config, overrides)
        outcome = run_nightly(cfg)
    except NightlyError as err:
        print(f"nightly: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(outcome.message)
    if outcome.reasons:
        print("reasons: " + "; ".join(outcome.reasons))
    keys = sorted(k for k in outcome.metrics if k.split("/")[0] in ("champion", "challenger", "decision",
                                                                     "holdout", "nightly")
                  and "/train/" not in k and not k.startswith("challenger/train"))
    print(json.dumps({k: round(outcome.metrics[k], 6) for k in keys}, indent=2))
    champion = outcome.champion or _champion_version(cfg.mlflow.registered_model)
    print(f"champion: models:/{cfg.mlflow.registered_model}@champion (version {champion or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
