"""Generic reader for contract-format logs: JSONL (plain, gzip or zstd) or Parquet, one file or a
directory, flat or partitioned ``dt=YYYY-MM-DD/``. Other files in a directory are listed as skipped
(the manifest's ``skipped_files``), never ignored silently.

JSONL is typed one line at a time, never inferred as a table: with a file-wide type inference one
row's float id, a BOM or a NaN changed the verdict of its neighbours. Parquet is typed per column
(a Parquet column has one type by construction), and only its contract columns are read. A file
that cannot be read at all (a damaged Parquet footer, a truncated gzip) is an ``InputError`` naming
it: its rows cannot be counted, so no row-level quarantine could account for them.
"""

from __future__ import annotations

import gzip
import logging
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gems.data.schema import (
    EVENT_FIELDS,
    MAX_JSON_DEPTH,
    SOURCE_ERROR_COLUMN,
    FieldKind,
    Reason,
    conform,
    raw_schema,
)
from gems.data.validate import type_columns, type_json_lines

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
"""JSONL may be compressed as a whole file (``events.jsonl.gz``, ``events.jsonl.zst``)."""
SUPPORTED = (*JSON_SUFFIXES, *(j + c for j in JSON_SUFFIXES for c in COMPRESSION_SUFFIXES),
             *PARQUET_SUFFIXES)
_DT_DIR = re.compile(r"^dt=(.*)$")
log = logging.getLogger("gems.data")


class InputError(ValueError):
    """An input path or layout that cannot be read; the message names the path and the problem."""


@dataclass(frozen=True)
class FileSpec:
    """One input file: where it is, how it is shown in quarantine/manifest, and its day partition."""

    path: str
    rel: str
    dt: str | None
    fmt: str  # "jsonl" | "parquet"
    compression: str | None = None  # JSONL only: "gzip" | "zstd"

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass
class AdapterOutput:
    """Contract-format events and items built by an adapter (Qilin, Amazon), plus what it did."""

    events: pl.DataFrame
    items: pl.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


def _format_of(path: Path) -> tuple[str, str | None] | None:
    """(format, compression) from the file name, or None for a file this reader does not read."""
    name = path.name.lower()
    compression = None
    for suffix, codec in COMPRESSION_SUFFIXES.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], codec
            break
    if name.endswith(JSON_SUFFIXES):
        return "jsonl", compression
    if name.endswith(PARQUET_SUFFIXES) and compression is None:
        return "parquet", None
    return None


def _partition_of(rel: Path, root: Path) -> str | None:
    dt = None
    for part in rel.parts[:-1]:
        m = _DT_DIR.match(part)
        if m:
            try:
                date.fromisoformat(m.group(1))
            except ValueError:
                raise InputError(f"{root / rel}: partition directory {part!r} is not "
                                 "dt=YYYY-MM-DD") from None
            if len(m.group(1)) != 10:
                raise InputError(f"{root / rel}: partition directory {part!r} is not dt=YYYY-MM-DD")
            dt = m.group(1)
    return dt


@dataclass(frozen=True)
class InputListing:
    """The files a path holds that will be read, and those that will not (with why)."""

    files: list[FileSpec]
    skipped: list[dict[str, str]]


def _unsupported(name: str) -> str:
    kind = Path(name).suffix or "without a suffix"
    return (f"unsupported file type {kind} (read: {'/'.join(JSON_SUFFIXES)} JSONL, plain or "
            f"{'/'.join(COMPRESSION_SUFFIXES)}, and {'/'.join(PARQUET_SUFFIXES)} Parquet)")


def scan_input_files(path: str | Path, what: str = "events") -> InputListing:
    """Every readable file under ``path`` in a stable order, and every other file as skipped.

    Hidden and ``_``-prefixed files and directories (``.crc``, ``_SUCCESS``, temporary output) are
    not input by the usual data-lake convention and are not listed. A clear error when nothing is
    readable.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"{what} input path does not exist: {root}")
    if root.is_file():
        kind = _format_of(root)
        if kind is None:
            raise InputError(f"{what} input {root}: {_unsupported(root.name)}")
        return InputListing([FileSpec(str(root), root.name, None, kind[0], kind[1])], [])
    specs, skipped = [], []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith((".", "_")) for part in rel.parts):
            continue
        kind = _format_of(p)
        if kind is None:
            skipped.append({"path": rel.as_posix(), "what": what, "why": _unsupported(p.name)})
        else:
            specs.append(FileSpec(str(p), rel.as_posix(), _partition_of(rel, root), kind[0], kind[1]))
    if not specs:
        others = f" (skipped: {', '.join(s['path'] for s in skipped[:5])})" if skipped else ""
        raise InputError(f"{what} input directory {root} holds no JSONL or Parquet files "
                         f"({', '.join(SUPPORTED)}){others}")
    return InputListing(specs, skipped)


def list_input_files(path: str | Path, what: str = "events") -> list[FileSpec]:
    """The readable files of ``scan_input_files``; each skipped one is logged as a warning."""
    listing = scan_input_files(path, what)
    for s in listing.skipped:
        log.warning("%s input %s: skipped, %s", what, s["path"], s["why"])
    return listing.files


def _nonblank_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield lineno, line


def read_bytes(spec: FileSpec) -> bytes:
    """A JSONL file's bytes, decompressed; a damaged file is an InputError naming it."""
    try:
        if spec.compression == "gzip":
            return gzip.decompress(Path(spec.path).read_bytes())
        if spec.compression == "zstd":
            with pa.input_stream(spec.path, compression="zstd") as stream:
                return stream.read()
        return Path(spec.path).read_bytes()
    except (OSError, EOFError, zlib.error, pa.ArrowException) as err:
        raise InputError(f"{spec.path}: cannot read {spec.compression or 'the'} file: {err}") from None


