"""The same preprocessing in one process with plain polars: the reference the Ray Data pipeline is
tested against (identical shards and fingerprint for the same ``num_buckets``) and the baseline of
tests/benchmarks/bench_preprocess.py. Fine for data that fits in one machine's memory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import polars as pl

from gems.config import Config
from gems.data.plan import (
    check_output_dir,
    finalize,
    prepare,
    process_bucket,
    user_subset,
    validate_file,
)
from gems.data.schema import QUARANTINE_BUCKET
from gems.data.shards import staging_dir_for


def preprocess_inprocess(cfg: Config, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Raw logs -> shards + manifest under ``out_dir`` (default: cfg.data.output_dir); returns the
    manifest."""
    out = Path(out_dir) if out_dir is not None else cfg.resolve(cfg.data.output_dir)
    check_output_dir(out)
    work = staging_dir_for(out)
    try:
        prepared = prepare(cfg, work)
        item_ids = prepared.items["item_id"]
        staged = pl.concat([validate_file(s, item_ids, prepared.validation)
                            for s in prepared.event_files])
        quarantined = staged.filter(pl.col("bucket") == QUARANTINE_BUCKET)
        valid = staged.filter(pl.col("bucket") != QUARANTINE_BUCKET)
        users = user_subset(valid["user_id"], cfg.data.max_users, cfg.data.seed)
        stats = [process_bucket(part, prepared.entries, prepared.sequence, work, int(bucket), users)
                 for (bucket,), part in sorted(valid.partition_by("bucket", as_dict=True).items())]
        return finalize(cfg, prepared, quarantined, stats, work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
