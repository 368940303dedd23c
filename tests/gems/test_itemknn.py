"""Item-kNN floor: co-occurrence cosine, summed over the history, popularity only as a tie-break."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from gems.itemknn import ItemKNNFloor

CATALOG = ["a", "b", "c", "d", "e"]


def _train() -> pl.DataFrame:
    # a and b always together; c with a once; e is the most popular answer but never meets a or b
    rows = [(["a"], "b"), (["b"], "a"), (["a", "c"], "b"), (["d"], "e"), ([], "e"), (["d"], "e")]
    return pl.DataFrame({"history_item_ids": [h for h, _ in rows], "target_item_id": [t for _, t in rows]})


def test_cosine_of_co_occurrence_is_symmetric_with_an_empty_diagonal() -> None:
    knn = ItemKNNFloor.fit(_train(), CATALOG)
    sim = knn.similarity.to_dense()
    assert torch.equal(sim, sim.T) and float(sim.diagonal().abs().sum()) == 0
    # a and b share 3 sequences, each occurs in 3: cosine 1; a and c share 1 of (3, 1): 1/sqrt(3)
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(3 ** -0.5)
    assert sim[0, 4] == 0 and sim[3, 4] == pytest.approx(2 / (2 * 3) ** 0.5)


def test_history_neighbours_rank_first_and_popularity_only_breaks_ties() -> None:
    knn = ItemKNNFloor.fit(_train(), CATALOG)
    scores = knn.score(pl.DataFrame({"history_item_ids": [["a"], [], ["zzz"]]}))
    assert scores.shape == (3, 5)
    assert scores[0].argsort(descending=True)[:2].tolist() == [1, 2]  # b, then c; popular e after them
    assert scores[0, 4] > scores[0, 3]  # among items a never met, the more popular answer first
    assert float(scores[1].max()) < 1e-3 and scores[1].argmax() == 4  # no history: popularity
    assert torch.equal(scores[1], scores[2])  # unknown items are ignored, not an error
    with pytest.raises(ValueError, match="target_item_id"):
        ItemKNNFloor.fit(pl.DataFrame({"history_item_ids": [["a"]]}), CATALOG)
