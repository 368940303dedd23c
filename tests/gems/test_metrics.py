"""Ranking metrics on hand-computed cases, tie handling, history masking, sampled negatives."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gems.metrics import (
    evaluate_scores,
    flatten_metrics,
    full_catalog_ranks,
    history_exclusion_mask,
    ranking_metrics,
    sample_negatives,
    sampled_ranks,
    unified_metric,
)


def test_target_at_rank_1() -> None:
    scores = torch.tensor([[5.0, 1.0, 2.0, 3.0]])
    ranks = full_catalog_ranks(scores, torch.tensor([0]))
    assert ranks.tolist() == [1]
    m = ranking_metrics(ranks)
    assert m == {"hit_at_1": 1.0, "hit_at_5": 1.0, "hit_at_10": 1.0, "ndcg_at_5": 1.0,
                 "ndcg_at_10": 1.0, "mrr": 1.0, "count": 1.0}


def test_target_at_rank_11_is_outside_every_cutoff() -> None:
    scores = torch.arange(12, 0, -1, dtype=torch.float32)[None]  # item i has rank i + 1
    ranks = full_catalog_ranks(scores, torch.tensor([10]))
    assert ranks.tolist() == [11]
    m = ranking_metrics(ranks)
    assert m["hit_at_10"] == 0.0 and m["ndcg_at_10"] == 0.0 and m["hit_at_1"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 11)


def test_rank_3_hand_computed() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.2]])  # order: 0, 3, 2, 4, 1
    ranks = full_catalog_ranks(scores, torch.tensor([2]))
    assert ranks.tolist() == [3]
    m = ranking_metrics(ranks)
    assert m["hit_at_1"] == 0.0 and m["hit_at_5"] == 1.0
    assert m["ndcg_at_5"] == pytest.approx(1 / math.log2(4)) == 0.5
    assert m["mrr"] == pytest.approx(1 / 3)


def test_means_over_examples() -> None:
    m = ranking_metrics(torch.tensor([1, 3, 11, 2]))
    assert m["hit_at_1"] == 0.25 and m["hit_at_5"] == 0.75 and m["count"] == 4.0
    expected_ndcg5 = (1 + 0.5 + 0 + 1 / math.log2(3)) / 4
    assert m["ndcg_at_5"] == pytest.approx(expected_ndcg5)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 2) / 4)


def test_ties_are_pessimistic() -> None:
    scores = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    # target 2 ties with items 1 and 3: 1 (item 0) + 2 (ties) ahead -> rank 4
    assert full_catalog_ranks(scores, torch.tensor([2])).tolist() == [4]


def test_constant_model_gets_no_credit() -> None:
    n, n_items = 6, 200
    scores = torch.zeros(n, n_items)
    targets = torch.arange(n)
    metrics = evaluate_scores(scores, targets, ["rec"] * 3 + ["search"] * 3)
    for task in ("rec", "search"):
        assert metrics[task]["full"]["hit_at_1"] == 0.0
        assert metrics[task]["full"]["hit_at_10"] == 0.0
        assert metrics[task]["sampled"]["hit_at_10"] == 0.0
        assert metrics[task]["sampled"]["mrr"] == pytest.approx(1 / 100)
        assert metrics[task]["full"]["mrr"] == pytest.approx(1 / n_items)


def test_history_mask_keeps_repeated_target_rankable() -> None:
    targets = torch.tensor([0, 0])
    mask = history_exclusion_mask([[0, 1, 2], []], targets, n_items=4)
    assert mask.tolist() == [[False, True, True, False], [False, False, False, False]]


def test_rec_history_masking_lifts_target_search_unmasked() -> None:
    # items 1 and 2 outscore the target 3; both are in the history
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.5, 0.1]] * 2)
    targets = torch.tensor([3, 3])
    history = [[1, 2], [1, 2]]
    m = evaluate_scores(scores, targets, ["rec", "search"], history_indices=history)
    assert m["rec"]["full"]["hit_at_1"] == 1.0  # history masked for rec
    assert m["search"]["full"]["mrr"] == pytest.approx(1 / 3)  # never masked for search
    off = evaluate_scores(scores, targets, ["rec", "search"], history_indices=history,
                          mask_history_rec=False)
    assert off["rec"]["full"]["mrr"] == pytest.approx(1 / 3)


def test_sampled_negatives_exclude_target_and_history_and_are_deterministic() -> None:
    n_items = 500
    targets = torch.tensor([7, 8, 9, 7])
    keys = ["a", "b", "c", "d"]
    exclude = history_exclusion_mask([[1, 2, 3, 7], [], list(range(100, 300)), []], targets,
                                     n_items)
    neg = sample_negatives(n_items, targets, keys, 99, seed=3, exclude=exclude)
    assert neg.shape == (4, 99) and (neg >= 0).all()
    for i in range(4):
        row = neg[i].tolist()
        assert len(set(row)) == 99
        assert int(targets[i]) not in row
        assert not exclude[i, neg[i]].any()
    # same example key -> same draw regardless of its position or batch companions
    perm = [3, 1, 0, 2]
    neg_perm = sample_negatives(n_items, targets[perm], [keys[i] for i in perm], 99, seed=3,
                                exclude=exclude[perm])
    assert torch.equal(neg_perm, neg[perm])
    alone = sample_negatives(n_items, targets[1:2], ["b"], 99, seed=3, exclude=exclude[1:2])
    assert torch.equal(alone[0], neg[1])
    other_seed = sample_negatives(n_items, targets, keys, 99, seed=4, exclude=exclude)
    assert not torch.equal(other_seed, neg)


def test_small_catalog_pads_negatives_and_ranks_against_all() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    neg = sample_negatives(4, torch.tensor([2]), ["x"], num_negatives=99)
    assert sorted(neg[0][neg[0] >= 0].tolist()) == [0, 1, 3]
    assert (neg[0] == -1).sum() == 96
    assert sampled_ranks(scores, torch.tensor([2]), neg).tolist() == [2]


def test_sampled_rank_hand_computed() -> None:
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    negatives = torch.tensor([[0, 5, 4, -1]])
    assert sampled_ranks(scores, torch.tensor([3]), negatives).tolist() == [3]
    with pytest.raises(ValueError, match="equals its target"):
        sampled_ranks(scores, torch.tensor([5]), negatives)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(0, 2**31 - 1), st.booleans())
def test_rank_bounds_and_sampled_never_worse(n_items: int, seed: int, integer_scores: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 5
    scores = torch.randn(n, n_items, generator=g)
    if integer_scores:  # many ties
        scores = scores.round()
    targets = torch.randint(0, n_items, (n,), generator=g)
    full = full_catalog_ranks(scores, targets)
    assert ((full >= 1) & (full <= n_items)).all()
    neg = sample_negatives(n_items, targets, [str(i) for i in range(n)], 7, seed)
    samp = sampled_ranks(scores, targets, neg)
    assert (samp <= full).all() and (samp <= 8).all()


def test_nan_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        full_catalog_ranks(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))


def test_bad_target_index_is_rejected() -> None:
    with pytest.raises(ValueError, match="target indices"):
        full_catalog_ranks(torch.zeros(1, 3), torch.tensor([3]))


def test_unified_metric_and_flatten() -> None:
    metrics = {"search": {"full": {"ndcg_at_10": 0.2}}, "rec": {"full": {"ndcg_at_10": 0.4}}}
    assert unified_metric(metrics) == pytest.approx(0.3)
    assert flatten_metrics(metrics, "val/") == {"val/search/full/ndcg_at_10": 0.2,
                                                "val/rec/full/ndcg_at_10": 0.4}
    with pytest.raises(ValueError, match="search"):
        unified_metric({"rec": metrics["rec"]})
