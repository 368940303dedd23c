"""The batched evaluator: any scorer, both protocols, masking, batch invariance, top-k."""

import polars as pl
import pytest
import torch

from gems.evaluate import evaluate_scorer, subsample_per_task

CATALOG = [f"i{j}" for j in range(30)]


def _examples(n: int = 10) -> pl.DataFrame:
    return pl.DataFrame({
        "example_id": [f"e{i}" for i in range(n)],
        "task": ["rec" if i % 2 else "search" for i in range(n)],
        "prompt": [f"p{i}" for i in range(n)],
        "history_item_ids": [[f"i{(i + 1) % 30}", f"i{(i + 2) % 30}"] for i in range(n)],
        "target_item_id": [f"i{i}" for i in range(n)],
    })


def _history_loving_scorer(rows: pl.DataFrame) -> torch.Tensor:
    """Puts the two history items first and the target third: masking decides Hit@1 for rec."""
    scores = torch.zeros(rows.height, len(CATALOG))
    for r, (hist, target) in enumerate(zip(rows["history_item_ids"].to_list(),
                                           rows["target_item_id"].to_list(), strict=True)):
        scores[r, CATALOG.index(hist[0])] = 3.0
        scores[r, CATALOG.index(hist[1])] = 2.5
        scores[r, CATALOG.index(target)] = 2.0
    return scores


def test_masking_and_protocols_per_task() -> None:
    result = evaluate_scorer(_history_loving_scorer, _examples(), CATALOG, batch_size=4,
                             num_negatives=5, progress=False)
    assert result.metrics["rec"]["full"]["hit_at_1"] == 1.0
    assert result.metrics["search"]["full"]["mrr"] == pytest.approx(1 / 3)
    assert result.metrics["search"]["sampled"]["mrr"] >= 1 / 3
    assert result.metrics["rec"]["full"]["count"] == 5.0
    assert result.unified == pytest.approx((1.0 + 0.5) / 2)  # ndcg@10 at rank 3 is 0.5


def test_batch_size_does_not_change_results() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(10, len(CATALOG), generator=g)

    def scorer(rows: pl.DataFrame) -> torch.Tensor:
        return table[[int(e[1:]) for e in rows["example_id"].to_list()]]

    one = evaluate_scorer(scorer, _examples(), CATALOG, batch_size=1, progress=False, top_k=3)
    many = evaluate_scorer(scorer, _examples(), CATALOG, batch_size=7, progress=False, top_k=3)
    assert one.metrics == many.metrics
    assert one.top_k is not None and one.top_k.equals(many.top_k)


def test_top_k_excludes_masked_history_and_reports_rank() -> None:
    result = evaluate_scorer(_history_loving_scorer, _examples(4), CATALOG, progress=False,
                             top_k=2)
    top = result.top_k
    assert top is not None and top.columns == ["example_id", "task", "target_item_id", "rank",
                                               "top_item_ids", "top_scores"]
    rec = top.filter(pl.col("task") == "rec").row(0, named=True)
    assert rec["top_item_ids"][0] == rec["target_item_id"] and rec["rank"] == 1
    search = top.filter(pl.col("task") == "search").row(0, named=True)
    assert search["rank"] == 3 and search["target_item_id"] not in search["top_item_ids"]


def test_unknown_target_is_a_clear_error() -> None:
    bad = _examples(2).with_columns(pl.lit("zzz").alias("target_item_id"))
    with pytest.raises(ValueError, match="not in the evaluated catalog"):
        evaluate_scorer(_history_loving_scorer, bad, CATALOG, progress=False)


def test_wrong_score_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        evaluate_scorer(lambda rows: torch.zeros(rows.height, 3), _examples(2), CATALOG,
                        progress=False)


def test_subsample_per_task_is_seeded_and_capped() -> None:
    ex = _examples(20)
    a = subsample_per_task(ex, 4, seed=1)
    assert a["task"].value_counts().sort("task")["count"].to_list() == [4, 4]
    assert a.equals(subsample_per_task(ex, 4, seed=1))
    assert not a.equals(subsample_per_task(ex, 4, seed=2))
    assert subsample_per_task(ex, None).equals(ex)
