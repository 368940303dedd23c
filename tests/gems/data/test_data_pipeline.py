"""The Ray Data preprocessing pipeline end to end: quarantine, accounting, determinism, atomic
re-runs, equality with the single-process reference, Qilin's real files, the user subset.

Ray starts once for this module (2 CPUs, no dashboard)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import ray

from gems.config import Config
from gems.data.inprocess import preprocess_inprocess
from gems.data.plan import NoExamplesError
from gems.data.schema import SHARD_SCHEMA, SPLITS
from gems.data.shards import read_items, read_manifest, read_quarantine, read_split
from gems.paths import shared_file
from pipelines.preprocess import main as preprocess_main
from tune.config import load_config
from tune.ingest.preprocess import run_preprocess

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[2] / "data"  # tests/data
NOW = 1_800_000_000
# line of tests/data/bad_events/dt=2025-01-01/events.jsonl -> the reason it must be quarantined with
EXPECTED_REASONS = {
    11: "duplicate_event", 12: "malformed_json", 13: "missing_user_id", 14: "missing_user_id",
    15: "unknown_task", 16: "search_without_query", 17: "unknown_item_id", 18: "null_item_id",
    19: "unparsable_ts", 20: "ts_in_future", 21: "negative_ts", 22: "invalid_utf8", 23: "wrong_type",
    24: "missing_ts", 25: "search_without_query", 26: "malformed_json", 27: "wrong_type",
    28: "invalid_utf8",
}


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(state: Path, *overrides: str) -> Config:
    return load_config("tiny", [f"state_dir={state}", f"data.now_ts={NOW}", *overrides])


@pytest.fixture
def bad_inputs(tmp_path: Path) -> Path:
    """The hand-written fixtures plus what is too big or binary to hand-write: a 1 MB query and a
    Parquet file whose ts column has the wrong type."""
    root = tmp_path / "raw"
    shutil.copytree(FIXTURES / "bad_events", root / "events")
    shutil.copytree(FIXTURES / "bad_items", root / "items")
    huge = '{"user_id":"u4","ts":1735700000,"task":"search","query":"%s","item_id":"2"}\n' % ("a" * 1_000_000)
    (root / "events" / "dt=2025-01-02" / "big.jsonl").write_text(huge)
    pl.DataFrame({"user_id": ["u5", "u6"], "ts": [[1735700000], [1]], "task": ["rec", "rec"],
                  "item_id": ["1", "2"]}).write_parquet(root / "events" / "dt=2025-01-02" / "typed.parquet")
    return root


def test_every_bad_input_is_quarantined_with_its_reason_and_nothing_is_lost(bad_inputs: Path,
                                                                              tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "state", "data.source=events", f"data.path={bad_inputs / 'events'}",
               f"data.items_path={bad_inputs / 'items'}", "data.query_max_chars=64")
    manifest = run_preprocess(cfg)
    out = cfg.resolve(cfg.data.output_dir)
    q = read_quarantine(out)
    lines = q.filter(pl.col("source_file") == "dt=2025-01-01/events.jsonl")
    assert dict(lines.select("source_row", "reason").iter_rows()) == EXPECTED_REASONS
    typed = q.filter(pl.col("source_file") == "dt=2025-01-02/typed.parquet")
    assert typed["reason"].to_list() == ["wrong_type", "wrong_type"]
    assert typed["detail"].str.contains("ts").all() and typed["raw"].str.contains("1735700000").any()

    acc = manifest["accounting"]
    assert acc["rows_in"] == 28 + 1 + 2  # fixture lines + 1 MB line + parquet rows; empty file adds 0
    assert acc["rows_in"] == acc["rows_valid"] + acc["rows_quarantined"] + acc["rows_deduplicated"]
    assert acc["rows_quarantined"] + acc["rows_deduplicated"] == q.height
    assert sum(manifest["quarantine"].values()) == acc["rows_quarantined"]
    assert manifest["repairs"] == {"rec_query_dropped": 1, "query_truncated": 1}
    assert manifest["items"]["quarantine"] == {"duplicate_item_id": 1, "malformed_json": 1,
                                               "missing_item_id": 1, "missing_title": 1}
    assert manifest["watermark"]["partitions"] == ["2025-01-01", "2025-01-02"]

    examples = pl.concat([read_split(out, s) for s in SPLITS])
    assert examples.height == acc["clicked"]
    big = examples.filter(pl.col("user_id") == "u4")
    assert big["query"].str.len_chars().to_list() == [64]
    dropped = examples.filter(pl.col("target_item_id") == "5")  # line 6: rec with a query
    assert dropped["query"].to_list() == [None] and "should be dropped" not in dropped["prompt"][0]
    assert examples.filter(pl.col("query") == "toner cartridge").height == 1  # whitespace normalised
    assert set(read_items(out)["item_id"]) == {"1", "2", "3", "4", "5", "6"}
    assert read_items(out).filter(pl.col("item_id") == "2")["title"].to_list() == ["Heavy Duty Stapler"]


def test_rerun_gives_the_same_bytes_and_no_duplicate_files(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "state", "data.synthetic_days=2")
    first = run_preprocess(cfg)
    out = cfg.resolve(cfg.data.output_dir)
    files_before = sorted(p.relative_to(out) for p in out.rglob("*"))
    second = run_preprocess(cfg)
    assert second["fingerprint"] == first["fingerprint"]
    assert second["files"] == first["files"]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files_before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    assert "items.parquet" in first["files"] and first["examples"] > 0
    for split in SPLITS:
        assert read_split(out, split).schema == pl.Schema(SHARD_SCHEMA)


def test_ray_pipeline_matches_the_single_process_reference(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "state", "data.synthetic_days=2", "data.num_buckets=3")
    ray_manifest = run_preprocess(cfg)
    ref_manifest = preprocess_inprocess(cfg, tmp_path / "reference")
    assert ray_manifest["fingerprint"] == ref_manifest["fingerprint"]
    assert ray_manifest["counts"] == ref_manifest["counts"]
    assert ray_manifest["examples"] > 0


@pytest.mark.skipif(shared_file("qilin_toy", "notes.csv") is None,
                    reason="shared Qilin toy files absent (../shared/data/qilin_toy)")
def test_qilin_toy_files_parse_and_unjoined_notes_are_quarantined(tmp_path: Path) -> None:
    """The toy logs reference notes that the toy notes.csv does not hold: every row is quarantined
    as unknown_item_id, so the run ends with the named no-examples error and its accounting (and
    publishes nothing) instead of succeeding with 0 examples."""
    cfg = _cfg(tmp_path / "state", "data.source=qilin", f"data.path={shared_file('qilin_toy')}")
    with pytest.raises(NoExamplesError) as err:
        run_preprocess(cfg)
    message = str(err.value)
    counts = re.search(r"(\d+) rows in, 0 valid \(0 clicked\), (\d+) quarantined, 0 duplicates", message)
    assert counts is not None and int(counts[1]) == int(counts[2]) > 0, message
    assert "unknown_item_id" in message
    assert not cfg.resolve(cfg.data.output_dir).exists()


def test_max_users_keeps_a_seeded_subset(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "state", "data.max_users=7")
    manifest = run_preprocess(cfg)
    out = cfg.resolve(cfg.data.output_dir)
    users = pl.concat([read_split(out, s) for s in SPLITS])["user_id"].unique()
    assert users.len() == 7 and manifest["users"] == 7
    assert manifest["accounting"]["rows_outside_user_subset"] > 0
    assert read_manifest(out)["fingerprint"] == manifest["fingerprint"]


def test_cli_smoke_test_and_input_errors(tmp_path: Path, capsys) -> None:
    assert preprocess_main(["--config", "tiny", "--smoke-test", "--set", f"state_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert '"fingerprint"' in out and str(tmp_path / "smoke" / "shards") in out
    assert read_manifest(tmp_path / "smoke" / "shards")["examples"] > 0
    code = preprocess_main(["--config", "tiny", "--set", f"state_dir={tmp_path}", "--set",
                            "data.source=events", "--set", "data.path=missing", "--set",
                            "data.items_path=missing"])
    assert code == 5 and "data.path does not exist" in capsys.readouterr().err


def test_issue_12_inputs_on_ray_end_in_quarantine_or_a_named_error(tmp_path: Path) -> None:
    """The inputs that crashed or hung the Ray Data job (issue 12): deep nesting in an ignored field
    (segfaulted polars inside a worker, retried forever), a ts of 1e30 and one >= 2**63 (Int128
    crash), a float id among integer ids, a BOM, a gzip/zstd file and a csv beside the events."""
    import gzip

    from test_data_bad_input import _cfg, _day, _rows, _zstd

    day = _day(tmp_path)
    deep = b"[" * 1000 + b"]" * 1000
    (day / "a.jsonl").write_bytes(
        b'{"user_id":"a","ts":1740787200,"task":"rec","item_id":"i1","x":' + deep + b"}\n"
        b'{"user_id":"a","ts":"1e30","task":"rec","item_id":"i1"}\n'
        b'{"user_id":"a","ts":9223372036854775808,"task":"rec","item_id":"i1"}\n'
        b'{"user_id":1,"ts":1740787200,"task":"rec","item_id":"i1"}\n'
        b'{"user_id":2.5,"ts":1740787200,"task":"rec","item_id":"i1"}\n'
        b'\xef\xbb\xbf{"user_id":"b","ts":1740787200,"task":"rec","item_id":"i2"}\n')
    (day / "b.jsonl.gz").write_bytes(gzip.compress(_rows("c")))
    (day / "c.jsonl.zst").write_bytes(_zstd(_rows("d")))
    (day / "notes.csv").write_text("x\n")
    manifest = run_preprocess(_cfg(tmp_path))
    assert manifest["quarantine"] == {"too_deeply_nested": 1, "ts_out_of_range": 2, "wrong_type": 1}
    assert manifest["accounting"]["rows_in"] == 8 and manifest["examples"] == 4
    assert [s["path"] for s in manifest["skipped_files"]] == ["dt=2025-03-01/notes.csv"]


def test_all_quarantined_and_damaged_parquet_fail_with_named_errors_on_ray(tmp_path: Path) -> None:
    """A damaged Parquet data page is found inside a Ray task: the driver still raises the
    InputError naming the file (not a wrapped traceback); an all-quarantined input raises
    NoExamplesError with the summary instead of publishing 0 examples."""
    from test_data_bad_input import (
        _cfg,
        _day,
        setup_all_quarantined,
        setup_damaged_parquet_pages,
    )

    from gems.data.events import InputError
    from gems.data.plan import NoExamplesError

    first, second = tmp_path / "one", tmp_path / "two"
    setup_damaged_parquet_pages(_day(first))
    with pytest.raises(InputError, match=r"pages\.parquet: unreadable Parquet"):
        run_preprocess(_cfg(first))
    setup_all_quarantined(_day(second))
    with pytest.raises(NoExamplesError, match="ts_out_of_range=1"):
        run_preprocess(_cfg(second))
    assert not (second / "out").exists()
