"""Qilin (Xiaohongshu, SIGIR 2025; the GEMS paper's dataset) -> the raw-log contract.

Input directory: ``search_*.csv``, ``recommendation_*.csv`` and ``notes.csv`` as released. Each log
row is one search (or one rec request) with its result list, a numpy/Python repr such as
``[{'click': 1.0, 'note_idx': 785089, 'search_timestamp': 1732475484.0, ...}\\n {...}]``.
Every result becomes one event: clicked results are clicks, the others ``clicked=false``
impressions (real negatives). Fields are pulled out of the repr with vectorised regexes, so no
Python ``eval`` runs per result.

- user_id = ``user_idx``; session_id = ``session_idx``; item_id = ``note_idx``;
- ts = ``search_timestamp`` (s) / ``request_timestamp`` (ms in the rec logs, divided by 1000);
- query = the search row's ``query``; rec rows carry none (their ``query`` column holds titles of
  recently viewed notes, not user input, so it is not used);
- a result whose click flag or note id cannot be read is kept with ``source_error`` =
  ``qilin_unparsable_result`` and is quarantined with that reason by validation;
- a row with an empty result list yields no event (counted in ``rows_without_results``);
- ``recent_clicked_note_idxs`` (earlier clicks without timestamps) is not used: it cannot be placed
  on the time line the split relies on.
Items: item_id = ``note_idx``, title = ``note_title`` (or, when empty, the first 30 characters of
``note_content``), text = ``note_content``, category = ``taxonomy1_id > taxonomy2_id >
taxonomy3_id`` (ids: the release has no taxonomy names). Train and test files are merged: the
pipeline makes its own time-based split.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from gems.data.events import AdapterOutput, InputError

UNPARSABLE = "qilin_unparsable_result"
TITLE_FALLBACK_CHARS = 30
_RESULT = r"\{[^{}]*\}"


def _field(name: str) -> pl.Expr:
    return pl.col("_result").str.extract(rf"'{name}':\s*([^,}}\s]+)", 1)


def _number(expr: pl.Expr) -> pl.Expr:
    return expr.cast(pl.Float64, strict=False)


def _log_events(path: Path, task: str) -> tuple[pl.DataFrame, int]:
    df = pl.read_csv(path, infer_schema_length=0).with_row_index("_row")
    details = "search_result_details_with_idx" if task == "search" else "rec_result_details_with_idx"
    missing = {details, "user_idx", "session_idx"} - set(df.columns)
    if missing:
        raise InputError(f"{path}: not a Qilin {task} log (missing columns {sorted(missing)})")
    ts_name = "search_timestamp" if task == "search" else "request_timestamp"
    results = df.select(
        "_row", "user_idx", "session_idx",
        (pl.col("query") if task == "search" else pl.lit(None, pl.String)).alias("query"),
        pl.col(details).str.extract_all(_RESULT).alias("_result"),
    )
    empty_rows = int((results["_result"].list.len().fill_null(0) == 0).sum())
    results = results.explode("_result").filter(pl.col("_result").is_not_null())
    click = _number(_field("click"))
    note = _number(_field("note_idx"))
    ts = _number(_field(ts_name))
    ts = pl.when(ts > 1e11).then(ts / 1000).otherwise(ts).floor().cast(pl.Int64, strict=False)
    events = results.select(
        pl.col("user_idx").alias("user_id"),
        ts.alias("ts"),
        pl.lit(task).alias("task"),
        pl.col("query"),
        note.cast(pl.Int64, strict=False).cast(pl.String).alias("item_id"),
        (click > 0).alias("clicked"),
        pl.col("session_idx").alias("session_id"),
        pl.concat_str([pl.lit(f"{path.name}:"), pl.col("_row").cast(pl.String)]).alias("origin"),
        pl.when(click.is_null() | note.is_null()).then(pl.lit(UNPARSABLE)).alias("source_error"),
    )
    return events, empty_rows


def _items(path: Path) -> pl.DataFrame:
    notes = pl.read_csv(path, infer_schema_length=0)
    if "note_idx" not in notes.columns:
        raise InputError(f"{path}: not a Qilin notes table (no note_idx column)")
    title = pl.col("note_title").str.strip_chars() if "note_title" in notes.columns else pl.lit(None)
    content = pl.col("note_content") if "note_content" in notes.columns else pl.lit(None, pl.String)
    taxonomy = [pl.col(c) for c in ("taxonomy1_id", "taxonomy2_id", "taxonomy3_id") if c in notes.columns]
    return notes.select(
        _number(pl.col("note_idx")).cast(pl.Int64, strict=False).cast(pl.String).alias("item_id"),
        pl.when(title.is_null() | (title == "")).then(
            content.str.strip_chars().str.slice(0, TITLE_FALLBACK_CHARS)).otherwise(title).alias("title"),
        content.alias("text"),
        (pl.concat_str(taxonomy, separator=" > ", ignore_nulls=True) if taxonomy
         else pl.lit(None, pl.String)).alias("category"),
    )


def convert_qilin(root: str | Path) -> AdapterOutput:
    """Read a Qilin directory into contract events + items (small toy or full release)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Qilin input directory does not exist: {root}")
    logs = [(p, "search") for p in sorted(root.glob("search_*.csv"))]
    logs += [(p, "rec") for p in sorted(root.glob("recommendation_*.csv"))]
    if not logs or not (root / "notes.csv").exists():
        raise InputError(f"{root}: expected Qilin search_*.csv / recommendation_*.csv and notes.csv")
    frames, stats = [], {"files": {}, "rows_without_results": 0}
    for path, task in logs:
        events, empty = _log_events(path, task)
        frames.append(events)
        stats["files"][path.name] = {"task": task, "events": events.height}
        stats["rows_without_results"] += empty
    events = pl.concat(frames)
    stats["events"] = events.height
    stats["unparsable_results"] = int(events["source_error"].is_not_null().sum())
    return AdapterOutput(events, _items(root / "notes.csv"), stats)
