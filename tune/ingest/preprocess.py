"""Preprocessing on Ray Data: raw logs -> task-tagged prompt shards + manifest (DESIGN.md section 3).

Two Ray Data stages, each a ``map_batches`` over a short list of work units (Arrow batches in and
out), with the per-unit logic in pure polars in gems.data:

1. one task per input file: read -> type -> validate -> join items -> user hash bucket; the rows are
   written with ``write_parquet(partition_cols=["bucket"])``, so every user's rows land in one
   bucket directory (bucket -1 = quarantined). This is the shuffle: a hash partition on disk, not a
   per-key groupby over millions of tiny groups.
2. one task per bucket: dedupe -> time-ordered unified histories -> examples -> split, written as
   ``{split}/part-{bucket}.parquet``. Memory per task is one bucket, whatever the input size
   (raise data.num_buckets as data grows).

The driver only lists files, validates the item table (small), gathers per-bucket counts and
writes the manifest. Everything is built in a fresh sibling directory that replaces the output
directory at the end, so a re-run leaves exactly one copy and a failed run leaves the old one.
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import ray

from gems.config import Config
from gems.data.events import FileSpec, InputError
from gems.data.plan import (
    check_output_dir,
    finalize,
    prepare,
    process_bucket,
    user_subset,
    validate_file,
)
from gems.data.schema import QUARANTINE_BUCKET, STAGED_SCHEMA, conform, empty_frame
from gems.data.sequences import SequenceParams
from gems.data.shards import staging_dir_for
from gems.data.validate import ValidationParams

log = logging.getLogger("gems.data")
STAGING = "_staging"
MAX_RETRIES = 2
"""Retries of a preprocessing task whose worker died (Ray Data's default, -1, retries forever: an
input that crashed a worker hung the job). Input problems are quarantined before any parser sees
them, so a repeated crash is a bug to surface, not to retry."""
RETRIES: dict[str, Any] = {"max_retries": MAX_RETRIES}


FILE_ERRORS = "_file_errors"
"""Where a validation task leaves the InputError of a file it cannot read (a Parquet file whose
data pages are damaged although its footer read fine): the driver raises it by name after the
stage. An exception raised inside a Ray Data task reaches the driver wrapped, its message buried
in a worker traceback; a file on the shared work directory does not."""


def _arrow(df: pl.DataFrame) -> pa.Table:
    return df.to_arrow(compat_level=pl.CompatLevel.oldest())


def _get(value: Any) -> Any:
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _validate_files(batch: pa.Table, item_ids: Any, params: ValidationParams, errors_dir: str
                    ) -> pa.Table:
    ids = pl.Series("item_id", _get(item_ids))
    frames = []
    for row in batch.to_pylist():
        spec = FileSpec(**row)
        try:
            frames.append(validate_file(spec, ids, params))
        except InputError as err:  # named by the driver after the stage (FILE_ERRORS)
            path = Path(errors_dir) / f"{zlib.crc32(spec.rel.encode()):08x}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(err))
    return _arrow(pl.concat(frames) if frames else empty_frame(STAGED_SCHEMA))


def _build_buckets(batch: pa.Table, entries: Any, params: SequenceParams, out_dir: str,
                   users: Any) -> pa.Table:
    entry_table = pl.from_arrow(_get(entries))
    subset = _get(users)
    subset = None if subset is None else pl.Series("user_id", subset)
    stats = []
    for row in batch.to_pylist():
        staged = pl.read_parquet(Path(row["path"]) / "*.parquet")
        stats.append(json.dumps(process_bucket(staged, entry_table, params, out_dir, row["bucket"],
                                               subset)))
    return pa.table({"stats": pa.array(stats, pa.large_string())})


def _tasks(limit: int, units: int) -> ray.data.TaskPoolStrategy:
    """At most ``limit`` concurrent tasks, and never more than there are work units."""
    return ray.data.TaskPoolStrategy(size=max(1, min(limit, units)))


def _bucket_dirs(staging: Path) -> dict[int, Path]:
    return {int(p.name.split("=", 1)[1]): p for p in staging.glob("bucket=*") if p.is_dir()}


def run_preprocess(cfg: Config) -> dict[str, Any]:
    """Raw logs of ``cfg.data`` -> shards under ``cfg.resolve(cfg.data.output_dir)``; returns the
    manifest. Missing inputs fail before any Ray work; Ray is initialised by the caller (or, if not,
    by Ray Data with its defaults)."""
    out = cfg.resolve(cfg.data.output_dir)
    check_output_dir(out)
    work = staging_dir_for(out)
    try:
        prepared = prepare(cfg, work)
        staging = work / STAGING
        concurrency = cfg.data.concurrency
        log.info("preprocess: %d input files, %d rows, %d items, %d buckets", len(prepared.event_files),
                 prepared.rows_in, prepared.items.height, cfg.data.num_buckets)
        files = ray.data.from_items([s.to_dict() for s in prepared.event_files],
                                    override_num_blocks=len(prepared.event_files))
        (files.map_batches(_validate_files, batch_size=1, batch_format="pyarrow", num_cpus=1,
                           compute=_tasks(concurrency, len(prepared.event_files)),
                           fn_kwargs={"item_ids": ray.put(prepared.items["item_id"].to_arrow()),
                                      "params": prepared.validation,
                                      "errors_dir": str(work / FILE_ERRORS)}, **RETRIES)
         .write_parquet(str(staging), partition_cols=["bucket"], ray_remote_args=dict(RETRIES)))
        errors = sorted((work / FILE_ERRORS).glob("*.txt"))
        if errors:
            raise InputError("\n".join(p.read_text() for p in errors))

        dirs = _bucket_dirs(staging)
        quarantine_dir = dirs.pop(QUARANTINE_BUCKET, None)
        quarantined = (conform(pl.read_parquet(quarantine_dir / "*.parquet"), STAGED_SCHEMA)
                       if quarantine_dir else empty_frame(STAGED_SCHEMA))
        users = None
        if cfg.data.max_users is not None and dirs:
            seen = pl.scan_parquet([str(p / "*.parquet") for p in dirs.values()]).select("user_id")
            subset = user_subset(seen.collect()["user_id"], cfg.data.max_users, cfg.data.seed)
            users = None if subset is None else ray.put(subset.to_arrow())
        stats: list[dict[str, Any]] = []
        if dirs:
            buckets = ray.data.from_items([{"bucket": b, "path": str(p)} for b, p in sorted(dirs.items())],
                                          override_num_blocks=len(dirs))
            rows = buckets.map_batches(
                _build_buckets, batch_size=1, batch_format="pyarrow", num_cpus=1,
                compute=_tasks(concurrency, len(dirs)),
                fn_kwargs={"entries": ray.put(prepared.entries.to_arrow()), "params": prepared.sequence,
                           "out_dir": str(work), "users": users}, **RETRIES,
            ).take_all()
            stats = [json.loads(r["stats"]) for r in rows]
        shutil.rmtree(staging, ignore_errors=True)  # absent when no row reached it
        return finalize(cfg, prepared, quarantined, stats, work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
