"""Residual k-means: L codebooks of K centroids, each quantising what the levels before it left.

Level 1 clusters the item embeddings; level l clusters the residuals (embedding minus the centroids
chosen at levels 1..l-1). An item's code is its centroid index per level, so L tokens out of L*K
name up to K^L items, and items with similar embeddings share code prefixes: what makes a prefix
trie decodable and lets items learn from their neighbours (TIGER's RQ-VAE codes without the learned
encoder). Lloyd iterations from seeded k-means++ starts, in torch: deterministic for a seed, and no
dependency beyond the one every worker already has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DISTANCE_CHUNK = 65_536  # points per distance matrix: bounds memory at [chunk, K] on 1M-item catalogs


@dataclass(frozen=True)
class ResidualCodebooks:
    """Centroids per level, each item's centroid index per level, and how much each level explained."""

    centroids: torch.Tensor  # [levels, K, d] float32
    codes: torch.Tensor  # [n_items, levels] long, values in [0, K)
    #: mean squared norm of what is left to quantise: before level 1, then after each level (levels + 1)
    level_errors: tuple[float, ...]


def check_codebook_shape(levels: int, codebook_size: int) -> None:
    """ValueError naming the field when the codebook cannot give every level a choice."""
    if levels < 1:
        raise ValueError(f"levels (L) must be >= 1, got {levels}")
    if codebook_size < 2:
        raise ValueError(f"codebook_size (K) must be >= 2, got {codebook_size}: one centroid per "
                         "level gives every item the same code")


def check_embeddings(embeddings: torch.Tensor) -> None:
    """ValueError when ``embeddings`` is not a finite, non-empty [n_items, d] matrix."""
    if embeddings.dim() != 2:
        raise ValueError(f"item embeddings must be [n_items, d], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] == 0:
        raise ValueError("the catalog is empty: item embeddings have 0 rows")
    if embeddings.shape[1] == 0:
        raise ValueError("item embeddings have width 0")
    bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"item embeddings contain NaN or inf in {bad.numel()} row(s) (first: "
                         f"{bad[:5].tolist()}); fix the embedding step before building codes")


def residual_kmeans(embeddings: torch.Tensor, levels: int, codebook_size: int, *, seed: int = 0,
                    iterations: int = 25) -> ResidualCodebooks:
    """Fit ``levels`` codebooks of ``codebook_size`` centroids on ``embeddings`` [n_items, d].

    With fewer distinct items than ``codebook_size`` a level simply leaves some centroids unused;
    every level's error is never above the one before it (each centroid is its members' mean).
    """
    check_codebook_shape(levels, codebook_size)
    check_embeddings(embeddings)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    generator = torch.Generator().manual_seed(seed)
    residual = embeddings.detach().to(device="cpu", dtype=torch.float32).clone()
    errors = [_mean_squared_norm(residual)]
    centroids, codes = [], []
    for _ in range(levels):
        level_centroids, assignment = kmeans(residual, codebook_size, generator, iterations)
        residual -= level_centroids[assignment]
        centroids.append(level_centroids)
        codes.append(assignment)
        errors.append(_mean_squared_norm(residual))
    return ResidualCodebooks(torch.stack(centroids), torch.stack(codes, dim=1), tuple(errors))


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int,
           init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, d], assignment [n]) by Lloyd iterations from ``init`` or a k-means++ start.

    A cluster left empty is re-seeded at the point worst served by its centroid, so K centroids
    keep covering the data instead of idling; iterations stop early once no point changes cluster.
    ``init`` [k, d] warm-starts from earlier centroids (e.g. last night's codebook).
    """
    if init is not None and tuple(init.shape) != (k, points.shape[1]):
        raise ValueError(f"init centroids must be [{k}, {points.shape[1]}], got {tuple(init.shape)}")
    centroids = _kmeans_plus_plus(points, k, generator) if init is None else init.to(points.dtype).clone()
    previous = None
    for _ in range(iterations):
        assignment, distance = _nearest(points, centroids)
        if previous is not None and torch.equal(assignment, previous):
            return centroids, assignment
        centroids = _cluster_means(points, assignment, centroids)
        _reseed_empty(centroids, assignment, distance, points)
        previous = assignment
    return centroids, _nearest(points, centroids)[0]


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k starts drawn with probability proportional to the squared distance to the nearest start.

    Once every point coincides with a start (fewer distinct points than k) the remaining starts are
    drawn uniformly: duplicates of used centroids, which no point prefers, so they stay unused.
    """
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = _squared_distance(points, points[chosen[0]])
    for _ in range(1, k):
        total = float(nearest.sum())
        if total > 0:
            index = int(torch.multinomial(nearest / total, 1, generator=generator))
        else:
            index = int(torch.randint(n, (1,), generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, _squared_distance(points, points[index]))
    return points[torch.tensor(chosen)].clone()


def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each point's nearest centroid (the lowest index on ties) and its squared distance."""
    assignment = torch.empty(points.shape[0], dtype=torch.long)
    distance = torch.empty(points.shape[0], dtype=points.dtype)
    for start in range(0, points.shape[0], _DISTANCE_CHUNK):
        chunk = points[start:start + _DISTANCE_CHUNK]
        best, index = torch.cdist(chunk, centroids).min(dim=1)
        assignment[start:start + chunk.shape[0]] = index
        distance[start:start + chunk.shape[0]] = best.square()
    return assignment, distance


def _cluster_means(points: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each cluster's member mean; a cluster without members keeps its centroid."""
    k = centroids.shape[0]
    counts = torch.bincount(assignment, minlength=k)
    sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
    filled = counts > 0
    means = centroids.clone()
    means[filled] = sums[filled] / counts[filled].unsqueeze(1).to(points.dtype)
    return means


def _reseed_empty(centroids: torch.Tensor, assignment: torch.Tensor, distance: torch.Tensor,
                  points: torch.Tensor) -> None:
    """Move empty clusters' centroids onto the points farthest from their own centroid (in place)."""
    empty = (torch.bincount(assignment, minlength=centroids.shape[0]) == 0).nonzero().flatten()
    movable = min(empty.numel(), int((distance > 0).sum()))
    if movable == 0:
        return
    farthest = torch.topk(distance, movable).indices
    centroids[empty[:movable]] = points[farthest]


def _squared_distance(points: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    return (points - centre).square().sum(dim=1)


def _mean_squared_norm(residual: torch.Tensor) -> float:
    return float(residual.double().square().sum(dim=1).mean())
