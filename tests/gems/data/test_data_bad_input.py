"""Bad input never crashes or hangs preprocessing, and never decides a neighbour's fate (issue 12).

Row-level cases go through the reader and validation directly; run-level cases through the
single-process pipeline (gems.data.inprocess: the same prepare/validate/finalize as the Ray Data
job, no Ray). tests/data/README.md lists every case with its quarantine reason.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gems.config import Config
from gems.data.events import InputError, count_rows, list_input_files, read_raw
from gems.data.inprocess import preprocess_inprocess
from gems.data.plan import NoExamplesError, check_inputs
from gems.data.validate import ValidationParams, validate_events
from tune.config import load_config

NOW = 1_800_000_000
PARAMS = ValidationParams(now_ts=NOW, future_ts_tolerance_s=0, query_max_chars=64, num_buckets=4)
ITEM_IDS = pl.Series("item_id", ["i1", "i2"])
OK = b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":"i1"}'  # 2025-03-01T00:00:00Z
DEEP = b"[" * 1000 + b"]" * 1000


def verdicts(tmp_path: Path, lines: list[bytes], name: str = "e.jsonl") -> pl.DataFrame:
    """Staged rows of one JSONL file made of ``lines`` (reader + validation, as a Ray task does)."""
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    (spec,) = list_input_files(path)
    raw, original = read_raw(spec)
    assert raw.height == count_rows(spec) == sum(1 for line in lines if line.strip())
    return validate_events(raw, ITEM_IDS, PARAMS)


# (case, line, expected reason or None = valid). Issue 12's inputs first, then the contract's rules.
BAD_ROWS: list[tuple[str, bytes, str | None]] = [
    ("ts 1e30 as a string", b'{"user_id":"a","ts":"1e30","task":"rec","item_id":"i1"}', "ts_out_of_range"),
    ("int ts >= 2**63", b'{"user_id":"a","ts":9223372036854775808,"task":"rec","item_id":"i1"}',
     "ts_out_of_range"),
    ("int ts of 40 digits", b'{"user_id":"a","ts":' + b"9" * 40 + b',"task":"rec","item_id":"i1"}',
     "ts_out_of_range"),
    ("float ts overflowing to inf", b'{"user_id":"a","ts":1e999,"task":"rec","item_id":"i1"}',
     "ts_out_of_range"),
    ("ts -1e30", b'{"user_id":"a","ts":-1e30,"task":"rec","item_id":"i1"}', "ts_out_of_range"),
    ("int64 max ts is merely in the future",
     b'{"user_id":"a","ts":9223372036854775807,"task":"rec","item_id":"i1"}', "ts_in_future"),
    ("1,000 nested [ in an ignored field",
     b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":"i1","x":' + DEEP + b"}",
     "too_deeply_nested"),
    ("100,000 unclosed [", b'{"x":' + b"[" * 100_000, "too_deeply_nested"),
    ("1,000 [ inside a string are text",
     b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":"i1","x":"' + b"[" * 1000 + b'"}', None),
    ("60 nested [ are allowed",
     b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":"i1","x":' + b"[" * 60 + b"]" * 60
     + b"}", None),
    ("integer user_id", b'{"user_id":1,"ts":1740787200,"task":"rec","item_id":"i1"}', None),
    ("float user_id", b'{"user_id":2.5,"ts":1740787200,"task":"rec","item_id":"i1"}', "wrong_type"),
    ("BOM before the row", b"\xef\xbb\xbf" + OK, None),
    ("NaN ts", b'{"user_id":"a","ts":NaN,"task":"rec","item_id":"i1"}', "wrong_type"),
    ("NaN in an ignored field", b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":"i1","x":NaN}',
     None),
    ("duplicate key", b'{"user_id":"a","user_id":"b","ts":1740787200,"task":"rec","item_id":"i1"}',
     "duplicate_key"),
    ("duplicate key in a nested object",
     b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":"i1","x":{"k":1,"k":2}}', "duplicate_key"),
    ("NUL in user_id", b'{"user_id":"a\\u0000b","ts":1740787200,"task":"rec","item_id":"i1"}',
     "control_char_in_id"),
    ("NUL in item_id", b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":"i1\\u0000"}',
     "control_char_in_id"),
    ("raw 0xFF byte", b'{"user_id":"a\xff","ts":1740787200,"task":"rec","item_id":"i1"}', "invalid_utf8"),
    ("lone surrogate", b'{"user_id":"a\\ud800","ts":1740787200,"task":"rec","item_id":"i1"}',
     "invalid_utf8"),
    ("truncated JSON", b'{"user_id": "a", "ts": 17', "malformed_json"),
    ("JSON array line", b"[1, 2]", "malformed_json"),
    ("BOM only", b"\xef\xbb\xbf", "malformed_json"),
    ("ts as a list", b'{"user_id":"a","ts":[1740787200],"task":"rec","item_id":"i1"}', "wrong_type"),
    ("clicked as a string", b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":"i1","clicked":"yes"}',
     "wrong_type"),
    ("no user_id", b'{"ts":1740787200,"task":"rec","item_id":"i1"}', "missing_user_id"),
    ("unknown task", b'{"user_id":"a","ts":1740787200,"task":"browse","item_id":"i1"}', "unknown_task"),
    ("no ts", b'{"user_id":"a","task":"rec","item_id":"i1"}', "missing_ts"),
    ("ts 'yesterday'", b'{"user_id":"a","ts":"yesterday","task":"rec","item_id":"i1"}', "unparsable_ts"),
    ("negative ts", b'{"user_id":"a","ts":-5,"task":"rec","item_id":"i1"}', "negative_ts"),
    ("ts in 2100", b'{"user_id":"a","ts":4102444800,"task":"rec","item_id":"i1"}', "ts_in_future"),
    ("null item_id", b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":null}', "null_item_id"),
    ("search without query", b'{"user_id":"a","ts":1740787200,"task":"search","item_id":"i1"}',
     "search_without_query"),
    ("unknown item", b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":"i9"}', "unknown_item_id"),
]


@pytest.mark.parametrize("case,line,reason", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_every_bad_row_gets_its_reason_alone_and_among_valid_rows(tmp_path: Path, case: str,
                                                                   line: bytes, reason: str | None) -> None:
    alone = verdicts(tmp_path, [line])
    assert alone["reason"].to_list() == [reason], alone.select("reason", "detail").to_dicts()
    if reason is not None:
        assert alone["detail"][0] or reason in {"missing_user_id", "unknown_task", "missing_ts",
                                                "unparsable_ts", "negative_ts", "ts_in_future",
                                                "null_item_id", "search_without_query",
                                                "unknown_item_id"}, "the detail names what is wrong"
        assert alone["raw"][0] is not None  # the offending row is kept, not dropped
    # the same row between valid neighbours (and with an integer id beside it): same verdict
    mixed = verdicts(tmp_path, [OK, line, b'{"user_id":7,"ts":1740787200,"task":"rec","item_id":"i2"}'])
    assert mixed["reason"].to_list() == [None, reason, None]


def test_the_issue_repro_lines_in_one_file(tmp_path: Path) -> None:
    """Issue 12, items 1/3: the whole file used to crash (Int128) or be quarantined as one."""
    staged = verdicts(tmp_path, [
        b'{"user_id":1,"ts":1740787200,"task":"rec","item_id":"i1"}',
        b'{"user_id":2,"ts":1740787200,"task":"rec","item_id":"i1"}',
        b'{"user_id":2.5,"ts":1740787200,"task":"rec","item_id":"i1"}',
        b'{"user_id":"a","ts":"1e30","task":"rec","item_id":"i1"}',
        b'{"user_id":"a","ts":9223372036854775808,"task":"rec","item_id":"i1"}',
        b"not json",
    ])
    assert staged["reason"].to_list() == [None, None, "wrong_type", "ts_out_of_range",
                                          "ts_out_of_range", "malformed_json"]
    assert staged["user_id"].to_list()[:2] == ["1", "2"]
    assert "1e30" in staged["detail"][3] and "user_id" in staged["detail"][2]


def test_parquet_timestamps_outside_int64_are_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pl.DataFrame({"user_id": ["a", "b", "c", "d"], "ts": [1e30, float("inf"), float("nan"), 1740787200.5],
                  "task": ["rec"] * 4, "item_id": ["i1"] * 4}).write_parquet(path)
    unsigned = tmp_path / "u.parquet"
    pl.DataFrame({"user_id": ["a", "b"], "ts": pl.Series([2**63, 1740787200], dtype=pl.UInt64),
                  "task": ["rec"] * 2, "item_id": ["i1"] * 2}).write_parquet(unsigned)
    reasons = []
    for p in (path, unsigned):
        (spec,) = list_input_files(p)
        raw, _ = read_raw(spec)
        reasons += validate_events(raw, ITEM_IDS, PARAMS)["reason"].to_list()
    assert reasons == ["ts_out_of_range", "ts_out_of_range", "wrong_type", None, "ts_out_of_range", None]


def test_deeply_nested_parquet_columns_are_never_converted(tmp_path: Path) -> None:
    """A nested extra column is not read at all; a nested contract column quarantines its rows."""
    deep_type: pa.DataType = pa.int64()
    for _ in range(100):  # > MAX_JSON_DEPTH; pyarrow cannot read its own schema past ~150
        deep_type = pa.list_(deep_type)
    deep = pa.array([None, None], deep_type)
    table = pa.table({"user_id": ["a", "b"], "ts": [1740787200, 1740787200], "task": ["rec", "rec"],
                      "item_id": ["i1", None], "extra": deep})
    pq.write_table(table, tmp_path / "extra.parquet")
    shallow = pa.array([[[1]], None], pa.list_(pa.list_(pa.int64())))
    pq.write_table(table.set_column(0, "user_id", shallow), tmp_path / "shallow.parquet")
    pq.write_table(table.set_column(0, "user_id", pa.array([[], None], deep_type)),
                   tmp_path / "contract.parquet")
    out = {}
    for spec in list_input_files(tmp_path):
        raw, original = read_raw(spec)
        out[spec.rel] = validate_events(raw, ITEM_IDS, PARAMS)["reason"].to_list()
    assert out == {"extra.parquet": [None, "null_item_id"],
                   "shallow.parquet": ["wrong_type", "missing_user_id"],
                   "contract.parquet": ["too_deeply_nested", "missing_user_id"]}


# ---------------------------------------------------------------------------------------------
# Run level: files, layouts and outputs (single-process pipeline, no Ray)


def _items(root: Path) -> Path:
    path = root / "items.jsonl"
    path.write_text('{"item_id":"i1","title":"Blue pen"}\n{"item_id":"i2","title":"Stapler"}\n')
    return path


def _cfg(root: Path, *overrides: str) -> Config:
    return load_config("tiny", [f"state_dir={root}", "data.source=events", f"data.path={root / 'ev'}",
                                f"data.items_path={_items(root)}", f"data.now_ts={NOW}",
                                f"data.output_dir={root / 'out'}", *overrides])


def _day(root: Path) -> Path:
    day = root / "ev" / "dt=2025-03-01"
    day.mkdir(parents=True, exist_ok=True)
    return day


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def _rows(*users: str, ts: int = 1740787200) -> bytes:
    return b"".join(b'{"user_id":"%s","ts":%d,"task":"rec","item_id":"i1"}\n' % (u.encode(), ts)
                    for u in users)


def setup_compressed_and_other_files(day: Path) -> None:
    (day / "a.jsonl").write_bytes(_rows("a"))
    (day / "b.jsonl.gz").write_bytes(gzip.compress(_rows("b", "c")))
    (day / "c.ndjson.zst").write_bytes(_zstd(_rows("d")))
    (day / "notes.csv").write_text("user_id,ts\n")
    (day / "_SUCCESS").write_text("")


def setup_only_empty_files(day: Path) -> None:
    (day / "a.jsonl").write_bytes(b"")
    (day / "b.jsonl").write_bytes(b"\n  \n")


def setup_corrupt_parquet(day: Path) -> None:
    (day / "a.jsonl").write_bytes(_rows("a"))
    (day / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file at all PAR1")


def damage_data_pages(path: Path) -> None:
    """Overwrite everything between the magic bytes and the footer: the row count still reads."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4:len(data) - 8 - footer] = b"Z" * (len(data) - 12 - footer)
    path.write_bytes(bytes(data))


