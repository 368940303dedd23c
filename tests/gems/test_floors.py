"""Popularity and BM25 floors rank what they should and go through the shared evaluator."""

import polars as pl
import pytest
import torch

from gems.floors import BM25Floor, PopularityFloor, bm25_tokens, evaluate_floors
from gems.metrics import evaluate_scores

ITEMS = pl.DataFrame({
    "item_id": ["a", "b", "c", "d"],
    "title": ["Laser printer toner", "Red stapler", "Blue ballpoint pens", "Desk lamp"],
    "text": ["black toner cartridge", "heavy duty metal", "pack of twelve", "LED light"],
    "category": ["Printers", "Staplers", "Pens", "Lighting"],
})
CATALOG = ["a", "b", "c", "d"]


def _examples(tasks: list[str], targets: list[str], queries: list[str | None],
              histories: list[list[str]] | None = None) -> pl.DataFrame:
    n = len(tasks)
    return pl.DataFrame({
        "example_id": [f"e{i}" for i in range(n)], "task": tasks, "query": queries,
        "history_item_ids": histories or [[] for _ in range(n)], "target_item_id": targets,
    }, schema_overrides={"query": pl.Utf8, "history_item_ids": pl.List(pl.Utf8)})


def test_popularity_ranks_most_clicked_first_per_task() -> None:
    train = _examples(["rec", "rec", "rec", "search", "search", "rec"],
                      ["c", "c", "b", "d", "d", "c"], [None, None, None, "x", "y", None])
    floor = PopularityFloor.fit(train, CATALOG)
    scores = floor.score(_examples(["rec", "search"], ["a", "a"], [None, "q"]))
    assert scores.shape == (2, 4)
    assert CATALOG[int(scores[0].argmax())] == "c"  # most clicked for rec
    assert CATALOG[int(scores[1].argmax())] == "d"  # most clicked for search
    # search tie (a, b, c never clicked for search) is broken by overall clicks: c > b > a
    assert scores[1, 2] > scores[1, 1] > scores[1, 0]


def test_popularity_uses_train_only() -> None:
    train = _examples(["rec"], ["b"], [None])
    floor = PopularityFloor.fit(train, CATALOG)
    val = _examples(["rec"] * 3, ["a", "a", "a"], [None] * 3)
    result = evaluate_floors(train, val, ITEMS, num_negatives=3, progress=False)
    assert CATALOG[int(floor.score(val)[0].argmax())] == "b"
    assert result["popularity"].metrics["rec"]["full"]["hit_at_1"] == 0.0
    assert "bm25" not in result  # no search examples


def test_bm25_ranks_title_match_first() -> None:
    floor = BM25Floor.fit(ITEMS, CATALOG)
    scores = floor.score(_examples(["search", "search"], ["b", "c"],
                                   ["red stapler", "ballpoint PENS"]))
    assert [CATALOG[int(i)] for i in scores.argmax(dim=1)] == ["b", "c"]
    assert bm25_tokens("Laser-Printer, TONER!") == ["laser", "printer", "toner"]


def test_bm25_rejects_rows_without_query() -> None:
    with pytest.raises(ValueError, match="query"):
        BM25Floor.fit(ITEMS, CATALOG).score(_examples(["rec"], ["a"], [None]))


def test_floors_metrics_match_direct_computation() -> None:
    train = _examples(["rec", "rec", "search"], ["c", "c", "d"], [None, None, "lamp"])
    val = _examples(["rec", "search", "search"], ["c", "a", "b"],
                    [None, "laser toner", "desk lamp"], [["c", "b"], ["d"], []])
    results = evaluate_floors(train, val, ITEMS, num_negatives=2, seed=5, progress=False)
    assert set(results) == {"popularity", "itemknn", "bm25"}
    bm25 = results["bm25"].metrics["search"]["full"]
    assert bm25["hit_at_1"] == 0.5 and bm25["count"] == 2.0  # toner query hits a; lamp misses b
    pop_scores = PopularityFloor.fit(train, CATALOG).score(val)
    direct = evaluate_scores(pop_scores, torch.tensor([2, 0, 1]), val["task"].to_list(),
                             history_indices=[[2, 1], [3], []], example_keys=["e0", "e1", "e2"],
                             num_negatives=2, seed=5)
    assert results["popularity"].metrics == direct


def test_bm25_cached_scoring_equals_rank_bm25() -> None:
    floor = BM25Floor.fit(ITEMS, CATALOG)
    for query in ["red stapler", "toner toner black", "lamp pens", "nothing matches", ""]:
        expected = floor.bm25.get_scores(bm25_tokens(query))
        assert (floor.query_scores(query) == expected).all()
