"""Non-LLM floors on the same splits: most-popular items per task, item-kNN (gems.itemknn), and
BM25 for search.

A study that reports GEMS without these beside it proves nothing: an LLM that cannot beat
"recommend what is popular" or a lexical query match has learned nothing useful. Both floors
produce full-catalog score matrices, so ``gems.evaluate`` measures them with the identical code
(masking, protocols, pessimistic ties) used for the LLM.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import polars as pl
import torch
from rank_bm25 import BM25Okapi

from gems.evaluate import EvalResult, evaluate_scorer, require_columns
from gems.itemknn import ItemKNNFloor
from gems.tasks import TASKS

_WORD = re.compile(r"\w+", re.UNICODE)


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased word tokens (unicode-aware, so non-English titles and queries work)."""
    return _WORD.findall(text.lower())


class PopularityFloor:
    """Scores each item by how often it was the clicked target in TRAIN examples of the same task.

    Ties in the task's own count (e.g. items never clicked for that task) are broken by the
    item's count over both tasks, scaled below 1 so it can never overturn the primary order.
    """

    def __init__(self, item_ids: Sequence[str], scores_by_task: dict[str, torch.Tensor]) -> None:
        self.item_ids = list(item_ids)
        self.scores_by_task = scores_by_task

    @classmethod
    def fit(cls, train: pl.DataFrame, item_ids: Sequence[str]) -> PopularityFloor:
        require_columns(train, ("task", "target_item_id"), "train examples")
        index = {str(item): i for i, item in enumerate(item_ids)}
        counts = {task: torch.zeros(len(index), dtype=torch.float64) for task in TASKS}
        for task, target in zip(train["task"].to_list(), train["target_item_id"].to_list(),
                                strict=True):
            if task in counts and target in index:
                counts[task][index[target]] += 1
        overall = sum(counts.values())
        tie_break = overall / (float(overall.max()) + 1.0)
        return cls(item_ids, {task: c + tie_break for task, c in counts.items()})

    def score(self, examples: pl.DataFrame) -> torch.Tensor:
        rows = [self.scores_by_task[task] for task in examples["task"].to_list()]
        if not rows:
            return torch.zeros(0, len(self.item_ids))
        return torch.stack(rows).float()


class BM25Floor:
    """Okapi BM25 of the search query against each item's title + text + category.

    rank-bm25 fits the index (idf with its epsilon floor, length normalisation); scoring reuses
    each query term's per-document contribution, computed exactly as ``BM25Okapi.get_scores``
    does but once per distinct term instead of once per query (queries share most terms, and
    get_scores walks every document's dict per term in Python).
    """

    def __init__(self, item_ids: Sequence[str], bm25: BM25Okapi) -> None:
        self.item_ids = list(item_ids)
        self.bm25 = bm25
        self._doc_len = np.asarray(bm25.doc_len, dtype=np.float64)
        self._term_rows: dict[str, np.ndarray] = {}

    def _term_row(self, term: str) -> np.ndarray:
        row = self._term_rows.get(term)
        if row is None:
            bm = self.bm25
            freq = np.array([doc.get(term) or 0 for doc in bm.doc_freqs], dtype=np.float64)
            row = (bm.idf.get(term) or 0) * (freq * (bm.k1 + 1) / (
                freq + bm.k1 * (1 - bm.b + bm.b * self._doc_len / bm.avgdl)))
            self._term_rows[term] = row
        return row

    def query_scores(self, query: str) -> np.ndarray:
        """BM25 score of every catalog item for one query (equal to BM25Okapi.get_scores)."""
        score = np.zeros(len(self.item_ids))
        for term in bm25_tokens(query):
            score += self._term_row(term)
        return score

    @classmethod
    def fit(cls, items: pl.DataFrame, item_ids: Sequence[str] | None = None, k1: float = 1.5,
            b: float = 0.75) -> BM25Floor:
        """Index ``items`` (item_id, title, text, category); ``item_ids`` fixes the catalog order."""
        if "item_id" not in items.columns:
            raise ValueError(f"items lack column 'item_id' (have {items.columns})")
        fields = [c for c in ("title", "text", "category") if c in items.columns]
        if not fields:
            raise ValueError("items need at least one of title, text, category for BM25")
        docs_by_id = {
            str(row["item_id"]): " ".join(str(row[f]) for f in fields if row[f] is not None)
            for row in items.iter_rows(named=True)
        }
        order = [str(i) for i in item_ids] if item_ids is not None else list(docs_by_id)
        missing = [i for i in order if i not in docs_by_id]
        if missing:
            raise ValueError(f"{len(missing)} catalog items have no row in items "
                             f"(first: {missing[:5]})")
        corpus = [bm25_tokens(docs_by_id[i]) or [""] for i in order]
        return cls(order, BM25Okapi(corpus, k1=k1, b=b))

    def score(self, examples: pl.DataFrame) -> torch.Tensor:
        queries = examples["query"].to_list() if "query" in examples.columns else []
        if len(queries) != examples.height or any(q is None for q in queries):
            raise ValueError("BM25 scores search examples only: every row needs a 'query'")
        rows = [torch.from_numpy(self.query_scores(q)) for q in queries]
        if not rows:
            return torch.zeros(0, len(self.item_ids))
        return torch.stack(rows).float()


def evaluate_floors(train: pl.DataFrame, examples: pl.DataFrame, items: pl.DataFrame,
                    item_ids: Sequence[str] | None = None, **eval_kwargs: object
                    ) -> dict[str, EvalResult]:
    """{"popularity", "itemknn": both tasks, "bm25": search only} on ``examples`` (val or test).

    ``eval_kwargs`` go to ``evaluate_scorer`` (mask_history_rec, num_negatives, seed, ks, ...).
    """
    catalog = [str(i) for i in (item_ids if item_ids is not None else items["item_id"].to_list())]
    popularity = PopularityFloor.fit(train, catalog)
    results = {"popularity": evaluate_scorer(popularity.score, examples, catalog,
                                             desc="popularity floor", **eval_kwargs)}  # type: ignore[arg-type]
    knn = ItemKNNFloor.fit(train, catalog)
    results["itemknn"] = evaluate_scorer(knn.score, examples, catalog, desc="item-knn floor",
                                         **eval_kwargs)  # type: ignore[arg-type]
    search = examples.filter(pl.col("task") == "search")
    if search.height:
        bm25 = BM25Floor.fit(items, catalog)
        results["bm25"] = evaluate_scorer(bm25.score, search, catalog, desc="bm25 floor",
                                          **eval_kwargs)  # type: ignore[arg-type]
    return results