def setup_damaged_parquet_pages(day: Path) -> None:
    (day / "a.jsonl").write_bytes(_rows("a"))
    pl.DataFrame({"user_id": ["b", "c"], "ts": [1740787200] * 2, "task": ["rec"] * 2,
                  "item_id": ["i1"] * 2}).write_parquet(day / "pages.parquet")
    damage_data_pages(day / "pages.parquet")


def setup_truncated_gzip(day: Path) -> None:
    (day / "a.jsonl").write_bytes(_rows("a"))
    (day / "cut.jsonl.gz").write_bytes(gzip.compress(_rows("b", "c") * 50)[:40])


def setup_all_quarantined(day: Path) -> None:
    (day / "a.jsonl").write_bytes(b'{"user_id":"a","ts":"1e30","task":"rec","item_id":"i1"}\n'
                                  b'{"user_id":2.5,"ts":1,"task":"rec","item_id":"i1"}\nnot json\n')


def setup_ts_outside_partition(day: Path) -> None:
    (day / "a.jsonl").write_bytes(_rows("a") + _rows("b", ts=1740787200 + 86_400) + _rows("c", ts=5))


def setup_output_parent_is_a_file(day: Path) -> None:
    (day / "a.jsonl").write_bytes(_rows("a"))


# (case, setup, extra overrides, expected: manifest checks or (error class, message pattern))
BAD_RUNS: list[tuple[str, Callable[[Path], None], tuple[str, ...], Any]] = [
    ("gzip/zstd JSONL read, csv listed as skipped", setup_compressed_and_other_files, (),
     {"rows_in": 4, "skipped": ["dt=2025-03-01/notes.csv"]}),
    ("only empty files", setup_only_empty_files, (), (InputError, r"hold no rows \(all empty\)")),
    ("corrupt Parquet file", setup_corrupt_parquet, (), (InputError, r"broken\.parquet: unreadable Parquet")),
    ("Parquet with damaged data pages", setup_damaged_parquet_pages, (),
     (InputError, r"pages\.parquet: unreadable Parquet")),
    ("truncated gzip", setup_truncated_gzip, (), (InputError, r"cut\.jsonl\.gz: cannot read gzip")),
    ("every row quarantined", setup_all_quarantined, (),
     (NoExamplesError, r"(?s)no examples: 3 rows in, 0 valid.*malformed_json=1, ts_out_of_range=1, "
                       r"wrong_type=1.*a\.jsonl:1 ts_out_of_range")),
    ("ts outside its dt= partition", setup_ts_outside_partition, (), {"rows_in": 3, "outside": 2}),
    ("output beside a file", setup_output_parent_is_a_file, ("data.output_dir=items.jsonl/out",),
     (InputError, r"data.output_dir .*items.jsonl/out: cannot write")),
]


