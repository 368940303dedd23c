"""Semantic ids: residual k-means codes, collision disambiguation, the id-scheme sizing rule."""

from __future__ import annotations

import pytest
import torch

from gems.id_scheme import ATOMIC_MAX_ITEMS, choose_id_scheme
from gems.residual_kmeans import kmeans, residual_kmeans
from gems.semantic_ids import assign_semantic_ids, disambiguation_indices


def _clustered(n: int, d: int = 16, groups: int = 6, seed: int = 0) -> torch.Tensor:
    """Embeddings around a few centres, like titles of a few product kinds."""
    gen = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(groups, d, generator=gen)
    return centres[torch.arange(n) % groups] + torch.randn(n, d, generator=gen)


def _ids(n: int) -> list[str]:
    return [f"item{i}" for i in range(n)]


def test_codes_are_unique_and_the_same_for_a_seed() -> None:
    embeddings = _clustered(300)
    first = assign_semantic_ids(_ids(300), embeddings, levels=2, codebook_size=8, seed=3)
    again = assign_semantic_ids(_ids(300), embeddings.clone(), levels=2, codebook_size=8, seed=3)
    other = assign_semantic_ids(_ids(300), embeddings, levels=2, codebook_size=8, seed=4)

    assert torch.equal(first.codes, again.codes) and first.level_errors == again.level_errors
    assert not torch.equal(first.codes, other.codes), "the seed drives the k-means++ starts"
    assert torch.unique(first.codes, dim=0).shape[0] == 300
    assert first.codes[:, :2].max() < 8 and first.codes.min() >= 0
    assert first.item_ids == tuple(_ids(300))


def test_every_level_reduces_the_reconstruction_error() -> None:
    embeddings = _clustered(400, groups=10)
    books = residual_kmeans(embeddings, levels=3, codebook_size=8, seed=0)

    errors = books.level_errors
    assert len(errors) == 4 and all(after < before for before, after in zip(errors, errors[1:], strict=False))
    # The reported error is what the chosen centroids leave of the embeddings.
    rebuilt = sum(books.centroids[level][books.codes[:, level]] for level in range(3))
    left = (embeddings - rebuilt).square().sum(1).mean()
    assert abs(float(left) - errors[-1]) < 1e-3 * errors[0]


def test_fewer_items_than_centroids_get_exact_unique_codes() -> None:
    embeddings = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    ids = assign_semantic_ids(["a", "b", "c"], embeddings, levels=2, codebook_size=8)

    assert ids.code_length == 2 and ids.disambiguation_size == 0
    assert torch.unique(ids.codes[:, 0]).numel() == 3, "each item its own first-level centroid"
    assert ids.level_errors[1] < 1e-6 * ids.level_errors[0]


def test_an_empty_cluster_is_reseeded_on_the_worst_served_point() -> None:
    points = torch.cat([torch.zeros(5, 2), torch.full((5, 2), 10.0), torch.tensor([[10.0, 30.0]])])
    far_away = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-100.0, -100.0]])  # the third gets no member

    centroids, assignment = kmeans(points, 3, torch.Generator().manual_seed(0), 10, init=far_away)

    assert torch.bincount(assignment, minlength=3).tolist() == [5, 5, 1]
    assert torch.equal(centroids[2], points[10])


def test_colliding_items_get_distinct_disambiguation_tokens() -> None:
    base = _clustered(40, groups=4)
    embeddings = torch.cat([base, base[7:8].repeat(3, 1), base[9:10].repeat(2, 1)])  # exact copies
    ids = assign_semantic_ids(_ids(45), embeddings, levels=2, codebook_size=4, seed=0)

    assert ids.code_length == 3, "one extra position once any two items collide"
    assert torch.unique(ids.codes, dim=0).shape[0] == 45
    copies_of_7 = ids.codes[[7, 40, 41, 42]]
    assert (copies_of_7[:, :2] == copies_of_7[0, :2]).all() and copies_of_7[:, 2].unique().numel() == 4
    # The whole group sharing that L-code counts 0, 1, 2, ... in catalog order.
    group = (ids.codes[:, :2] == copies_of_7[0, :2]).all(dim=1)
    assert ids.codes[group, 2].tolist() == list(range(int(group.sum())))
    assert ids.disambiguation_size >= 4
    assert ids.added_tokens == 2 * 4 + ids.disambiguation_size
    assert ids.token_report() == {"n_items": 45, "code_tokens": 8, "disambiguation_tokens":
                                  ids.disambiguation_size, "added_tokens": ids.added_tokens,
                                  "atomic_tokens": 45, "code_length": 3}


