"""Raw query/click logs -> task-tagged prompt shards on Ray Data.

Run: .venv/bin/python pipelines/preprocess.py --config tiny [--set data.num_buckets=8 ...]
     .venv/bin/python pipelines/preprocess.py --config demo --smoke-test
Prints the manifest summary (counts per split/task, quarantine by reason, event-day range,
fingerprint). Exit codes as in every job (pipelines/preflight.py): 0 done, 2 config, 5 input data
(checked before Ray starts where it can be; also no examples at all, e.g. every row quarantined,
with the quarantine summary printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from gems.config import ConfigError, load_config  # noqa: E402
from gems.data.events import InputError  # noqa: E402
from gems.data.plan import NoExamplesError, check_inputs  # noqa: E402
from pipelines.preflight import EXIT_INPUT, exit_code  # noqa: E402
from tune.ingest.preprocess import run_preprocess  # noqa: E402

SMOKE = ["data.synthetic_users=30", "data.synthetic_items=40", "data.synthetic_days=1",
         "data.num_buckets=2", "data.output_dir=smoke/shards", "data.path=smoke/raw"]


def summary_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the command prints: the manifest's headline numbers, event days as a range (a
    MovieLens run printed ~2,000 lines of days), skipped files only when there are some."""
    summary = {k: manifest[k] for k in ("examples", "counts", "accounting", "quarantine", "repairs",
                                         "fingerprint")}
    mark = manifest["watermark"]
    days, parts = mark.get("event_days") or [], mark.get("partitions") or []
    summary["watermark"] = {
        "event_days": f"{days[0]} .. {days[-1]} ({len(days)} days)" if days else "none",
        "partitions": f"{parts[0]} .. {parts[-1]} ({len(parts)})" if parts else "none",
        "max_ts": mark.get("max_ts"), "ts_outside_partition": mark.get("ts_outside_partition", 0)}
    if manifest.get("skipped_files"):
        summary["skipped_files"] = [f"{s['path']}: {s['why']}" for s in manifest["skipped_files"]]
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="demo", help="YAML config (name in pipelines/configs or path)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set data.history_len=20")
    ap.add_argument("--smoke-test", action="store_true", help="tiny synthetic data, seconds")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        overrides = list(args.set) + (SMOKE + ["data.source=synthetic"] if args.smoke_test else [])
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        return exit_code(err)
    try:
        check_inputs(cfg)  # seconds, not the 20-35 s of starting Ray first
    except InputError as err:
        return exit_code(err)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False)
    try:
        manifest = run_preprocess(cfg)
    except NoExamplesError as err:
        print(f"preprocessing produced no examples (nothing published):\n{err}", file=sys.stderr)
        return EXIT_INPUT
    except InputError as err:
        return exit_code(err)
    print(json.dumps(summary_of(manifest), indent=2))
    print(f"shards: {cfg.resolve(cfg.data.output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
