"""Per-row ranks: written and read back per run, and the seen/unseen split's figures by hand."""

from __future__ import annotations

import math

import polars as pl
import pytest

from tune.study.ranks import read_ranks, seen_split, write_ranks


def _top(rows: list[tuple[str, str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame({"example_id": [r[0] for r in rows], "task": [r[1] for r in rows],
                         "target_item_id": [r[2] for r in rows], "rank": [r[3] for r in rows],
                         "top_item_ids": [["x"] for _ in rows], "top_scores": [[0.0] for _ in rows]})


def test_ranks_round_trip_per_method_and_seed(tmp_path):
    write_ranks(tmp_path, "gems[alpha=4]", 0, _top([("e1", "search", "a", 1)]))
    write_ranks(tmp_path, "adamw", 1, _top([("e1", "search", "a", 3), ("e2", "rec", "b", 20)]))
    ranks = read_ranks(tmp_path)
    assert ranks.height == 3
    assert set(ranks["method"]) == {"gems[alpha=4]", "adamw"}
    assert "top_item_ids" not in ranks.columns  # only the rank columns are kept
    assert write_ranks(tmp_path, "bm25", 0, None) is None


def test_missing_columns_are_named(tmp_path):
    with pytest.raises(ValueError, match="rank"):
        write_ranks(tmp_path, "gems", 0, pl.DataFrame({"example_id": ["e"], "task": ["search"],
                                                       "target_item_id": ["a"]}))


def test_seen_split_by_hand(tmp_path):
    # seen targets a (rank 1) and b (rank 3); unseen c (rank 11: outside the top 10) and d (rank 2)
    write_ranks(tmp_path, "m", 0, _top([("1", "search", "a", 1), ("2", "search", "b", 3),
                                        ("3", "search", "c", 11), ("4", "search", "d", 2)]))
    table = seen_split(read_ranks(tmp_path), ["a", "b", "z"])
    seen = table.filter(pl.col("seen")).row(0, named=True)
    unseen = table.filter(~pl.col("seen")).row(0, named=True)
    assert seen["rows"] == 2 and unseen["rows"] == 2
    assert seen["ndcg_at_10"] == pytest.approx((1.0 + 1.0 / math.log2(4)) / 2)
    assert unseen["ndcg_at_10"] == pytest.approx((0.0 + 1.0 / math.log2(3)) / 2)
    assert seen["hit_at_10"] == 1.0 and unseen["hit_at_10"] == 0.5
