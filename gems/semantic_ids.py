"""Semantic item ids: a short, unique code per item instead of one new token per item.

Each item's code is its residual k-means centroid index at each of L levels (:mod:`gems.residual_kmeans`).
Items whose L indices coincide (near-identical embeddings, or more items than K^L cells hold) get one
more position, their index within that collision group, so every code is unique and decodes to
exactly one item. All codes share one length (L, or L + 1 once any two items collide): fixed-length
targets keep training batches rectangular and every leaf of the prefix trie at the same depth.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gems.residual_kmeans import check_codebook_shape, check_embeddings, residual_kmeans


@dataclass(frozen=True)
class SemanticIds:
    """Codes of a catalog, in catalog order, and what they cost in new tokens."""

    item_ids: tuple[str, ...]
    #: [n_items, code_length] long: L centroid indices, then the disambiguation index when any collide
    codes: torch.Tensor
    levels: int
    codebook_size: int
    #: disambiguation tokens needed: the largest collision group (0 when no two items collide)
    disambiguation_size: int
    #: mean squared residual norm before level 1, then after each level (see ResidualCodebooks)
    level_errors: tuple[float, ...]

    @property
    def code_length(self) -> int:
        return int(self.codes.shape[1])

    @property
    def added_tokens(self) -> int:
        """New vocabulary rows: L*K code tokens plus the disambiguation tokens."""
        return self.levels * self.codebook_size + self.disambiguation_size

    def token_report(self) -> dict[str, int]:
        """Token counts to log beside a run: what the codes add versus one token per item."""
        return {"n_items": len(self.item_ids), "code_tokens": self.levels * self.codebook_size,
                "disambiguation_tokens": self.disambiguation_size, "added_tokens": self.added_tokens,
                "atomic_tokens": len(self.item_ids), "code_length": self.code_length}


def assign_semantic_ids(item_ids: Sequence[str], embeddings: torch.Tensor, *, levels: int,
                        codebook_size: int, seed: int = 0, iterations: int = 25) -> SemanticIds:
    """Unique codes for ``item_ids`` from their ``embeddings`` [n_items, d] (same order).

    The same embeddings, shape and seed give the same codes on every run.
    """
    check_codebook_shape(levels, codebook_size)
    check_embeddings(embeddings)
    ids = tuple(str(i) for i in item_ids)
    if len(ids) != embeddings.shape[0]:
        raise ValueError(f"{len(ids)} item ids but {embeddings.shape[0]} embedding rows: they must "
                         "pair one to one, in the same order")
    if len(set(ids)) != len(ids):
        repeated = [i for i, count in Counter(ids).items() if count > 1]
        raise ValueError(f"item ids repeat (first: {repeated[:5]}); each item needs one code")
    books = residual_kmeans(embeddings, levels, codebook_size, seed=seed, iterations=iterations)
    index, group_size = disambiguation_indices(books.codes)
    if group_size > 1:
        codes, disambiguation = torch.cat([books.codes, index.unsqueeze(1)], dim=1), group_size
    else:
        codes, disambiguation = books.codes, 0
    return SemanticIds(ids, codes, levels, codebook_size, disambiguation, books.level_errors)


def disambiguation_indices(codes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(each item's index within its group of identical codes, in catalog order; largest group size)."""
    _, group = torch.unique(codes, dim=0, return_inverse=True)
    order = torch.argsort(group, stable=True)
    sizes = torch.bincount(group)
    starts = torch.cumsum(sizes, 0) - sizes
    index = torch.empty_like(group)
    index[order] = torch.arange(group.numel()) - starts[group[order]]
    return index, int(sizes.max())
