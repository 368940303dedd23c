"""What preprocessing does before and after the parallel part, shared by the Ray Data pipeline
(tune/ingest/preprocess.py) and the single-process reference (gems.data.inprocess):

- ``check_inputs`` / ``check_output_dir``: the cheap checks a job runs before it starts Ray (input
  paths exist and hold rows, the output can be written), so a typo costs seconds, not a cluster
  start and all the work.
- ``prepare``: resolve the input for ``data.source`` (simulate if absent, run an adapter), list the
  event files (others become ``skipped_files``), count their rows independently (for the
  accounting), read + validate the item table and render every item's history entry. Any missing
  path or unreadable file fails here, before Ray starts work.
- ``validate_file`` / ``process_bucket``: the two per-unit steps (one input file; one user bucket).
- ``finalize``: write items and quarantine, check the accounting, refuse a run without examples
  (``NoExamplesError`` with the quarantine summary), write the manifest with its fingerprint and
  publish the directory atomically.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from gems.config import Config
from gems.data.amazon import convert_amazon
from gems.data.events import (
    AdapterOutput,
    FileSpec,
    InputError,
    count_rows,
    read_raw,
    scan_input_files,
)
from gems.data.qilin import convert_qilin
from gems.data.schema import ITEM_FIELDS, ITEM_QUARANTINE_SCHEMA, SPLITS, Reason, conform
from gems.data.sequences import SequenceParams, build_bucket
from gems.data.shards import (
    ITEMS,
    file_hashes,
    fingerprint,
    publish,
    write_bucket,
    write_manifest,
    write_parquet,
    write_quarantine,
)
from gems.data.simulate import MARKER, SimulationParams, simulate
from gems.data.validate import ValidationParams, attach_raw, validate_events, validate_items
from gems.prompts import history_entry
from gems.tasks import TASKS

log = logging.getLogger("gems.data")
FORMAT_VERSION = 1
SOURCE_DIR = "_source"


class AccountingError(RuntimeError):
    """rows_in != valid + quarantined + deduplicated: a row was lost or counted twice (a bug)."""


class NoExamplesError(InputError):
    """The input gave no example at all (typically: every row quarantined). The message carries the
    accounting and the quarantine summary, so the caller can show why without opening files."""


@dataclass
class Prepared:
    """Everything the parallel stages need, as plain picklable data."""

    source: str
    event_files: list[FileSpec]
    rows_in: int
    items: pl.DataFrame
    items_quarantine: pl.DataFrame
    items_rows_in: int
    entries: pl.DataFrame
    validation: ValidationParams
    sequence: SequenceParams
    inputs: dict[str, Any]
    adapter: dict[str, Any] = field(default_factory=dict)
    skipped_files: list[dict[str, str]] = field(default_factory=list)


def _write_adapter_output(out: AdapterOutput, work_dir: Path) -> tuple[Path, Path]:
    root = work_dir / SOURCE_DIR
    write_parquet(out.events, root / "events" / "events.parquet")
    write_parquet(out.items, root / "items.parquet")
    return root / "events", root / "items.parquet"


def _resolve_sources(cfg: Config, work_dir: Path) -> tuple[Path, Path, dict[str, Any]]:
    d = cfg.data
    if d.source == "synthetic":
        root = cfg.resolve(d.path or "raw/synthetic")
        if not (root / MARKER).exists():
            log.info("simulating %d users x %d days into %s", d.synthetic_users, d.synthetic_days, root)
            simulate(root, SimulationParams(users=d.synthetic_users, items=d.synthetic_items,
                                            days=d.synthetic_days, seed=d.seed,
                                            events_per_user_day=d.synthetic_events_per_user_day))
        return root / "events", root / "items.parquet", {"simulation": str(root / MARKER)}
    if d.path is None:
        raise InputError(f"data.path is required for data.source={d.source}")
    path = cfg.resolve(d.path)
    if not path.exists():
        raise InputError(f"data.path does not exist: {path}")
    if d.source == "events":
        if d.items_path is None:
            raise InputError("data.items_path is required for data.source=events")
        items = cfg.resolve(d.items_path)
        if not items.exists():
            raise InputError(f"data.items_path does not exist: {items}")
        return path, items, {}
    converted = (convert_qilin(path) if d.source == "qilin"
                 else convert_amazon(path, d.amazon_search_share, d.seed,
                                d.amazon_query_title_words))
    events, items = _write_adapter_output(converted, work_dir)
    return events, items, {d.source: converted.stats}


def _read_items(specs: list[FileSpec]) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    raws, rows_in = [], 0
    for spec in specs:
        raw, original = read_raw(spec, ITEM_FIELDS)
        rows_in += count_rows(spec)
        raws.append(raw)
    valid, rejected = validate_items(pl.concat(raws, how="diagonal_relaxed"))
    return valid, conform(rejected, ITEM_QUARANTINE_SCHEMA), rows_in


def item_entries(items: pl.DataFrame, title_max_words: int) -> pl.DataFrame:
    """item_id -> the text a history shows for it (rendered by gems.prompts, the one definition)."""
    ids, titles = items["item_id"].to_list(), items["title"].to_list()
    entries = [history_entry(i, t, title_max_words) for i, t in zip(ids, titles, strict=True)]
    return pl.DataFrame({"item_id": ids, "entry": entries},
                        schema={"item_id": pl.String, "entry": pl.String})


def check_output_dir(out: str | Path) -> None:
    """Fail now, naming the path, if the output could not be published at the end: a run used to
    find out only after all its work. Probes for real (creates and removes a sibling directory,
    which is what publishing does), since permission bits alone miss read-only mounts and root."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"data.output_dir {out} exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe-{uuid.uuid4().hex[:12]}"
        probe.mkdir()
        (probe / "x").write_bytes(b"")
        shutil.rmtree(probe)
    except OSError as err:
        raise InputError(f"data.output_dir {out}: cannot write beside it in {out.parent} "
                         f"({err.strerror or err})") from None
    if out.exists() and not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"data.output_dir {out} exists and is not writable, so it cannot be "
                         "replaced; choose another data.output_dir or fix its permissions")


