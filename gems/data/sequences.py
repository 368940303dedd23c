"""Per-bucket transform, pure polars: valid events of a set of users -> deduplicated, time-ordered
unified histories -> prompt examples -> split.

It runs on one hash bucket of users at a time (inside Ray Data's ``map_batches``, or on everything
at once in the single-process reference), so a user's whole log is always in one call and no
per-user groupby over millions of tiny groups is ever needed: all per-user work is done with sorted
frames, shifts and window expressions.

Rules (DESIGN.md section 3):
- only clicked events are history or targets; ``clicked=false`` impressions become the example's
  ``negative_item_ids`` (items shown to the user for the same task at the same second, not clicked);
- the history of an example is its user's last ``history_len`` clicks of *both* tasks with a
  strictly earlier ts, oldest first, with occurrences of the target item left out (so prompts never
  contain the answer; such a history is shorter than H);
- split per user and task: leave_one_out = last -> test, second-last -> val, rest -> train;
  time_cut = events of ``cut_day`` -> test, the last earlier event per user and task -> val, the
  rest earlier -> train, later days are not used (counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from gems.data.schema import QUARANTINE_SCHEMA, SHARD_SCHEMA, SPLITS, Reason, conform
from gems.prompts import EMPTY_HISTORY, HISTORY_SEP, prompt_head, prompt_tail
from gems.tasks import TASKS

DEDUP_KEY = ("user_id", "ts", "task", "query", "item_id", "clicked", "session_id")
ORDER = ("user_id", "ts", "source_file", "source_row")
"""Total order of a user's events: time, then input position (ties keep file order)."""


@dataclass(frozen=True)
class SequenceParams:
    history_len: int
    split_mode: str = "leave_one_out"
    cut_day: str | None = None



@dataclass
class BucketResult:
    examples: pl.DataFrame
    duplicates: pl.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


def _split_leave_one_out() -> pl.Expr:
    group = ["user_id", "task"]
    from_end = pl.len().over(group) - 1 - pl.int_range(pl.len()).over(group)
    return (pl.when(from_end == 0).then(pl.lit("test"))
            .when(from_end == 1).then(pl.lit("val")).otherwise(pl.lit("train")))


def _split_time_cut(cut_day: str) -> pl.Expr:
    start = int(datetime.fromisoformat(cut_day).replace(tzinfo=UTC).timestamp())
    end = start + 86_400
    before = pl.col("ts") < start
    group = ["user_id", "task", before]
    last_before = before & (pl.int_range(pl.len()).over(group) == pl.len().over(group) - 1)
    return (pl.when((pl.col("ts") >= start) & (pl.col("ts") < end)).then(pl.lit("test"))
            .when(last_before).then(pl.lit("val"))
            .when(before).then(pl.lit("train")))


def _histories(clicks: pl.DataFrame, entries: pl.DataFrame, params: SequenceParams) -> pl.DataFrame:
    """history_item_ids and the joined history text of every click.

    In the user-sorted frame, the H clicks strictly before a click's second are the contiguous rows
    [max(user_start, g - H), g), where g is the first row of its (user, ts) group. They are
    gathered as an (n, H) index matrix with numpy (no per-user loop), occurrences of the target
    item are masked out, and the surviving item codes become Arrow list columns in one step.
    """
    new_user = (pl.col("user_id") != pl.col("user_id").shift(1)).fill_null(True)
    new_second = new_user | (pl.col("ts") != pl.col("ts").shift(1)).fill_null(True)
    bounds = clicks.select(
        pl.when(new_user).then(pl.col("_i")).forward_fill().cast(pl.Int64).alias("start"),
        pl.when(new_second).then(pl.col("_i")).forward_fill().cast(pl.Int64).alias("second"),
        pl.col("_code").cast(pl.Int64).alias("code"),
    )
    start, second, code = (bounds[c].to_numpy() for c in ("start", "second", "code"))
    idx = second[:, None] - np.arange(params.history_len, 0, -1)[None, :]  # oldest first
    history = code[np.clip(idx, 0, None)]
    keep = (idx >= start[:, None]) & (history != code[:, None])
    offsets = pa.array(np.concatenate([[0], np.cumsum(keep.sum(axis=1))]), pa.int64())
    picked = pa.array(history[keep])  # row-major: each row's entries stay in time order

    def as_list(column: str) -> pl.Series:
        return pl.from_arrow(pa.LargeListArray.from_arrays(offsets, pc.take(entries[column].to_arrow(),
                                                                              picked)))

    return clicks.with_columns(
        as_list("item_id").alias("history_item_ids"),
        as_list("entry").list.join(HISTORY_SEP).alias("_history"),
    )


