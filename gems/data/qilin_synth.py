"""Qilin-format logs at any scale, rendered from the simulator (gems.data.simulate).

The released Qilin toy files hold 10 rows per log and their note ids do not join; the full release
(~1.9M notes) is not on this machine. To run the Qilin parser, preprocessing and the ingest and
code-building benchmarks at the scale the system is for, this writes the simulator's events in
Qilin's own layout: ``notes.csv`` (note_idx, note_title, note_content, note_type, taxonomy ids),
``search_train_NNNNN.csv`` (one row per search: query, user_idx, session_idx, search_idx and the result
list as a Python repr, ``[{'click': 1.0, 'note_idx': 785089, 'position': 1.0, 'search_timestamp':
1732475484.0, ...}\\n {...}]``) and ``recommendation_train_NNNNN.csv`` (one row per rec request,
``request_timestamp`` in ms). A search or request row groups the events of one (user, second, query):
a click and the impression shown beside it. ``convert_qilin`` reads the files back to exactly the
simulated events (tested), so figures measured on them are the parser's and the pipeline's.

Run: python -m gems.data.qilin_synth --users 1000000 --items 1000000 --days 1 --out /tmp/qilin-1m
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import polars as pl

from gems.data.simulate import MARKER, SimulationParams, parse_simulation_args, print_summary, simulate

QILIN_MARKER = "qilin_synth.json"
ROWS_PER_CSV = 200_000


def _notes(items: pl.DataFrame) -> pl.DataFrame:
    """Qilin's notes table: taxonomy ids stand for the simulator's department and subcategory."""
    parts = pl.col("category").str.split(" > ")
    return items.select(
        pl.col("item_id").cast(pl.Int64).alias("note_idx"),
        pl.col("title").alias("note_title"),
        pl.col("text").alias("note_content"),
        pl.lit(1).alias("note_type"),
        parts.list.get(0).rank("dense").cast(pl.Int64).alias("taxonomy1_id"),
        pl.col("category").rank("dense").cast(pl.Int64).alias("taxonomy2_id"),
    )


def _result(task: str) -> pl.Expr:
    """One result of the list, in the release's key order and number formats."""
    def text(expr: pl.Expr) -> pl.Expr:
        return expr.cast(pl.String)

    if task == "search":
        click = pl.when(pl.col("clicked")).then(pl.lit("1.0")).otherwise(pl.lit("0.0"))
        return pl.concat_str([
            pl.lit("{'click': "), click,
            pl.lit(", 'collect': 0.0, 'comment': 0.0, 'like': 0.0, 'note_idx': "),
            text(pl.col("item_id")), pl.lit(", 'page_time': nan, 'position': "),
            text(pl.col("_position").cast(pl.Float64)), pl.lit(", 'search_timestamp': "),
            text(pl.col("ts").cast(pl.Float64)), pl.lit(", 'share': 0.0}")])
    return pl.concat_str([
        pl.lit("{'click': "), text(pl.col("clicked").cast(pl.Int8)),
        pl.lit(", 'collect': 0, 'comment': 0, 'like': 0, 'note_idx': "), text(pl.col("item_id")),
        pl.lit(", 'page_time': 0.0, 'position': "), text(pl.col("_position")),
        pl.lit(", 'request_timestamp': "), text(pl.col("ts") * 1000), pl.lit(", 'share': 0}")])


def qilin_log_rows(events: pl.DataFrame, task: str, first_index: int = 0) -> pl.DataFrame:
    """The Qilin log rows of one task's simulated events (one row per user, second and query)."""
    keys = ["user_id", "session_id", "ts"] + (["query"] if task == "search" else [])
    rows = (events.filter(pl.col("task") == task)
            .with_columns((pl.int_range(pl.len()).over(keys) + 1).alias("_position"))
            .with_columns(_result(task).alias("_result"))
            .group_by(keys, maintain_order=True)
            .agg(pl.col("_result").str.join("\n "))
            .with_row_index("_index", offset=first_index))
    listed = pl.concat_str([pl.lit("["), pl.col("_result"), pl.lit("]")])
    common = [pl.col("user_id").str.strip_prefix("u").cast(pl.Int64).alias("user_idx"),
              pl.col("session_id").alias("session_idx")]
    if task == "search":
        return rows.select(pl.col("query"), pl.lit(1.0).alias("query_from_type"),
                           listed.alias("search_result_details_with_idx"),
                           pl.col("_index").alias("search_idx"), *common)
    return rows.select(listed.alias("rec_result_details_with_idx"),
                       pl.col("_index").alias("request_idx"), *common)


def _write_parts(frame: pl.DataFrame, out: Path, stem: str, first_part: int, rows_per_file: int) -> int:
    parts = 0
    for lo in range(0, frame.height, rows_per_file):
        frame.slice(lo, rows_per_file).write_csv(out / f"{stem}_{first_part + parts:05d}.csv")
        parts += 1
    return parts


def write_qilin(out: str | Path, params: SimulationParams, rows_per_file: int = ROWS_PER_CSV
                ) -> dict[str, object]:
    """Simulate ``params`` and write it under ``out`` in Qilin's layout; returns a summary. Refuses a
    non-empty directory it did not write, so it never deletes user data."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / QILIN_MARKER).exists():
        raise FileExistsError(f"{out} is not empty and holds no {QILIN_MARKER}; refusing to overwrite it")
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    counts = {"search": 0, "rec": 0}
    files = {"search": 0, "rec": 0}
    with tempfile.TemporaryDirectory(prefix="qilin-sim-", dir=out.parent) as tmp:
        summary = simulate(tmp, params)
        for day_dir in sorted((Path(tmp) / "events").iterdir()):  # one day at a time: memory per day
            events = pl.read_parquet(day_dir / "*.parquet")
            for task, stem in (("search", "search_train"), ("rec", "recommendation_train")):
                rows = qilin_log_rows(events, task, counts[task])
                files[task] += _write_parts(rows, out, stem, files[task], rows_per_file)
                counts[task] += rows.height
        _notes(pl.read_parquet(Path(tmp) / "items.parquet")).write_csv(out / "notes.csv")
        sim = json.loads((Path(tmp) / MARKER).read_text())
    result = {"params": summary["params"], "events": sim["events"], "items": sim["items"],
              "users": params.users, "search_rows": counts["search"], "rec_rows": counts["rec"]}
    (out / QILIN_MARKER).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    params, out = parse_simulation_args("python -m gems.data.qilin_synth", __doc__.split("\n")[0], argv)
    print_summary(write_qilin(out, params))


if __name__ == "__main__":
    main()
