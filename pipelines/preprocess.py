"""Raw query/click logs -> task-tagged prompt shards on Ray Data.

Run: .venv/bin/python pipelines/preprocess.py --config tiny [--set data.num_buckets=8 ...]
     .venv/bin/python pipelines/preprocess.py --config demo --smoke-test
Prints the manifest summary (counts per split/task, quarantine by reason, event-day range,
fingerprint). Exit codes as in every job (pipelines/preflight.py): 0 done, 2 config, 5 input data
(checked before Ray starts where it can be; also no examples at all, e.g. every row quarantined,
with the quarantine summary printed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gems.config import ConfigError  # noqa: E402
from gems.data.events import InputError  # noqa: E402
from gems.data.plan import NoExamplesError, check_inputs  # noqa: E402
from pipelines.cli import Job, job_parser, load_job_config, setup_logging, start_ray  # noqa: E402
from pipelines.preflight import EXIT_INPUT, exit_code  # noqa: E402
from tune.ingest.preprocess import run_preprocess  # noqa: E402

JOB = Job("preprocess", "demo", own_smoke_config=False)


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
    args = job_parser(__doc__, JOB, set_example="data.history_len=20",
                      smoke_help="tiny synthetic data, seconds", num_cpus=True).parse_args(argv)
    setup_logging()
    try:
        cfg = load_job_config(args, JOB)
    except ConfigError as err:
        return exit_code(err)
    try:
        check_inputs(cfg)  # seconds, not the 20-35 s of starting Ray first
    except InputError as err:
        return exit_code(err)
    start_ray(args.num_cpus, driver_logs=False)
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
