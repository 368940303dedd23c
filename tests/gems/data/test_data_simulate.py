"""The synthetic log simulator: deterministic per seed, prefix-consistent across days, and with the
statistics the tasks need (interest-driven clicks, popularity skew, queries from item words, new
items on later days)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest

from gems.data.simulate import SimulationParams, main, simulate

PARAMS = SimulationParams(users=300, items=400, days=3, seed=7, events_per_user_day=8)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame, pl.DataFrame]:
    root = tmp_path_factory.mktemp("sim")
    simulate(root, PARAMS)
    events = pl.read_parquet(root / "events" / "**" / "*.parquet", hive_partitioning=True)
    return root, events, pl.read_parquet(root / "items.parquet")


def test_same_seed_same_bytes_other_seed_other_logs(sim, tmp_path: Path) -> None:
    root, _, _ = sim
    simulate(tmp_path / "again", PARAMS)
    assert _digest(tmp_path / "again") == _digest(root)
    simulate(tmp_path / "other", SimulationParams(**{**PARAMS.__dict__, "seed": 8}))
    assert _digest(tmp_path / "other") != _digest(root)


def test_more_days_extend_without_changing_earlier_days(sim, tmp_path: Path) -> None:
    root, _, items = sim
    simulate(tmp_path / "short", SimulationParams(**{**PARAMS.__dict__, "days": 2}))
    short = _digest(tmp_path / "short")
    full = _digest(root)
    for rel, digest in short.items():
        if rel.startswith("events/"):
            assert full[rel] == digest, rel
    short_items = pl.read_parquet(tmp_path / "short" / "items.parquet")
    assert items.head(short_items.height).equals(short_items)


def test_logs_follow_the_contract_and_day_partitions(sim) -> None:
    _, events, items = sim
    days = events["dt"].unique().sort().cast(pl.String).to_list()
    assert days == ["2025-01-01", "2025-01-02", "2025-01-03"]
    day = pl.from_epoch("ts", "s").dt.strftime("%Y-%m-%d")
    assert (events.select(day)["ts"] == events["dt"].cast(pl.String)).all()
    assert set(events["item_id"]) <= set(items["item_id"])
    search = events.filter(pl.col("task") == "search")
    assert search["query"].null_count() == 0 and (search["query"].str.len_chars() > 0).all()
    assert events.filter(pl.col("task") == "rec")["query"].null_count() == events.filter(
        pl.col("task") == "rec").height
    clicks = events.filter("clicked")
    expected = PARAMS.users * PARAMS.days * PARAMS.events_per_user_day
    assert 0.9 * expected < clicks.height < 1.1 * expected
    assert 0.3 < (clicks["task"] == "search").mean() < 0.5
    assert 0.15 < (~events["clicked"]).sum() / clicks.height < 0.35
    assert items["title"].str.split(" ").list.len().min() >= 3  # "Brand Adjective Noun [Variant]"


def test_queries_come_from_the_clicked_item(sim) -> None:
    _, events, items = sim
    search = events.filter((pl.col("task") == "search") & pl.col("clicked"))
    joined = search.join(items, on="item_id")
    overlap = [bool(set(q.split()) & set((t + " " + c).lower().split()))
               for q, t, c in joined.select("query", "title", "category").iter_rows()]
    assert sum(overlap) / len(overlap) > 0.95


def test_clicks_follow_interests_popularity_and_new_items(sim) -> None:
    _, events, items = sim
    clicks = events.filter("clicked").join(items, on="item_id")
    topics = items["category"].n_unique()
    share = (clicks.group_by("user_id", "category").len()
             .with_columns((pl.col("len") / pl.col("len").sum().over("user_id")).alias("s"))
             .group_by("user_id").agg(pl.col("s").max()))
    assert share["s"].mean() > 3 / topics  # users concentrate on a few topics
    counts = clicks.group_by("item_id").len().sort("len", descending=True)["len"]
    assert counts.head(len(counts) // 10).sum() / counts.sum() > 0.25  # popularity skew
    new = clicks.filter(pl.col("release_date") > "2025-01-01")
    assert new.height > 0 and (new["dt"].cast(pl.String) >= new["release_date"]).all()


def test_cli_writes_the_layout_and_refuses_foreign_dirs(tmp_path: Path, capsys) -> None:
    main(["--users", "5", "--items", "20", "--days", "2", "--seed", "1", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "events" / "dt=2025-01-02").is_dir()
    assert '"events"' in capsys.readouterr().out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        simulate(tmp_path / "mine", SimulationParams(users=2, items=5, days=1))