def check_inputs(cfg: Config) -> None:
    """The cheap checks, before Ray starts: every input path exists and holds readable files (not
    only empty ones), and the output can be written. Adapters' inputs are checked by converting."""
    d = cfg.data
    if d.source != "synthetic":
        if d.path is None:
            raise InputError(f"data.path is required for data.source={d.source}")
        if not cfg.resolve(d.path).exists():
            raise InputError(f"data.path does not exist: {cfg.resolve(d.path)}")
    if d.source == "events":
        if d.items_path is None:
            raise InputError("data.items_path is required for data.source=events")
        if not cfg.resolve(d.items_path).exists():
            raise InputError(f"data.items_path does not exist: {cfg.resolve(d.items_path)}")
        files = scan_input_files(cfg.resolve(d.path), "events").files
        scan_input_files(cfg.resolve(d.items_path), "items")
        if not any(_may_hold_rows(s) for s in files):
            raise _empty_input(cfg.resolve(d.path), len(files))
    check_output_dir(cfg.resolve(d.output_dir))


def _may_hold_rows(spec: FileSpec, peek: int = 1 << 16) -> bool:
    """False for a file that surely holds no row (empty, or a short plain JSONL of blank lines);
    cheap, so it runs before Ray starts. ``prepare`` counts every row exactly later."""
    size = Path(spec.path).stat().st_size
    if size == 0:
        return False
    if spec.fmt == "jsonl" and spec.compression is None and size <= peek:
        return bool(Path(spec.path).read_bytes().strip())
    return True


def _empty_input(path: Path, n_files: int) -> InputError:
    return InputError(f"events input {path}: its {n_files} file(s) hold no rows (all empty); "
                      "nothing to preprocess")