@pytest.mark.parametrize("case,setup,overrides,expected", BAD_RUNS, ids=[c[0] for c in BAD_RUNS])
def test_bad_runs_end_in_a_named_error_or_an_honest_manifest(tmp_path: Path, case: str, setup,
                                                             overrides: tuple[str, ...], expected) -> None:
    setup(_day(tmp_path))
    cfg = _cfg(tmp_path, *overrides)
    if isinstance(expected, tuple):
        error, pattern = expected
        with pytest.raises(error, match=pattern):
            preprocess_inprocess(cfg)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
        return
    manifest = preprocess_inprocess(cfg)
    acc = manifest["accounting"]
    assert acc["rows_in"] == expected["rows_in"]
    assert acc["rows_in"] == acc["rows_valid"] + acc["rows_quarantined"] + acc["rows_deduplicated"]
    assert [s["path"] for s in manifest["skipped_files"]] == expected.get("skipped", [])
    assert all("unsupported file type" in s["why"] for s in manifest["skipped_files"])
    assert manifest["watermark"]["ts_outside_partition"] == expected.get("outside", 0)


def test_converted_sources_record_the_real_input(tmp_path: Path) -> None:
    """Amazon / Qilin are converted into a temporary folder that is deleted; the manifest names
    the source the user gave."""
    src = tmp_path / "amazon"
    src.mkdir()
    (src / "Office.inter.json").write_text(json.dumps({"0": [0, 1, 0, 1], "1": [1, 0, 1]}))
    (src / "Office.item.json").write_text(json.dumps({
        "0": {"title": "Blue pen", "categories": "Office, Pens", "brand": "X"},
        "1": {"title": "Heavy stapler", "categories": "Office, Staplers", "brand": "Y"}}))
    cfg = load_config("tiny", [f"state_dir={tmp_path}", "data.source=amazon", f"data.path={src}",
                               f"data.now_ts={NOW}"])
    manifest = preprocess_inprocess(cfg)
    assert manifest["inputs"]["events"] == str(src) == manifest["inputs"]["items"]
    assert manifest["inputs"]["converted_by"] == "gems.data.amazon"