def _parquet_error(spec: FileSpec, err: Exception) -> InputError:
    return InputError(f"{spec.path}: unreadable Parquet file ({type(err).__name__}: {err}); its rows "
                      "cannot be counted, so the run stops rather than guess. Replace the file, or "
                      "rename it with a leading '_' to leave it out")


def count_rows(spec: FileSpec) -> int:
    """Rows a file holds, counted independently of parsing (for the rows_in accounting)."""
    if spec.fmt == "parquet":
        try:
            return pq.ParquetFile(spec.path).metadata.num_rows
        except (OSError, pa.ArrowException) as err:
            raise _parquet_error(spec, err) from None
    return sum(1 for _ in _nonblank_lines(read_bytes(spec)))


def _type_depth(t: pa.DataType) -> int:
    if pa.types.is_struct(t):
        return 1 + max((_type_depth(t.field(i).type) for i in range(t.num_fields)), default=0)
    if pa.types.is_map(t):
        return 1 + max(_type_depth(t.key_type), _type_depth(t.item_type))
    if isinstance(t, pa.ListType | pa.LargeListType | pa.FixedSizeListType | pa.ListViewType
                  | pa.LargeListViewType):
        return 1 + _type_depth(t.value_type)
    if pa.types.is_dictionary(t):
        return _type_depth(t.value_type)
    return 0


def type_depth(t: pa.DataType) -> int:
    """Nesting depth of an Arrow type (a deep type is never handed to polars, which recursed into
    1,000 levels until it crashed)."""
    try:
        return _type_depth(t)
    except RecursionError:
        return sys.getrecursionlimit()


def read_parquet(spec: FileSpec, fields: dict[str, FieldKind]) -> pl.DataFrame:
    """A Parquet file's columns and its row index ``_lineno``, except columns of a nested type
    deeper than ``MAX_JSON_DEPTH``: an extra one is never read; a contract one is not converted,
    and its non-null rows are marked ``too_deeply_nested`` through the ``source_error`` column.
    """
    try:
        pf = pq.ParquetFile(spec.path)
        schema = pf.schema_arrow
        depth = {schema.field(i).name: type_depth(schema.field(i).type) for i in range(len(schema))}
        names = [n for n, d in depth.items()
                 if d <= MAX_JSON_DEPTH or n in fields or n == SOURCE_ERROR_COLUMN]
        table = pf.read(columns=names)
    except (OSError, pa.ArrowException) as err:
        raise _parquet_error(spec, err) from None
    too_deep = [n for n in names if depth[n] > MAX_JSON_DEPTH]
    if too_deep:
        marks = pa.nulls(table.num_rows, pa.string())
        for name in too_deep:
            col = table.column(name)
            marks = pc.if_else(pc.is_valid(col), pa.scalar(Reason.TOO_DEEPLY_NESTED.value), marks)
            table = table.drop_columns([name])
        if SOURCE_ERROR_COLUMN in table.column_names:
            given = table.column(SOURCE_ERROR_COLUMN).cast(pa.string())
            marks = pc.coalesce(given, marks)
            table = table.drop_columns([SOURCE_ERROR_COLUMN])
        table = table.append_column(SOURCE_ERROR_COLUMN, marks)
    table = table.append_column("_lineno", pa.array(range(table.num_rows), pa.int64()))
    return pl.from_arrow(table)


def read_raw(spec: FileSpec, fields: dict[str, FieldKind] = EVENT_FIELDS
             ) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """(raw rows in ``raw_schema(fields)`` layout, the typed source table for quarantine's raw text or None).

    JSONL is typed line by line (``type_json_lines``: a row's verdict depends on its own bytes
    only); Parquet column by column. ``source_row`` is the 1-based line number for JSONL and the
    0-based row index for Parquet.
    """
    if spec.fmt == "parquet":
        table = read_parquet(spec, fields)  # _lineno keeps the height when no contract column exists
        raw = type_columns(table, fields).with_columns(table["_lineno"].alias("source_row"))
        original = table.drop("_lineno")
        raw = raw.with_columns(pl.lit(spec.rel).alias("source_file"), pl.lit(spec.dt).alias("dt"))
        return conform(raw, raw_schema(fields)), original
    return raw_from_jsonl(read_bytes(spec), spec.rel, spec.dt, fields), None


def raw_from_jsonl(data: bytes, rel: str, dt: str | None,
                   fields: dict[str, FieldKind] = EVENT_FIELDS) -> pl.DataFrame:
    """A JSONL file's bytes -> raw rows, one verdict per non-blank line."""
    raw = type_json_lines(_nonblank_lines(data), fields)
    raw = raw.with_columns(pl.lit(rel).alias("source_file"), pl.lit(dt).alias("dt"))
    return conform(raw, raw_schema(fields))
