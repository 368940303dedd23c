"""Qilin-format logs rendered from the simulator read back, through the real Qilin parser, to exactly
the simulated events, and run through preprocessing like any Qilin directory."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from gems.data.qilin import convert_qilin
from gems.data.qilin_synth import QILIN_MARKER, main, write_qilin
from gems.data.simulate import SimulationParams, simulate

PARAMS = SimulationParams(users=60, items=50, days=2, seed=3, events_per_user_day=6)
KEYS = ["user_id", "ts", "task", "query", "item_id", "clicked"]


def test_the_parser_reads_back_every_simulated_event(tmp_path: Path) -> None:
    summary = write_qilin(tmp_path / "qilin", PARAMS, rows_per_file=100)
    simulate(tmp_path / "sim", PARAMS)
    expected = (pl.read_parquet(tmp_path / "sim" / "events" / "**" / "*.parquet", hive_partitioning=False)
                .with_columns(pl.col("user_id").str.strip_prefix("u")).select(KEYS).sort(KEYS))
    converted = convert_qilin(tmp_path / "qilin")
    assert converted.stats["unparsable_results"] == 0
    assert converted.events.select(KEYS).sort(KEYS).equals(expected)
    assert summary["events"] == expected.height
    assert len(list((tmp_path / "qilin").glob("search_train_*.csv"))) > 1  # split into parts
    items = pl.read_parquet(tmp_path / "sim" / "items.parquet")
    assert converted.items.height == items.height
    assert converted.items.select("item_id", "title").sort("item_id").equals(
        items.select("item_id", "title").sort("item_id"))
    # one search row per (user, second, query): a click and the impression beside it share a row
    search = pl.read_csv(tmp_path / "qilin" / "search_train_00000.csv")
    assert search["search_result_details_with_idx"].str.count_matches(r"\{").max() >= 2
    assert search["search_result_details_with_idx"].str.contains("'click': 1.0").all()


def test_refuses_a_directory_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=QILIN_MARKER):
        write_qilin(tmp_path, PARAMS)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_preprocessing_runs_on_the_synthetic_qilin(tmp_path: Path, capsys) -> None:
    from gems.data.inprocess import preprocess_inprocess
    from tune.config import load_config

    main(["--users", "80", "--items", "60", "--days", "2", "--out", str(tmp_path / "qilin")])
    assert '"search_rows"' in capsys.readouterr().out
    cfg = load_config("tiny", [f"state_dir={tmp_path / 'state'}", "data.source=qilin",
                               f"data.path={tmp_path / 'qilin'}"])
    manifest = preprocess_inprocess(cfg)
    acc = manifest["accounting"]
    assert acc["rows_quarantined"] == 0 and acc["clicked"] > 0
    assert manifest["examples_detail"]["negatives_attached"] > 0