@pytest.mark.parametrize("case,make,pattern", [
    ("missing events path", lambda root: None, "data.path does not exist"),
    ("only empty files", lambda root: setup_only_empty_files(_day(root)), "hold no rows"),
    ("only a csv", lambda root: (_day(root) / "x.csv").write_text("a\n"), r"holds no .*skipped: .*x\.csv"),
    ("output beside a file", lambda root: setup_output_parent_is_a_file(_day(root)), "cannot write"),
])
def test_cli_checks_inputs_and_output_before_ray_starts(tmp_path: Path, monkeypatch, capsys,
                                                        case: str, make, pattern: str) -> None:
    import ray

    from pipelines.preprocess import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the inputs were checked")

    monkeypatch.setattr(ray, "init", no_ray)
    make(tmp_path)
    out = "items.jsonl/out" if case == "output beside a file" else "out"
    code = main(["--config", "tiny", "--set", f"state_dir={tmp_path}", "--set", "data.source=events",
                 "--set", f"data.path={tmp_path / 'ev'}", "--set", f"data.items_path={_items(tmp_path)}",
                 "--set", f"data.output_dir={out}"])
    assert code == 5  # input data (pipelines/preflight.py), as in every job
    assert pattern and __import__("re").search(pattern, capsys.readouterr().err)


