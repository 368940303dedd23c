"""Generic reader for contract-format logs: JSONL or Parquet, one file or a directory, flat or
partitioned ``dt=YYYY-MM-DD/``.

A file is read as a typed table when it can be (pyarrow's strict JSON reader, Parquet); only a file
that will not parse as a table (bad bytes, bad JSON, mixed types) falls back to per-line typing, so
the common case stays vectorised and the broken case still quarantines row by row.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from gems.data.schema import EVENT_FIELDS, FieldKind, conform, raw_schema
from gems.data.validate import type_columns, type_json_lines

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
_DT_DIR = re.compile(r"^dt=(.*)$")


class InputError(ValueError):
    """An input path or layout that cannot be read; the message names the path and the problem."""


@dataclass(frozen=True)
class FileSpec:
    """One input file: where it is, how it is shown in quarantine/manifest, and its day partition."""

    path: str
    rel: str
    dt: str | None
    fmt: str  # "jsonl" | "parquet"

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass
class AdapterOutput:
    """Contract-format events and items built by an adapter (Qilin, Amazon), plus what it did."""

    events: pl.DataFrame
    items: pl.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
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


def list_input_files(path: str | Path, what: str = "events") -> list[FileSpec]:
    """Every JSONL/Parquet file under ``path`` in a stable order; a clear error when there is none."""
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"{what} input path does not exist: {root}")
    if root.is_file():
        fmt = _format_of(root)
        if fmt is None:
            raise InputError(f"{what} input {root}: unsupported file type (want "
                             f"{', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)})")
        return [FileSpec(str(root), root.name, None, fmt)]
    specs = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith((".", "_")) for part in rel.parts):
            continue
        fmt = _format_of(p)
        if fmt is not None:
            specs.append(FileSpec(str(p), rel.as_posix(), _partition_of(rel, root), fmt))
    if not specs:
        raise InputError(f"{what} input directory {root} holds no "
                         f"{'/'.join(JSON_SUFFIXES + PARQUET_SUFFIXES)} files")
    return specs


def _nonblank_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield lineno, line


def count_rows(spec: FileSpec) -> int:
    """Rows a file holds, counted independently of parsing (for the rows_in accounting)."""
    if spec.fmt == "parquet":
        return pq.ParquetFile(spec.path).metadata.num_rows
    return sum(1 for _ in _nonblank_lines(Path(spec.path).read_bytes()))


def read_table(spec: FileSpec) -> pl.DataFrame | None:
    """The file as a typed table, or None when only per-line reading can make sense of it."""
    if spec.fmt == "parquet":
        return pl.read_parquet(spec.path)
    data = Path(spec.path).read_bytes()
    if not data.strip():
        return pl.DataFrame()
    try:
        table = pa_json.read_json(io.BytesIO(data),
                                  read_options=pa_json.ReadOptions(block_size=max(1 << 20, len(data) + 1)))
    except (pa.ArrowInvalid, UnicodeDecodeError, pa.ArrowNotImplementedError):
        return None
    # pyarrow skips blank lines but numbers rows densely; per-line reading keeps line numbers
    lines = [lineno for lineno, _ in _nonblank_lines(data)]
    if len(lines) != table.num_rows:
        return None
    return pl.from_arrow(table).with_columns(pl.Series("_lineno", lines, dtype=pl.Int64))


def read_raw(spec: FileSpec, fields: dict[str, FieldKind] = EVENT_FIELDS
             ) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """(raw rows in ``raw_schema(fields)`` layout, the typed source table for quarantine's raw text or None).

    ``source_row`` is the 1-based line number for JSONL and the 0-based row index for Parquet.
    """
    table = read_table(spec)
    if table is None:
        raw = type_json_lines(_nonblank_lines(Path(spec.path).read_bytes()), fields)
        original = None
    else:
        if "_lineno" in table.columns:
            rows = table["_lineno"]
            table = table.drop("_lineno")
        else:
            rows = pl.int_range(0, table.height, eager=True, dtype=pl.Int64)
        raw = type_columns(table, fields).with_columns(rows.alias("source_row"))
        original = table
    raw = raw.with_columns(pl.lit(spec.rel).alias("source_file"), pl.lit(spec.dt).alias("dt"))
    return conform(raw, raw_schema(fields)), original
