"""Nightly retraining on new log partitions: warm start from the champion, compare, maybe promote.

Run: .venv/bin/python pipelines/nightly.py --config demo            (after pipelines/full.py)
     .venv/bin/python pipelines/nightly.py --smoke-test              (self-contained: tiny model, 2 days)
     infra/nightly_submit.sh                                         (what cron / systemd run)
Prints what happened (no new data / already decided / promoted / rejected) and the metrics of
both models. Safe to run twice and after a crash (see tune/nightly/job.py). The tracking store, the
config and the log partitions are checked before Ray starts (exit codes: pipelines/preflight.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import (  # noqa: E402
    Job,
    config_name,
    job_overrides,
    job_parser,
    setup_logging,
    start_ray,
)
from pipelines.preflight import EXIT_CONFIG, PREFLIGHT_ERRORS, exit_code  # noqa: E402
from tune.config import load_config  # noqa: E402
from tune.nightly.plan import NightlyError  # noqa: E402
from tune.registry.tracking import setup_tracking  # noqa: E402

JOB = Job("nightly", "demo")
SMOKE_DAYS = 2


def _smoke_setup(config: str, overrides: list[str]) -> None:
    """Land simulated day 1 (and a champion trained on it) once, then day 2 for tonight."""
    from tune.nightly.smoke import bootstrap_champion, land_day, simulate_source
    from tune.registry.models import get_champion

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
    from tune.registry.models import get_champion

    champion = get_champion(name)
    return champion.version if champion else None


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, JOB, set_example="nightly.tolerance=0.01", num_cpus=True,
                      smoke_help="tiny config, simulated days 1-2 under .state/smoke-nightly "
                      "(overridable)").parse_args(argv)
    setup_logging()
    try:
        config, overrides = config_name(args, JOB), job_overrides(args, JOB)
        cfg = load_config(config, overrides)
        setup_tracking(cfg)  # a dead tracking server fails here, in seconds, before Ray starts
    except PREFLIGHT_ERRORS as err:
        return exit_code(err)
    from tune.nightly.job import check_night_inputs, run_nightly

    try:
        check_night_inputs(cfg, simulated=args.smoke_test)
    except NightlyError as err:
        print(f"nightly: {err}", file=sys.stderr)
        return EXIT_CONFIG
    start_ray(args.num_cpus, driver_logs=False, join_env_cluster=True)
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
