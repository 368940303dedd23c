"""The raw-log contract (DESIGN.md section 2) and the column layouts every data stage agrees on.

One module names every column and every quarantine reason so that readers, validation, the Ray
stages, the in-process reference and the tests cannot drift apart.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

import polars as pl

SPLITS: tuple[str, ...] = ("train", "val", "test")
Split = Literal["train", "val", "test"]

FieldKind = Literal["id", "text", "ts", "bool"]
"""How a contract field is typed: ids accept strings or integers (turned into strings); text only
strings; ts an integer/float unix time or an ISO-8601 string; bool a boolean (or 0/1)."""

EVENT_FIELDS: dict[str, FieldKind] = {
    "user_id": "id",
    "ts": "ts",
    "task": "text",
    "query": "text",
    "item_id": "id",
    "clicked": "bool",
    "session_id": "id",
}
ITEM_FIELDS: dict[str, FieldKind] = {"item_id": "id", "title": "text", "text": "text", "category": "text"}
SOURCE_ERROR_COLUMN = "source_error"
"""Optional column an adapter may set on a converted row it could not fully parse; such rows are
quarantined with that value as the reason (so adapter rejects are accounted like any other)."""


class Reason(StrEnum):
    """Why a raw row was not used. Every rejection carries exactly one of these (or an adapter's own
    ``source_error`` value)."""

    MALFORMED_JSON = "malformed_json"
    TOO_DEEPLY_NESTED = "too_deeply_nested"
    DUPLICATE_KEY = "duplicate_key"
    INVALID_UTF8 = "invalid_utf8"
    WRONG_TYPE = "wrong_type"
    CONTROL_CHAR_IN_ID = "control_char_in_id"
    MISSING_USER_ID = "missing_user_id"
    UNKNOWN_TASK = "unknown_task"
    MISSING_TS = "missing_ts"
    TS_OUT_OF_RANGE = "ts_out_of_range"
    UNPARSABLE_TS = "unparsable_ts"
    NEGATIVE_TS = "negative_ts"
    TS_IN_FUTURE = "ts_in_future"
    NULL_ITEM_ID = "null_item_id"
    SEARCH_WITHOUT_QUERY = "search_without_query"
    UNKNOWN_ITEM_ID = "unknown_item_id"
    DUPLICATE_EVENT = "duplicate_event"
    # item table
    MISSING_ITEM_ID = "missing_item_id"
    MISSING_TITLE = "missing_title"
    DUPLICATE_ITEM_ID = "duplicate_item_id"


class Repair(StrEnum):
    """Rows kept after a documented fix; counted in the manifest, never silent."""

    REC_QUERY_DROPPED = "rec_query_dropped"
    QUERY_TRUNCATED = "query_truncated"


_META: dict[str, pl.DataType] = {
    "pre_reason": pl.String(),
    "detail": pl.String(),
    "raw": pl.String(),
    "source_file": pl.String(),
    "source_row": pl.Int64(),
    "dt": pl.String(),
}


def raw_schema(fields: dict[str, FieldKind]) -> dict[str, pl.DataType]:
    """A file's rows after reading, before validation: the fields with their raw typing resolved
    (ts split into a numeric and a string column) plus where each row came from."""
    out: dict[str, pl.DataType] = {}
    for name, kind in fields.items():
        if kind == "ts":
            out |= {"ts_int": pl.Int64(), "ts_str": pl.String()}
        else:
            out[name] = pl.Boolean() if kind == "bool" else pl.String()
    return out | _META


RAW_SCHEMA = raw_schema(EVENT_FIELDS)

# A validated row as staged between the two Ray Data stages; bucket -1 = quarantined.
STAGED_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "ts": pl.Int64(),
    "task": pl.String(),
    "query": pl.String(),
    "item_id": pl.String(),
    "clicked": pl.Boolean(),
    "session_id": pl.String(),
    "dt": pl.String(),
    "source_file": pl.String(),
    "source_row": pl.Int64(),
    "query_truncated": pl.Boolean(),
    "rec_query_dropped": pl.Boolean(),
    "reason": pl.String(),
    "detail": pl.String(),
    "raw": pl.String(),
    "bucket": pl.Int32(),
}
QUARANTINE_BUCKET = -1

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "reason": pl.String(),
    "detail": pl.String(),
    "source_file": pl.String(),
    "source_row": pl.Int64(),
    "dt": pl.String(),
    "user_id": pl.String(),
    "ts": pl.Int64(),
    "task": pl.String(),
    "query": pl.String(),
    "item_id": pl.String(),
    "clicked": pl.Boolean(),
    "session_id": pl.String(),
    "raw": pl.String(),
}

ITEM_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.String(),
    "title": pl.String(),
    "text": pl.String(),
    "category": pl.String(),
}
ITEM_QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "reason": pl.String(),
    "detail": pl.String(),
    "source_file": pl.String(),
    "source_row": pl.Int64(),
    "item_id": pl.String(),
    "title": pl.String(),
    "raw": pl.String(),
}

# Contract 4 in notes/COMMON.md: one row per example in {train,val,test}/part-*.parquet.
SHARD_SCHEMA: dict[str, pl.DataType] = {
    "example_id": pl.String(),
    "user_id": pl.String(),
    "task": pl.String(),
    "split": pl.String(),
    "ts": pl.Int64(),
    "prompt": pl.String(),
    "query": pl.String(),
    "history_item_ids": pl.List(pl.String()),
    "target_item_id": pl.String(),
    "negative_item_ids": pl.List(pl.String()),
}

RAW_TEXT_MAX_CHARS = 4096
"""Quarantine keeps at most this much of an offending raw line (a 1 MB line stays inspectable)."""

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects a JSON line (or a Parquet column type) may have. Contract
fields are flat; this bounds what an ignored extra field may hold, so no parser or Arrow/polars
conversion ever recurses deeply (1,000 nested ``[`` crashed polars' Arrow import)."""

TS_MIN, TS_MAX = -(2**63), 2**63 - 1
"""A timestamp must fit int64 unix seconds; anything outside is ``ts_out_of_range``."""


def empty_frame(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def conform(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Exactly ``schema``'s columns in its order and types (missing ones null), so frames from
    different files and tasks concatenate and Arrow batches from Ray tasks share one schema."""
    exprs = [
        (pl.col(name) if name in df.columns else pl.lit(None)).cast(dtype).alias(name)
        for name, dtype in schema.items()
    ]
    return df.select(exprs)
