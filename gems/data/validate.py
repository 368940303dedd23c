"""Row validation: every raw row either passes the contract or gets exactly one named reason.

Two layers:
- typing: a Parquet column of the wrong kind (vectorised, per column: a Parquet column has one
  type), or one JSON line at a time: bad bytes, too deep nesting, bad JSON, duplicate keys, a value
  of the wrong kind -> a reason with a detail naming it. JSONL is never type-inferred as a table,
  so a row's verdict depends on its own bytes only, never on its neighbours';
- values (vectorised, row-wise expressions only): control characters in ids, missing ids, unknown
  task, missing / out-of-range / unparsable / negative / future timestamps, search without query,
  unknown items; plus the two repairs (rec query dropped, long query truncated) that keep the row.
Nothing here drops a row: callers split valid and quarantined rows by the ``reason`` column.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl

from gems.data.schema import (
    ITEM_FIELDS,
    MAX_JSON_DEPTH,
    QUARANTINE_BUCKET,
    RAW_TEXT_MAX_CHARS,
    SOURCE_ERROR_COLUMN,
    STAGED_SCHEMA,
    TS_MAX,
    TS_MIN,
    FieldKind,
    Reason,
    conform,
)
from gems.tasks import TASKS


@dataclass(frozen=True)
class ValidationParams:
    """The config values validation depends on (plain data, so it pickles into Ray tasks)."""

    now_ts: int
    future_ts_tolerance_s: int
    query_max_chars: int
    num_buckets: int


# ---------------------------------------------------------------------------------------------
# Typing: whole columns (Parquet, or JSON that parsed as a consistent table)


def _wrong(field: str, expected: str, got: object) -> str:
    return f"{field}: expected {expected}, got {got}"


_EXPECTED = {"id": "string or integer", "text": "string", "ts": "unix seconds or ISO-8601 string",
             "bool": "boolean"}


def type_columns(df: pl.DataFrame, fields: dict[str, FieldKind]) -> pl.DataFrame:
    """Map each contract field of a typed table onto the raw layout (``*_int``/``ts_str`` for ts).

    A column whose dtype cannot hold the field marks all its non-null rows ``wrong_type``.
    """
    out: list[pl.Expr] = []
    wrong: list[pl.Expr] = []
    for name, kind in fields.items():
        if name not in df.columns:
            if kind == "ts":
                out += [pl.lit(None, pl.Int64).alias("ts_int"), pl.lit(None, pl.String).alias("ts_str")]
            else:
                out.append(pl.lit(None, pl.String if kind != "bool" else pl.Boolean).alias(name))
            continue
        dtype = df.schema[name]
        col = pl.col(name)
        bad: pl.Expr | None = None
        if kind in ("id", "text"):
            stringy = dtype in (pl.String, pl.Categorical, pl.Enum) or isinstance(dtype, pl.Null)
            if stringy or (kind == "id" and dtype.is_integer()):
                expr = col.cast(pl.String)
            else:
                expr, bad = pl.lit(None, pl.String), col.is_not_null()
            out.append(expr.alias(name))
        elif kind == "ts":
            ts_int, ts_str = pl.lit(None, pl.Int64), pl.lit(None, pl.String)
            # numbers outside int64 go on as text: the string path names them ts_out_of_range
            if dtype.is_integer():
                ts_int = col.cast(pl.Int64, strict=False)
                ts_str = pl.when(col.is_not_null() & ts_int.is_null()).then(col.cast(pl.String))
            elif dtype.is_float():
                floor = col.floor()
                fits = col.is_finite() & (floor >= float(TS_MIN)) & (floor < float(TS_MAX))
                ts_int = pl.when(fits).then(floor.cast(pl.Int64, strict=False))
                ts_str = pl.when(col.is_infinite() | (col.is_finite() & ~fits)).then(col.cast(pl.String))
                bad = col.is_nan()
            elif dtype == pl.String:
                ts_str = col
            elif isinstance(dtype, pl.Datetime):
                ts_int = col.dt.epoch("s")
            elif dtype == pl.Date:
                ts_int = col.cast(pl.Datetime("ms")).dt.epoch("s")
            elif not isinstance(dtype, pl.Null):
                bad = col.is_not_null()
            out += [ts_int.alias("ts_int"), ts_str.alias("ts_str")]
        else:  # bool
            if dtype == pl.Boolean or isinstance(dtype, pl.Null):
                expr = col.cast(pl.Boolean)
            elif dtype.is_integer():
                bad = col.is_not_null() & ~col.is_in([0, 1])
                expr = pl.when(~bad).then(col == 1)
            else:
                expr, bad = pl.lit(None, pl.Boolean), col.is_not_null()
            out.append(expr.alias(name))
        if bad is not None:
            wrong.append(pl.when(bad).then(pl.lit(_wrong(name, _EXPECTED[kind], dtype))))
    source_error = (pl.col(SOURCE_ERROR_COLUMN).cast(pl.String, strict=False).str.strip_chars()
                    if SOURCE_ERROR_COLUMN in df.columns else pl.lit(None, pl.String))
    source_error = pl.when(source_error != "").then(source_error)  # blank = no error
    detail = pl.coalesce(wrong) if wrong else pl.lit(None, pl.String)
    # the row index keeps literal-only selections at the table's height
    typed = df.with_row_index("_row").select(
        "_row", *out, detail.alias("detail"), source_error.alias("_source_error"))
    return typed.with_columns(
        pl.when(pl.col("detail").is_not_null()).then(pl.lit(Reason.WRONG_TYPE.value))
        .otherwise(pl.col("_source_error")).alias("pre_reason"),
    ).drop("_source_error", "_row")


# ---------------------------------------------------------------------------------------------
# Typing: one JSON line at a time. Every JSONL row takes this path, so a row's verdict depends on
# its own bytes only (a file-wide type inference let one float id turn every id column into floats
# and quarantine all its neighbours).


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _Constant:
    """``NaN`` / ``Infinity`` / ``-Infinity``: Python's json accepts them, JSON does not. Kept as a
    marker, so an ignored field may hold one but a contract field holding one is ``wrong_type``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_Constant)
