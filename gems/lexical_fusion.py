"""Search scores fused with BM25 of the query: ``(1 - w) * z(model) + w * z(BM25)``.

Why: a model that scores items by learned item rows (the LLM's item tokens, SASRec) ranks a
target that was never a training answer at the bottom of the catalog: the catalog softmax only
ever pushed its row down. On amazon.yaml's test split 14.6 % of the search targets are such items
and every item-token method scores 0 hits on them, while BM25 still matches their text
(docs/learning.md, round 10). Fusing the query's BM25 scores into search rankings lets the system
rank them; rec rankings are the model's own.

z-scores per example over the catalog rather than rank fusion: BM25 on short category queries
ties most of the catalog at 0, and z-scores let the model order the items inside each BM25 level.
The weight is chosen on VAL search rows (the smallest weight on ties), never on test.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch

from gems.evaluate import ScoreBatch
from gems.floors import BM25Floor
from gems.metrics import full_catalog_ranks, ranking_metrics

#: weights tried on val when none is fixed: 0 (the model alone) .. 1 (BM25's order) in steps of 0.05
DEFAULT_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """Per row (example) over the catalog; a constant row (e.g. a query no item matches) -> 0."""
    scores = scores.double()
    std = scores.std(dim=1, keepdim=True)
    return ((scores - scores.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, 1.0)).float()


def fuse(model: torch.Tensor, bm25: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) * z(model) + weight * z(bm25); weight 0 = the model's order, 1 = BM25's."""
    return (1.0 - weight) * zscore(model) + weight * zscore(bm25)


def bm25_scores(bm25: BM25Floor, rows: pl.DataFrame) -> torch.Tensor:
    return bm25.score(rows) if rows.height else torch.zeros(0, len(bm25.item_ids))


def search_mask(rows: pl.DataFrame) -> torch.Tensor:
    return torch.tensor([t == "search" for t in rows["task"].to_list()], dtype=torch.bool)


def best_weight(model: torch.Tensor, bm25: torch.Tensor, targets: torch.Tensor,
                grid: Sequence[float] = DEFAULT_GRID) -> tuple[float, dict[float, float]]:
    """The weight in ``grid`` with the best full-catalog NDCG@10 of ``targets`` (the smallest on
    ties) and every weight's value; ``model`` and ``bm25`` are [rows, n_items] search scores."""
    if model.shape[0] == 0:
        raise ValueError("no val search rows to choose the fusion weight on; fix the weight instead")
    if model.shape != bm25.shape:
        raise ValueError(f"model scores {tuple(model.shape)} and BM25 scores {tuple(bm25.shape)} differ")
    bad = [w for w in grid if not 0 <= w <= 1]
    if not grid or bad:
        raise ValueError(f"fusion weights must be a non-empty list in [0, 1], got {list(grid)}")
    values = {float(w): ranking_metrics(full_catalog_ranks(fuse(model, bm25, w), targets),
                                        ks=(10,))["ndcg_at_10"] for w in grid}
    best = max(values.values())
    return min(w for w, v in values.items() if v == best), values


def weight_on_search_rows(score: ScoreBatch, bm25: BM25Floor, search: pl.DataFrame,
                          item_ids: Sequence[str], grid: Sequence[float] = DEFAULT_GRID
                          ) -> tuple[float, dict[float, float]]:
    """:func:`best_weight` of ``score`` on ``search`` rows (targets looked up in ``item_ids``);
    search rankings are never history-masked."""
    index = {str(item): i for i, item in enumerate(item_ids)}
    targets = torch.tensor([index[str(t)] for t in search["target_item_id"].to_list()], dtype=torch.long)
    model = score(search).detach().float().cpu() if search.height else torch.zeros(0, len(item_ids))
    return best_weight(model, bm25_scores(bm25, search), targets, grid)


def fused_scorer(score: ScoreBatch, bm25: BM25Floor, weight: float) -> ScoreBatch:
    """``score`` with its search rows fused with BM25 at ``weight``; rec rows untouched."""

    def fused(rows: pl.DataFrame) -> torch.Tensor:
        scores = score(rows).detach().float().clone()
        is_search = search_mask(rows)
        if is_search.any():
            search = rows.filter(pl.Series(is_search.tolist()))
            scores[is_search] = fuse(scores[is_search], bm25_scores(bm25, search), weight)
        return scores

    return fused


def memoized(score: ScoreBatch, key: str = "example_id") -> ScoreBatch:
    """``score`` computed once per example (by ``key``), so the plain and the fused evaluation of
    one model share a single forward pass per row."""
    cache: dict[str, torch.Tensor] = {}

    def cached(rows: pl.DataFrame) -> torch.Tensor:
        keys = [str(k) for k in rows[key].to_list()]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        if todo:
            fresh = score(rows[todo]).detach().float().cpu()
            for i, row in zip(todo, fresh, strict=True):
                cache[keys[i]] = row
        return torch.stack([cache[k] for k in keys]) if keys else score(rows)

    return cached
