"""Generic contract reader: file discovery (flat / dt= partitioned), typed Parquet columns, ISO
timestamps, and clear errors for unusable paths before any Ray work."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest
import ray

from gems.data.events import InputError, count_rows, list_input_files, read_raw
from gems.data.validate import ValidationParams, parse_iso_ts, validate_events
from tune.config import load_config
from tune.ingest.preprocess import run_preprocess

PARAMS = ValidationParams(now_ts=1_800_000_000, future_ts_tolerance_s=0, query_max_chars=16,
                          num_buckets=4)


def test_discovers_partitions_in_order_and_skips_hidden_files(tmp_path: Path) -> None:
    for day in ("2025-01-02", "2025-01-01"):
        (tmp_path / f"dt={day}").mkdir()
        (tmp_path / f"dt={day}" / "a.jsonl").write_text("")
    (tmp_path / "dt=2025-01-01" / "b.parquet").write_bytes(b"")
    (tmp_path / "dt=2025-01-01" / "_SUCCESS").write_text("")
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "x.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("")
    specs = list_input_files(tmp_path)
    assert [(s.rel, s.dt, s.fmt) for s in specs] == [
        ("dt=2025-01-01/a.jsonl", "2025-01-01", "jsonl"),
        ("dt=2025-01-01/b.parquet", "2025-01-01", "parquet"),
        ("dt=2025-01-02/a.jsonl", "2025-01-02", "jsonl"),
    ]
    flat = list_input_files(tmp_path / "dt=2025-01-02" / "a.jsonl")
    assert [(s.rel, s.dt) for s in flat] == [("a.jsonl", None)]


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "holds no"),
    (lambda p: (p.parent / "x.csv").write_text("") and None, "does not exist"),
    (lambda p: (p / "dt=2025-13-01").mkdir(parents=True) or (p / "dt=2025-13-01" / "a.jsonl").write_text(""),
     "dt=YYYY-MM-DD"),
])
def test_unusable_inputs_are_named(tmp_path: Path, setup, match: str) -> None:
    path = tmp_path / "events"
    setup(path)
    with pytest.raises(InputError, match=match):
        list_input_files(path)


def test_unsupported_file_type_is_named(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported file type"):
        list_input_files(tmp_path / "events.csv")


def test_missing_input_fails_before_ray_starts(tmp_path: Path) -> None:
    if ray.is_initialized():
        ray.shutdown()
    cfg = load_config("tiny", [f"state_dir={tmp_path}", "data.source=events", "data.path=nope",
                               "data.items_path=nope_items"])
    with pytest.raises(InputError, match="data.path does not exist"):
        run_preprocess(cfg)
    assert not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_typed_parquet_columns_are_mapped_onto_the_contract(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pl.DataFrame({
        "user_id": [1, 2, 3, 4],
        "ts": [dt.datetime(2025, 1, 1, 0, 0, 1), dt.datetime(2025, 1, 1), None, dt.datetime(2025, 1, 2)],
        "task": ["rec", "search", "rec", "rec"],
        "query": [None, "x" * 40, None, None],
        "item_id": [10, 11, 12, 13],
        "clicked": [1, 0, 1, 2],
        "extra": ["ignored"] * 4,
    }).write_parquet(path)
    (spec,) = list_input_files(path)
    raw, original = read_raw(spec)
    staged = validate_events(raw, pl.Series(["10", "11", "12", "13"]), PARAMS)
    assert staged["user_id"].to_list() == ["1", "2", "3", "4"]
    assert staged["ts"].to_list()[:2] == [1_735_689_601, 1_735_689_600]
    assert staged["clicked"].to_list()[:2] == [True, False]
    assert staged["reason"].to_list() == [None, None, "missing_ts", "wrong_type"]
    assert staged["query"][1] == "x" * 16
    assert staged["query_truncated"].to_list() == [False, True, False, False]
    assert staged["source_row"].to_list() == [0, 1, 2, 3] and count_rows(spec) == 4
    assert original is not None and original.height == 4


@pytest.mark.parametrize("text,expected", [
    ("2025-01-01T00:00:00Z", 1_735_689_600),
    ("2025-01-01T02:00:00+02:00", 1_735_689_600),
    ("2025-01-01 00:00:00", 1_735_689_600),
    ("2025-01-01", 1_735_689_600),
    (" 1735689600 ", 1_735_689_600),
    ("1.7356896e9", 1_735_689_600),
    ("yesterday", None),
    ("nan", None),
    ("", None),
])
def test_iso_and_numeric_timestamp_strings(text: str, expected: int | None) -> None:
    assert parse_iso_ts(text) == expected


def test_jsonl_row_count_ignores_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text('{"a":1}\n\n   \n{"a":2}\n')
    (spec,) = list_input_files(path)
    assert count_rows(spec) == 2
    raw, _ = read_raw(spec)
    assert raw["source_row"].to_list() == [1, 4]