def prepare(cfg: Config, work_dir: str | Path) -> Prepared:
    """Resolve and check all inputs (no Ray needed); ``work_dir`` receives converted sources."""
    work_dir = Path(work_dir)
    events_path, items_path, adapter = _resolve_sources(cfg, work_dir)
    events = scan_input_files(events_path, "events")
    item_files = scan_input_files(items_path, "items")
    skipped = events.skipped + item_files.skipped
    for s in skipped:
        log.warning("%s input %s: skipped, %s", s["what"], s["path"], s["why"])
    files = events.files
    d = cfg.data
    if d.source in ("qilin", "amazon"):  # the converted copy is temporary: name the real source
        inputs = {"events": str(cfg.resolve(d.path)), "items": str(cfg.resolve(d.path)),
                  "converted_by": f"gems.data.{d.source}", "files": len(files)}
    else:
        inputs = {"events": str(events_path), "items": str(items_path), "files": len(files)}
    rows_in = sum(count_rows(s) for s in files)
    if rows_in == 0:
        raise _empty_input(Path(inputs["events"]), len(files))
    items, items_quarantine, items_rows_in = _read_items(item_files.files)
    return Prepared(
        source=d.source, event_files=files, rows_in=rows_in,
        items=items, items_quarantine=items_quarantine, items_rows_in=items_rows_in,
        entries=item_entries(items, d.title_max_words),
        validation=ValidationParams(now_ts=d.now_ts if d.now_ts is not None else int(time.time()),
                                    future_ts_tolerance_s=d.future_ts_tolerance_s,
                                    query_max_chars=d.query_max_chars, num_buckets=d.num_buckets),
        sequence=SequenceParams(d.history_len, d.split_mode, d.cut_day),
        inputs=inputs, adapter=adapter, skipped_files=skipped,
    )


def validate_file(spec: FileSpec, item_ids: pl.Series, params: ValidationParams) -> pl.DataFrame:
    """One input file -> staged rows (valid with a bucket, quarantined with bucket -1 and reason)."""
    raw, original = read_raw(spec)
    return attach_raw(validate_events(raw, item_ids, params), original)


def user_subset(user_ids: pl.Series, max_users: int | None, seed: int) -> pl.Series | None:
    """The seeded subset of at most ``max_users`` users (smallest crc32(seed:user)), or None = all."""
    uniq = user_ids.unique()
    if max_users is None or uniq.len() <= max_users:
        return None
    ranked = pl.DataFrame({"user_id": uniq,
                           "_h": [zlib.crc32(f"{seed}:{u}".encode()) for u in uniq]})
    return ranked.sort("_h", "user_id").head(max_users)["user_id"]


def process_bucket(staged: pl.DataFrame, entries: pl.DataFrame, params: SequenceParams,
                   out_dir: str | Path, bucket: int, users: pl.Series | None = None) -> dict[str, Any]:
    """One bucket's valid rows -> shard files under ``out_dir``; returns its counts."""
    excluded = 0
    outside = _outside_partition(staged)
    if users is not None:
        keep = staged["user_id"].is_in(users.implode())
        excluded = int((~keep).sum())
        staged = staged.filter(keep)
    result = build_bucket(staged, entries, params)
    write_bucket(result, out_dir, bucket)
    result.stats["bucket"] = bucket
    result.stats["rows_outside_user_subset"] = excluded
    result.stats["ts_outside_partition"] = outside
    result.stats["rows_valid"] += excluded
    return result.stats


def _outside_partition(staged: pl.DataFrame) -> int:
    """Valid rows of a ``dt=`` partition whose ts falls on another (UTC) day: late or early
    arrivals, or a mislabelled partition. Counted, not quarantined (the ts is the truth for
    ordering; the partition only says when the row was delivered)."""
    day = pl.from_epoch(pl.col("ts"), time_unit="s").dt.date().cast(pl.String)
    return int(staged.select((pl.col("dt").is_not_null() & (day != pl.col("dt"))).sum()).item())


def _sum_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"examples": {s: dict.fromkeys(TASKS, 0) for s in SPLITS}, "days": set(),
                             "max_ts": None, "users": 0}
    for s in stats:
        for key, value in s.items():
            if key == "examples":
                for split, by_task in value.items():
                    for task, n in by_task.items():
                        total["examples"][split][task] += n
            elif key == "days":
                total["days"].update(value)
            elif key == "max_ts":
                if value is not None:
                    total["max_ts"] = value if total["max_ts"] is None else max(total["max_ts"], value)
            elif key != "bucket":
                total[key] = total.get(key, 0) + value
    total["days"] = sorted(total["days"])
    return total


