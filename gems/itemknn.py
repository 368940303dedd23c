"""Item-kNN: the classic collaborative floor beside SASRec, with no training at all.

Two items are similar when they appear in the same training sequences (an example's history plus
its answer): cosine of their co-occurrence, ``c_ij / sqrt(n_i n_j)``. An example's score for item
``j`` is the summed similarity of its history items to ``j``; items no history item ever met tie
at 0 and are ordered among themselves by training popularity (a tie-break far below any positive
similarity). The similarity is a sparse matrix, so memory grows with the co-occurring pairs, not
with the catalog squared. Search rows are scored from the history alone, as SASRec's are.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations

import polars as pl
import torch

from gems.evaluate import require_columns

#: the popularity tie-break stays below this share of the smallest positive similarity
TIE_BREAK_SHARE = 1e-3


class ItemKNNFloor:
    def __init__(self, item_ids: Sequence[str], similarity: torch.Tensor, popularity: torch.Tensor) -> None:
        self.item_ids = list(item_ids)
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.similarity = similarity  # sparse [n, n], symmetric, zero diagonal
        values = similarity.coalesce().values()
        smallest = float(values[values > 0].min()) if values.numel() else 1.0
        self.tie_break = (popularity / (float(popularity.max()) + 1.0)) * smallest * TIE_BREAK_SHARE

    @classmethod
    def fit(cls, train: pl.DataFrame, item_ids: Sequence[str]) -> ItemKNNFloor:
        require_columns(train, ("history_item_ids", "target_item_id"), "train examples")
        index = {str(item): i for i, item in enumerate(item_ids)}
        n = len(index)
        occurrences = torch.zeros(n, dtype=torch.float64)
        popularity = torch.zeros(n, dtype=torch.float64)
        rows: list[int] = []
        cols: list[int] = []
        for history, target in zip(train["history_item_ids"].to_list(), train["target_item_id"].to_list(),
                                   strict=True):
            seen = sorted({index[str(i)] for i in [*(history or []), target] if str(i) in index})
            occurrences[seen] += 1
            if str(target) in index:
                popularity[index[str(target)]] += 1
            for a, b in permutations(seen, 2):
                rows.append(a)
                cols.append(b)
        pairs = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
        counts = torch.sparse_coo_tensor(pairs, torch.ones(len(rows), dtype=torch.float64), (n, n),
                                         check_invariants=True).coalesce()
        i, j = counts.indices()
        cosine = counts.values() / (occurrences[i] * occurrences[j]).sqrt()
        similarity = torch.sparse_coo_tensor(counts.indices(), cosine, (n, n), check_invariants=True)
        return cls(item_ids, similarity.coalesce(), popularity)

    def score(self, examples: pl.DataFrame) -> torch.Tensor:
        """[len(examples), n_items]: summed similarity of each row's history items, + the tie-break."""
        histories = examples["history_item_ids"].to_list() if examples.height else []
        indicator = torch.zeros(len(histories), len(self.item_ids), dtype=torch.float64)
        for row, history in enumerate(histories):
            cols = [self.index[str(i)] for i in (history or []) if str(i) in self.index]
            indicator[row, cols] = 1.0
        scores = torch.sparse.mm(self.similarity, indicator.T).T if len(histories) else indicator
        return (scores + self.tie_break).float()