def test_disambiguation_counts_within_each_group_in_catalog_order() -> None:
    codes = torch.tensor([[1, 2], [0, 0], [1, 2], [1, 2], [0, 0], [3, 1]])
    index, largest = disambiguation_indices(codes)
    assert index.tolist() == [0, 0, 1, 2, 1, 0] and largest == 3


def test_separable_items_need_no_disambiguation() -> None:
    corners = torch.tensor([[0.0, 0.0], [0.0, 9.0], [9.0, 0.0], [9.0, 9.0]])
    ids = assign_semantic_ids(list("abcd"), corners, levels=1, codebook_size=4)
    assert ids.code_length == 1 and ids.disambiguation_size == 0 and ids.added_tokens == 4
    assert sorted(ids.codes[:, 0].tolist()) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------- sizing


def test_auto_keeps_atomic_up_to_the_threshold_and_says_why() -> None:
    small = choose_id_scheme(2_420)
    assert small.scheme == "atomic" and "2420 items <= atomic_max_items=100000" in small.reason
    at = choose_id_scheme(ATOMIC_MAX_ITEMS)
    assert at.scheme == "atomic"
    large = choose_id_scheme(1_900_000, levels=3, codebook_size=256)
    assert large.scheme == "semantic"
    assert "add 768 rows" in large.reason and "instead of 1900000" in large.reason


def test_auto_stays_atomic_when_codes_would_not_save_rows() -> None:
    choice = choose_id_scheme(500, atomic_max_items=100, levels=2, codebook_size=256)
    assert choice.scheme == "atomic" and "512 code rows would not be fewer than 500" in choice.reason


@pytest.mark.parametrize("setting", ["atomic", "semantic"])
def test_an_explicit_scheme_is_kept(setting: str) -> None:
    choice = choose_id_scheme(10 if setting == "semantic" else 10_000_000, setting)
    assert choice.scheme == setting and "set explicitly" in choice.reason


# ---------------------------------------------------------------------------------- bad input

GOOD = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("item_ids", "embeddings", "levels", "k", "message"), [
    ([], torch.empty(0, 4), 2, 4, "catalog is empty"),
    (_ids(6), GOOD, 2, 1, r"codebook_size \(K\) must be >= 2, got 1"),
    (_ids(6), GOOD, 0, 4, r"levels \(L\) must be >= 1, got 0"),
    (_ids(6), torch.where(torch.arange(6).unsqueeze(1) == 2, float("nan"), GOOD), 2, 4,
     r"NaN or inf in 1 row\(s\) \(first: \[2\]\)"),
    (_ids(5), GOOD, 2, 4, "5 item ids but 6 embedding rows"),
    (["a", "b", "a", "c", "d", "e"], GOOD, 2, 4, r"item ids repeat \(first: \['a'\]\)"),
    (_ids(6), GOOD[:, 0], 2, 4, r"must be \[n_items, d\]"),
])
def test_bad_input_is_a_value_error_naming_it(item_ids: list[str], embeddings: torch.Tensor, levels: int,
                                              k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_semantic_ids(item_ids, embeddings, levels=levels, codebook_size=k)


def test_bad_sizing_input_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="items.id_scheme must be one of"):
        choose_id_scheme(10, "hashed")
    with pytest.raises(ValueError, match="catalog is empty"):
        choose_id_scheme(0)
    with pytest.raises(ValueError, match=r"codebook_size \(K\) must be >= 2"):
        choose_id_scheme(10, codebook_size=1)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        residual_kmeans(GOOD, 1, 2, iterations=0)
    with pytest.raises(ValueError, match=r"init centroids must be \[3, 4\]"):
        kmeans(GOOD, 3, torch.Generator(), 5, init=torch.zeros(2, 4))