def test_cli_exits_non_zero_with_the_quarantine_summary_when_nothing_is_valid(
        tmp_path: Path, monkeypatch, capsys) -> None:
    """The exit-code mapping of pipelines/preprocess.py, with the single-process pipeline standing in
    for the Ray Data one (tests/gems/data/test_data_pipeline.py runs the same input on Ray)."""
    import ray

    import pipelines.preprocess as cli

    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(cli, "run_preprocess", preprocess_inprocess)
    setup_all_quarantined(_day(tmp_path))
    code = cli.main(["--config", "tiny", "--set", f"state_dir={tmp_path}", "--set", "data.source=events",
                     "--set", f"data.path={tmp_path / 'ev'}", "--set", f"data.items_path={_items(tmp_path)}",
                     "--set", f"data.now_ts={NOW}"])
    err = capsys.readouterr().err
    assert code == 5
    assert "ts_out_of_range=1" in err and "a.jsonl:2 wrong_type" in err


def test_summary_prints_a_range_of_days() -> None:
    from pipelines.preprocess import summary_of

    days = [f"2020-01-{d:02d}" for d in range(1, 32)]
    manifest = {"examples": 1, "counts": {}, "accounting": {}, "quarantine": {}, "repairs": {},
                "fingerprint": "f", "skipped_files": [{"path": "x.csv", "why": "unsupported file type"}],
                "watermark": {"partitions": [], "event_days": days, "max_ts": 1, "ts_outside_partition": 0}}
    summary = summary_of(manifest)
    assert summary["watermark"]["event_days"] == "2020-01-01 .. 2020-01-31 (31 days)"
    assert summary["skipped_files"] == ["x.csv: unsupported file type"]
    assert len(json.dumps(summary, indent=2).splitlines()) < 30