_BOM = "\ufeff"
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(line: bytes) -> int:
    """Deepest array/object nesting of a JSON text, found without parsing it (strings skipped, so
    brackets inside them do not count): a bound that is safe to compute on any bytes."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub(b'""', line)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


def _type_value(name: str, kind: FieldKind, value: Any) -> tuple[Any, str | None]:
    """(typed value, error detail or None). A ts number outside int64 is passed on as its text, so
    the string path names it ``ts_out_of_range`` in contract order."""
    if value is None:
        return None, None
    if isinstance(value, _Constant):
        return None, _wrong(name, _EXPECTED[kind], f"{value.name} (not valid JSON)")
    if kind == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    if kind in ("id", "text"):
        return (value, None) if isinstance(value, str) else (None, _wrong(name, _EXPECTED[kind],
                                                                           _json_kind(value)))
    if kind == "ts":
        if isinstance(value, bool):
            return None, _wrong(name, _EXPECTED[kind], "bool")
        if isinstance(value, int):
            return (value, None) if TS_MIN <= value <= TS_MAX else (str(value), None)
        if isinstance(value, float):  # finite, or inf from an overflowing literal such as 1e999
            if math.isfinite(value) and TS_MIN <= math.floor(value) <= TS_MAX:
                return math.floor(value), None
            return repr(value), None
        if isinstance(value, str):
            return value, None
        return None, _wrong(name, _EXPECTED[kind], _json_kind(value))
    if isinstance(value, bool):
        return value, None
    if isinstance(value, int) and value in (0, 1):
        return bool(value), None
    return None, _wrong(name, _EXPECTED[kind], _json_kind(value))


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


def _utf8_clean(value: Any) -> bool:
    """JSON escapes can smuggle lone surrogates that Arrow cannot store."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    elif isinstance(value, dict):
        return all(_utf8_clean(k) and _utf8_clean(v) for k, v in value.items())
    elif isinstance(value, list):
        return all(_utf8_clean(v) for v in value)
    return True


def _clip(text: str) -> str:
    return text[:RAW_TEXT_MAX_CHARS]


