"""BM25 fusion of any scorer's search rows: rec rows untouched, the ends of the weight range are
the model's and BM25's orders, one forward pass per row serves both evaluations, and the weight
is chosen on val, never on test."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from gems.evaluate import evaluate_with_config
from gems.floors import BM25Floor
from gems.lexical_fusion import best_weight, fused_scorer, memoized


def _rows(tiny_items: list[tuple[str, str]], n: int, prefix: str) -> pl.DataFrame:
    from gems.prompts import format_prompt

    catalog = [item_id for item_id, _ in tiny_items]
    titles = dict(tiny_items)
    rows = []
    for i in range(n):
        task = "search" if i % 2 else "rec"
        target = catalog[(i * 7 + 3) % 20]
        history = [catalog[(i + j) % 20] for j in range(3) if catalog[(i + j) % 20] != target]
        query = titles[target].lower() if task == "search" else None  # BM25 finds these targets
        rows.append({"example_id": f"{prefix}{i}", "task": task, "query": query,
                     "prompt": format_prompt(task, [(h, titles[h]) for h in history], query, 3),
                     "history_item_ids": history, "target_item_id": target})
    return pl.DataFrame(rows)


def test_fused_scorer_touches_search_rows_only_and_memoized_scores_once(tiny_items) -> None:
    catalog = [item_id for item_id, _ in tiny_items]
    items = pl.DataFrame({"item_id": catalog, "title": [t for _, t in tiny_items]})
    rows = _rows(tiny_items, 6, "x")
    calls: list[int] = []

    def model(batch: pl.DataFrame) -> torch.Tensor:
        calls.append(batch.height)
        return torch.randn(batch.height, len(catalog), generator=torch.Generator().manual_seed(7))

    score = memoized(model)
    first = score(rows)
    assert torch.equal(score(rows), first) and torch.equal(score(rows[2:5]), first[2:5])
    assert calls == [6]  # later calls hit the cache
    bm25 = BM25Floor.fit(items, catalog)
    fused = fused_scorer(score, bm25, 0.5)(rows)
    is_rec = torch.tensor([t == "rec" for t in rows["task"].to_list()])
    assert torch.equal(fused[is_rec], first[is_rec])
    assert not torch.allclose(fused[~is_rec], first[~is_rec])
    # weight 1: BM25's order on search rows; the true title query puts each target first
    top = fused_scorer(score, bm25, 1.0)(rows)[~is_rec].argmax(dim=1)
    targets = rows.filter(pl.col("task") == "search")["target_item_id"].to_list()
    assert [catalog[int(i)] for i in top] == targets


def test_best_weight_picks_the_smallest_best_and_refuses_bad_input() -> None:
    model = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    lexical = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    targets = torch.tensor([0, 2])  # BM25 is right, the model wrong
    weight, values = best_weight(model, lexical, targets, [0.0, 0.6, 0.8, 1.0])
    assert values[0.0] < values[0.6] == values[1.0] and weight == 0.6
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        best_weight(model, lexical, targets, [0.5, 1.5])
    with pytest.raises(ValueError, match="no val search rows"):
        best_weight(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_fused_evaluation_keeps_the_plain_result_and_rec_and_tunes_on_val(
        tiny_model_and_tokenizer, tiny_items, tiny_cfg) -> None:
    from gems.evaluate_fused import evaluate_with_bm25_fusion
    from gems.model import add_item_tokens

    model, tokenizer = tiny_model_and_tokenizer
    token_ids = torch.tensor(add_item_tokens(model, tokenizer, tiny_items))
    catalog = [item_id for item_id, _ in tiny_items]
    items = pl.DataFrame({"item_id": catalog, "title": [t for _, t in tiny_items]})
    test, val = _rows(tiny_items, 14, "t"), _rows(tiny_items, 10, "v")
    cfg = tiny_cfg.model_copy(update={"eval": tiny_cfg.eval.model_copy(update={"num_negatives": 9})})
    both = evaluate_with_bm25_fusion(model, tokenizer, test, val, items, catalog, token_ids, cfg, top_k=1)
    alone = evaluate_with_config(model, tokenizer, test, catalog, token_ids, cfg, top_k=1, progress=False)
    assert both.plain.metrics == alone.metrics  # one cached pass, the same numbers
    assert both.fused.metrics["rec"] == alone.metrics["rec"]
    assert set(both.val_ndcg) == {round(0.05 * i, 2) for i in range(21)}
    assert both.val_ndcg[both.weight] == max(both.val_ndcg.values()) > both.val_ndcg[0.0]
    # the queries name their targets: fused search beats a random model's
    assert both.fused.metrics["search"]["full"]["ndcg_at_10"] > alone.metrics["search"]["full"]["ndcg_at_10"]
    assert both.fused.top_k.height == test.height
    fixed = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"bm25_weight": 0.0})})
    pinned = evaluate_with_bm25_fusion(model, tokenizer, test, val, items, catalog, token_ids, fixed)
    assert pinned.weight == 0.0 and pinned.fused.metrics == alone.metrics and pinned.val_ndcg == {}
    on_val = evaluate_with_bm25_fusion(model, tokenizer, val, val, items, catalog, token_ids, cfg)
    fused_val = on_val.fused.metrics["search"]["full"]["ndcg_at_10"]
    assert fused_val == pytest.approx(on_val.val_ndcg[on_val.weight])