def _prompt() -> pl.Expr:
    body = pl.when(pl.col("_history") == "").then(pl.lit(EMPTY_HISTORY)).otherwise(pl.col("_history"))
    rec = pl.concat_str([pl.lit(prompt_head("rec")), body, pl.lit(prompt_tail("rec", None))])
    query_tail = prompt_tail("search", "\0").split("\0")
    search = pl.concat_str([pl.lit(prompt_head("search")), body, pl.lit(query_tail[0]),
                            pl.col("query"), pl.lit(query_tail[1])])
    return pl.when(pl.col("task") == "rec").then(rec).otherwise(search)


def _negatives(valid: pl.DataFrame, clicks: pl.DataFrame) -> pl.DataFrame:
    keys = ["user_id", "task", "ts"]
    shown = valid.filter(~pl.col("clicked")).select(*keys, "item_id")
    shown = shown.join(clicks.select(*keys, "item_id"), on=[*keys, "item_id"], how="anti")
    return shown.unique().group_by(keys).agg(pl.col("item_id").sort().alias("negative_item_ids"))


def build_bucket(staged: pl.DataFrame, entries: pl.DataFrame, params: SequenceParams) -> BucketResult:
    """Valid staged events of some users + (item_id, entry) -> examples, duplicates and counts.

    ``entries`` maps every valid item to its history text (gems.prompts.history_entry).
    """
    df = staged.sort(list(ORDER))
    first = pl.struct(list(DEDUP_KEY)).is_first_distinct()
    duplicates = conform(df.filter(~first).with_columns(
        pl.lit(Reason.DUPLICATE_EVENT.value).alias("reason"),
        pl.lit("identical to an earlier event of the same user").alias("detail")), QUARANTINE_SCHEMA)
    valid = df.filter(first)
    clicks = valid.filter(pl.col("clicked")).with_row_index("_i")
    new_user = (pl.col("user_id") != pl.col("user_id").shift(1)).fill_null(True)
    clicks = clicks.with_columns(
        (pl.col("_i") - pl.when(new_user).then(pl.col("_i")).forward_fill()).alias("_pos"))
    entries = entries.select("item_id", "entry")
    clicks = clicks.join(entries.with_row_index("_code"), on="item_id", how="left", maintain_order="left")
    if clicks["_code"].null_count():
        missing = clicks.filter(pl.col("_code").is_null())["item_id"].unique().head(5).to_list()
        raise ValueError(f"events reference items without a catalog entry: {missing}")
    clicks = _histories(clicks, entries, params)
    split = (_split_leave_one_out() if params.split_mode == "leave_one_out"
             else _split_time_cut(str(params.cut_day)))
    clicks = clicks.with_columns(split.alias("split"))
    examples = (clicks.filter(pl.col("split").is_not_null())
                .join(_negatives(valid, clicks), on=["user_id", "task", "ts"], how="left",
                      maintain_order="left")
                .with_columns(
                    pl.concat_str([pl.col("user_id"), pl.lit(":"), pl.col("task"), pl.lit(":"),
                                   pl.col("_pos").cast(pl.String)]).alias("example_id"),
                    _prompt().alias("prompt"),
                    pl.col("item_id").alias("target_item_id"),
                    pl.col("negative_item_ids").fill_null(pl.lit([], pl.List(pl.String))),
                ))
    examples = conform(examples, SHARD_SCHEMA)
    return BucketResult(examples, duplicates, _stats(valid, clicks, examples, duplicates))


def _stats(valid: pl.DataFrame, clicks: pl.DataFrame, examples: pl.DataFrame,
           duplicates: pl.DataFrame) -> dict[str, Any]:
    counts = {s: dict.fromkeys(TASKS, 0) for s in SPLITS}
    for split, task, n in examples.group_by(["split", "task"]).len().iter_rows():
        counts[split][task] = n
    return {
        "rows_valid": valid.height,
        "rows_deduplicated": duplicates.height,
        "clicked": clicks.height,
        "impressions": valid.height - clicks.height,
        "examples": counts,
        "examples_after_cut": clicks.height - examples.height,
        "examples_empty_history": int((examples["history_item_ids"].list.len() == 0).sum()),
        "negatives_attached": int(examples["negative_item_ids"].list.len().sum() or 0),
        "rec_query_dropped": int(valid["rec_query_dropped"].sum()),
        "query_truncated": int(valid["query_truncated"].sum()),
        "users": valid["user_id"].n_unique(),
        "max_ts": valid["ts"].max(),
        "days": sorted(datetime.fromtimestamp(day * 86_400, UTC).date().isoformat()
                       for day in (valid["ts"] // 86_400).unique().to_list()),
    }