def _no_examples_message(accounting: dict[str, Any], by_reason: dict[str, int],
                         quarantined: pl.DataFrame, shown: int = 5) -> str:
    lines = [f"no examples: {accounting['rows_in']} rows in, {accounting['rows_valid']} valid "
             f"({accounting['clicked']} clicked), {accounting['rows_quarantined']} quarantined, "
             f"{accounting['rows_deduplicated']} duplicates"]
    if by_reason:
        lines.append("quarantined by reason: " + ", ".join(f"{r}={n}" for r, n in by_reason.items()))
        first = quarantined.sort("source_file", "source_row").head(shown)
        for f, row, reason, detail in first.select("source_file", "source_row", "reason",
                                                   "detail").iter_rows():
            lines.append(f"  {f}:{row} {reason}" + (f" ({detail})" if detail else ""))
    return "\n".join(lines)


def finalize(cfg: Config, prepared: Prepared, quarantined: pl.DataFrame, bucket_stats: list[dict[str, Any]],
             work_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write items, quarantine and manifest into ``work_dir``, check the books, publish."""
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    write_parquet(prepared.items, work_dir / ITEMS)
    write_quarantine(quarantined, prepared.items_quarantine, work_dir)
    t = _sum_stats(bucket_stats)
    by_reason = dict(sorted(quarantined.group_by("reason").len().iter_rows())) if quarantined.height else {}
    accounting = {"rows_in": prepared.rows_in, "rows_valid": t.get("rows_valid", 0),
                  "rows_quarantined": quarantined.height,
                  "rows_deduplicated": t.get("rows_deduplicated", 0),
                  "clicked": t.get("clicked", 0), "impressions": t.get("impressions", 0),
                  "rows_outside_user_subset": t.get("rows_outside_user_subset", 0)}
    balance = accounting["rows_valid"] + accounting["rows_quarantined"] + accounting["rows_deduplicated"]
    if balance != accounting["rows_in"]:
        raise AccountingError(f"rows_in={accounting['rows_in']} but valid + quarantined + "
                              f"deduplicated = {balance}: {accounting}")
    items_q = prepared.items_quarantine
    if prepared.items_rows_in != prepared.items.height + items_q.height:
        raise AccountingError(f"items: rows_in={prepared.items_rows_in} but valid "
                              f"{prepared.items.height} + quarantined {items_q.height}")
    examples = sum(n for by_task in t["examples"].values() for n in by_task.values())
    if examples == 0:
        raise NoExamplesError(_no_examples_message(accounting, by_reason, quarantined))
    shutil.rmtree(work_dir / SOURCE_DIR, ignore_errors=True)
    hashes = file_hashes(work_dir)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": prepared.source,
        "inputs": prepared.inputs,
        "counts": t["examples"],
        "examples": examples,
        "examples_detail": {k: t.get(k, 0) for k in ("examples_empty_history", "examples_after_cut",
                                                      "negatives_attached")},
        "accounting": accounting,
        "quarantine": by_reason,
        "deduplicated": {Reason.DUPLICATE_EVENT.value: accounting["rows_deduplicated"]},
        "repairs": {k: t.get(k, 0) for k in ("rec_query_dropped", "query_truncated")},
        "items": {"rows_in": prepared.items_rows_in, "rows_valid": prepared.items.height,
                  "rows_quarantined": items_q.height,
                  "quarantine": dict(sorted(items_q.group_by("reason").len().iter_rows()))
                  if items_q.height else {}},
        "users": t.get("users", 0),
        "watermark": {"partitions": sorted({s.dt for s in prepared.event_files if s.dt}),
                      "event_days": t["days"], "max_ts": t["max_ts"],
                      "ts_outside_partition": t.get("ts_outside_partition", 0)},
        "skipped_files": prepared.skipped_files,
        "now_ts": prepared.validation.now_ts,
        "adapter": prepared.adapter,
        "fingerprint": fingerprint(hashes),
        "files": hashes,
        "config": cfg.model_dump(mode="json"),
    }
    write_manifest(manifest, work_dir)
    publish(work_dir, out_dir)
    log.info("preprocess: %d examples %s, %d quarantined, fingerprint %s -> %s", manifest["examples"],
             manifest["counts"], accounting["rows_quarantined"], manifest["fingerprint"][:12], out_dir)
    return manifest