def type_json_line(line: bytes, fields: dict[str, FieldKind]
                   ) -> tuple[dict[str, Any], Reason | str | None, str | None, str]:
    """One JSONL line -> (typed contract values, reason or None, detail, text kept as ``raw``).

    Checks in this order, each before anything looks deeper: UTF-8, nesting depth (bytes only),
    JSON syntax (strict: one object per line, no duplicate keys), lone surrogates, field types.
    A UTF-8 byte-order mark at the start of a line is not part of the row (editors add one to
    files; concatenated files carry it into the middle).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return {}, Reason.INVALID_UTF8, str(err), line.decode("utf-8", "backslashreplace")
    if text.startswith(_BOM):
        text, line = text[1:], line[3:]
    if line.count(b"[") + line.count(b"{") > MAX_JSON_DEPTH:
        depth = json_depth(line)
        if depth > MAX_JSON_DEPTH:
            return {}, Reason.TOO_DEEPLY_NESTED, f"nesting depth {depth} > {MAX_JSON_DEPTH}", text
    try:
        obj = _DECODER.decode(text)
    except _DuplicateKey as dup:
        return {}, Reason.DUPLICATE_KEY, f"key {dup.key!r} appears more than once", text
    except RecursionError:
        return {}, Reason.TOO_DEEPLY_NESTED, "nesting deeper than the parser allows", text
    except ValueError as err:
        return {}, Reason.MALFORMED_JSON, str(err), text
    if not isinstance(obj, dict):
        return {}, Reason.MALFORMED_JSON, f"line is a JSON {_json_kind(obj)}, not an object", text
    if not _utf8_clean(obj):
        return {}, Reason.INVALID_UTF8, "string with an unpaired surrogate escape", text
    typed: dict[str, Any] = {}
    reason: Reason | str | None = None
    detail = None
    for name, kind in fields.items():
        value, err_detail = _type_value(name, kind, obj.get(name))
        typed[name] = value
        if err_detail and detail is None:
            reason, detail = Reason.WRONG_TYPE, err_detail
    source_error = obj.get(SOURCE_ERROR_COLUMN)
    if reason is None and isinstance(source_error, str) and source_error.strip():
        reason = source_error.strip()
    return typed, reason, detail, text


def type_json_lines(lines: Iterable[tuple[int, bytes]], fields: dict[str, FieldKind]) -> pl.DataFrame:
    """Per-line typing of JSONL: ``lines`` yields (1-based line number, raw bytes) for the non-blank
    lines of a file; every line gets its own verdict (``type_json_line``)."""
    names = [n for n in fields if n != "ts"] + (["ts_int", "ts_str"] if "ts" in fields else [])
    cols: dict[str, list[Any]] = {c: [] for c in [*names, "pre_reason", "detail", "raw", "source_row"]}
    for lineno, line in lines:
        typed, reason, detail, text = type_json_line(line, fields)
        for name in fields:
            if name != "ts":
                cols[name].append(typed.get(name))
        if "ts" in fields:
            ts = typed.get("ts")
            cols["ts_int"].append(ts if isinstance(ts, int) else None)
            cols["ts_str"].append(ts if isinstance(ts, str) else None)
        cols["pre_reason"].append(None if reason is None else str(reason))
        cols["detail"].append(detail)
        cols["raw"].append(_clip(text))  # valid rows drop it in validate_events
        cols["source_row"].append(lineno)
    kinds = {"ts_int": pl.Int64(), "ts_str": pl.String(), "source_row": pl.Int64()}
    kinds |= {n: (pl.Boolean() if k == "bool" else pl.String()) for n, k in fields.items() if n != "ts"}
    schema = {c: kinds.get(c, pl.String()) for c in cols}
    return pl.DataFrame(cols, schema=schema)


# ---------------------------------------------------------------------------------------------
# Values

_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def parse_ts_text(text: str) -> tuple[int | None, bool]:
    """ISO-8601 (naive = UTC) or numeric string -> (unix seconds or None, out of int64 range)."""
    s = text.strip()
    number: float | int | None = None
    if _INT_TEXT.fullmatch(s):
        if len(s.lstrip("+-").lstrip("0")) > 19:  # > 2**63, and int() refuses > 4300 digits
            return None, True
        number = int(s)
    else:
        try:
            as_float = float(s)
        except ValueError:
            pass
        else:
            if math.isnan(as_float):
                return None, False
            if math.isinf(as_float):
                return None, True
            number = math.floor(as_float)
    if number is not None:
        return (number, False) if TS_MIN <= number <= TS_MAX else (None, True)
    try:
        return int(_as_utc(datetime.fromisoformat(s)).timestamp()), False
    except (ValueError, OverflowError):
        return None, False


def parse_iso_ts(text: str) -> int | None:
    """ISO-8601 (or numeric) string -> unix seconds; naive times are UTC. None if unparsable or out
    of range."""
    return parse_ts_text(text)[0]


def _as_utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def _resolve_ts(df: pl.DataFrame) -> pl.DataFrame:
    """``ts`` (numeric as is, strings parsed once per distinct string) and ``ts_out_of_range``."""
    strings = df["ts_str"].drop_nulls().unique()
    if strings.is_empty():
        return df.select(pl.col("ts_int").alias("ts"), pl.lit(False).alias("ts_out_of_range"))
    parsed = [parse_ts_text(s) for s in strings]
    table = pl.DataFrame({"ts_str": strings, "_parsed": [p[0] for p in parsed],
                          "_oor": [p[1] for p in parsed]},
                         schema={"ts_str": pl.String, "_parsed": pl.Int64, "_oor": pl.Boolean})
    joined = df.select("ts_int", "ts_str").join(table, on="ts_str", how="left", maintain_order="left")
    return joined.select(pl.coalesce("ts_int", "_parsed").alias("ts"),
                         pl.col("_oor").fill_null(False).alias("ts_out_of_range"))


def user_buckets(user_ids: pl.Series, num_buckets: int) -> pl.Series:
    """Stable user -> bucket (crc32, not polars' per-version hash), one Python call per distinct user."""
    uniq = user_ids.drop_nulls().unique()
    table = pl.DataFrame({"user_id": uniq,
                          "bucket": [zlib.crc32(u.encode()) % num_buckets for u in uniq]},
                         schema={"user_id": pl.String, "bucket": pl.Int32})
    return (user_ids.to_frame("user_id").join(table, on="user_id", how="left", maintain_order="left")
            ["bucket"])


_ID_COLUMNS = ("user_id", "item_id", "session_id")
_CONTROL = r"[\x00-\x1f\x7f]"
"""Ids are compared, hashed and shown; a NUL or other control character in one is a broken
export, not a name (a NUL also truncates the id in C-string consumers)."""


def _control_detail(column: str) -> str:
    return f"{column} contains a control character (NUL, \\x01-\\x1f or \\x7f)"


def _blank(col: str) -> pl.Expr:
    return pl.col(col).is_null() | (pl.col(col).str.strip_chars() == "")


def validate_events(raw: pl.DataFrame, known_item_ids: pl.Series | None,
                    params: ValidationParams) -> pl.DataFrame:
    """Raw rows -> staged rows (``STAGED_SCHEMA``): ``reason`` null for valid rows.

    The first failing check names the reason, in contract order. ``known_item_ids`` None skips the
    item join (used when validating without a catalog).
    """
    df = raw.with_columns(_resolve_ts(raw))
    control = [pl.col(c).str.contains(_CONTROL).fill_null(False) for c in _ID_COLUMNS]
    task_ok = pl.col("task").is_in(list(TASKS))
    query_clean = pl.col("query").str.replace_all(r"\s+", " ").str.strip_chars()
    df = df.with_columns(query_clean.alias("query"))
    latest = params.now_ts + params.future_ts_tolerance_s
    item_known = (pl.col("item_id").is_in(known_item_ids.implode()) if known_item_ids is not None
                  else pl.lit(True))
    checks: list[tuple[pl.Expr, Reason]] = [
        (pl.any_horizontal(control), Reason.CONTROL_CHAR_IN_ID),
        (_blank("user_id"), Reason.MISSING_USER_ID),
        (pl.col("task").is_null() | ~task_ok, Reason.UNKNOWN_TASK),
        (pl.col("ts_int").is_null() & pl.col("ts_str").is_null(), Reason.MISSING_TS),
        (pl.col("ts_out_of_range"), Reason.TS_OUT_OF_RANGE),
        (pl.col("ts").is_null(), Reason.UNPARSABLE_TS),
        (pl.col("ts") < 0, Reason.NEGATIVE_TS),
        (pl.col("ts") > latest, Reason.TS_IN_FUTURE),
        (_blank("item_id"), Reason.NULL_ITEM_ID),
        ((pl.col("task") == "search") & _blank("query"), Reason.SEARCH_WITHOUT_QUERY),
        (~item_known, Reason.UNKNOWN_ITEM_ID),
    ]
    reason = pl.col("pre_reason")
    for failed, name in checks:
        reason = reason.fill_null(pl.when(failed).then(pl.lit(name.value)))
    df = df.with_columns(reason.alias("reason"))
    control_detail = pl.coalesce([pl.when(bad).then(pl.lit(_control_detail(c)))
                                  for c, bad in zip(_ID_COLUMNS, control, strict=True)])
    out_of_range = pl.concat_str([pl.lit("ts: "), pl.col("ts_str").str.slice(0, 64),
                                  pl.lit(" is outside int64 unix seconds")])
    df = df.with_columns(pl.when(pl.col("reason") == Reason.CONTROL_CHAR_IN_ID.value)
                         .then(control_detail)
                         .when(pl.col("reason") == Reason.TS_OUT_OF_RANGE.value).then(out_of_range)
                         .otherwise(pl.col("detail")).alias("detail"))
    valid = pl.col("reason").is_null()
    is_rec = pl.col("task") == "rec"
    has_query = pl.col("query").is_not_null() & (pl.col("query") != "")
    long_query = pl.col("query").str.len_chars() > params.query_max_chars
    df = df.with_columns(
        (valid & is_rec & has_query).alias("rec_query_dropped"),
        (valid & ~is_rec & long_query.fill_null(False)).alias("query_truncated"),
        pl.when(is_rec & valid).then(pl.lit(None, pl.String))
        .when(valid).then(pl.col("query").str.slice(0, params.query_max_chars))
        .otherwise(pl.col("query")).alias("query"),
        pl.col("clicked").fill_null(True),
        pl.when(valid).then(pl.lit(None, pl.String)).otherwise(pl.col("raw")).alias("raw"),
    )
    bucket = user_buckets(df["user_id"], params.num_buckets)
    df = df.with_columns(pl.when(valid).then(bucket).otherwise(pl.lit(QUARANTINE_BUCKET))
                         .cast(pl.Int32).alias("bucket"))
    return conform(df, STAGED_SCHEMA)


def attach_raw(staged: pl.DataFrame, original: pl.DataFrame | None) -> pl.DataFrame:
    """Quarantined rows keep the offending input as JSON (typed tables only; lines keep their text)."""
    if original is None:
        return staged
    bad = staged["reason"].is_not_null() & staged["raw"].is_null()
    if not bad.any():
        return staged
    idx = bad.arg_true()
    if original.width == 0:  # a Parquet file without any contract column
        return staged.with_columns(staged["raw"].scatter(idx, "{}"))
    try:
        encoded = original[idx].select(pl.struct(pl.all()).struct.json_encode().str.slice(
            0, RAW_TEXT_MAX_CHARS).alias("raw"))["raw"]
    except Exception as err:  # exotic column types: keep the row, say why raw is missing
        encoded = pl.Series("raw", [f"<unencodable row: {err}>"] * len(idx))
    return staged.with_columns(staged["raw"].scatter(idx, encoded))


def validate_items(raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Item rows -> (valid items, quarantined items with reason). Later duplicates of an item_id are
    quarantined; the first occurrence (in file order) wins."""
    first = pl.col("item_id").is_first_distinct() | pl.col("item_id").is_null()
    control = pl.col("item_id").str.contains(_CONTROL).fill_null(False)
    reason = (pl.col("pre_reason")
              .fill_null(pl.when(control).then(pl.lit(Reason.CONTROL_CHAR_IN_ID.value)))
              .fill_null(pl.when(_blank("item_id")).then(pl.lit(Reason.MISSING_ITEM_ID.value)))
              .fill_null(pl.when(_blank("title")).then(pl.lit(Reason.MISSING_TITLE.value))))
    df = raw.with_columns(reason.alias("reason"), pl.when(control & pl.col("pre_reason").is_null())
                          .then(pl.lit(_control_detail("item_id"))).otherwise(pl.col("detail"))
                          .alias("detail"))
    # duplicates are judged among otherwise valid rows only
    ok = df.filter(pl.col("reason").is_null()).with_columns(
        pl.when(~first).then(pl.lit(Reason.DUPLICATE_ITEM_ID.value)).alias("reason"))
    df = pl.concat([ok, df.filter(pl.col("reason").is_not_null())]).sort("source_file", "source_row")
    valid = df.filter(pl.col("reason").is_null()).select(list(ITEM_FIELDS))
    return valid, df.filter(pl.col("reason").is_not_null())