def test_output_check_refuses_an_unwritable_existing_directory(tmp_path: Path, monkeypatch) -> None:
    """Permission bits cannot bind root (these tests may run as root): os.access stands in."""
    from gems.data import plan

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(plan.os, "access", lambda p, mode: Path(p) != out)
    with pytest.raises(InputError, match="exists and is not writable"):
        plan.check_output_dir(out)
    monkeypatch.undo()
    plan.check_output_dir(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the probe leaves nothing behind


def test_check_inputs_passes_good_inputs(tmp_path: Path) -> None:
    (_day(tmp_path) / "a.jsonl").write_bytes(_rows("a"))
    check_inputs(_cfg(tmp_path))


class _LocalDataset:
    """Just enough of a Ray Dataset to run the preprocessing stages in this process and record the
    options each Ray Data call gets (tests/gems/data/test_data_pipeline.py runs them on real Ray)."""

    def __init__(self, rows: list[dict[str, Any]], calls: list[tuple[str, dict[str, Any]]]) -> None:
        self.rows, self.calls = rows, calls

    def map_batches(self, fn, *, fn_kwargs: dict[str, Any], **options: Any) -> _LocalDataset:
        self.calls.append(("map_batches", options))
        out = [r for row in self.rows for r in fn(pa.Table.from_pylist([row]), **fn_kwargs).to_pylist()]
        return _LocalDataset(out, self.calls)

    def write_parquet(self, path: str, *, partition_cols: list[str], **options: Any) -> None:
        self.calls.append(("write_parquet", options))
        if self.rows:
            pl.DataFrame(self.rows).write_parquet(path, partition_by=partition_cols)

    def take_all(self) -> list[dict[str, Any]]:
        return self.rows


@pytest.fixture
def local_ray_data(monkeypatch) -> list[tuple[str, dict[str, Any]]]:
    """Ray Data replaced by ``_LocalDataset`` (and Ray refused): the calls it received."""
    import ray

    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no Ray")))
    monkeypatch.setattr(ray, "put", lambda value: value)
    monkeypatch.setattr(ray.data, "from_items", lambda rows, **k: _LocalDataset(list(rows), calls))
    return calls


def test_every_ray_data_call_of_preprocessing_has_bounded_retries(tmp_path: Path, local_ray_data) -> None:
    """Ray Data retries a task whose worker died forever by default (max_retries=-1): a crashing
    input hung the job for good (issue 12, item 2)."""
    from tune.ingest import preprocess as stage

    (_day(tmp_path) / "a.jsonl").write_bytes(_rows("a", "b") + b"not json\n")
    manifest = stage.run_preprocess(_cfg(tmp_path))
    assert manifest["accounting"]["rows_quarantined"] == 1 and manifest["examples"] == 2
    assert [name for name, _ in local_ray_data] == ["map_batches", "write_parquet", "map_batches"]
    for name, options in local_ray_data:
        retries = options.get("max_retries", options.get("ray_remote_args", {}).get("max_retries"))
        assert retries is not None and 0 <= retries <= 3, (name, options)


def test_a_file_a_ray_task_cannot_read_is_named_by_the_driver(tmp_path: Path, local_ray_data) -> None:
    """Damaged Parquet pages are found inside a validation task (the footer, read by the driver, is
    fine): the stage still ends in an InputError naming the file, not a worker traceback."""
    from tune.ingest import preprocess as stage

    setup_damaged_parquet_pages(_day(tmp_path))
    with pytest.raises(InputError, match=r"pages\.parquet: unreadable Parquet"):
        stage.run_preprocess(_cfg(tmp_path))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
