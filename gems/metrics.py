"""Ranking metrics for next-item prediction: Hit@K, NDCG@K, MRR, per task and protocol.

Each example has exactly one relevant item (the clicked target), so every metric is a function of
the target's 1-based rank:

- Hit@K  = 1 if rank <= K else 0
- NDCG@K = 1 / log2(rank + 1) if rank <= K else 0   (ideal DCG is 1 with one relevant item)
- MRR    = 1 / rank, not truncated at any K

Ties are ranked PESSIMISTICALLY: rank = 1 + #{other candidates with score >= target score}. This
is deterministic and never rewards a model for tying: a model that gives every item the same
score ranks every target last (Hit@1 = 0), not first.

Two protocols:

- ``full``: the target against the whole catalog (primary, what the served model faces).
- ``sampled``: the target against ``num_negatives`` (default 99) random other items, the paper's
  protocol, kept for comparability. Negatives are drawn per example from a generator seeded by
  (seed, example key), so they do not depend on batch composition or evaluation order; they never
  equal the target nor an excluded (masked history) item.

History masking (rec): items already in the user's history are excluded from the candidates,
EXCEPT the target itself: when a user re-clicks an item from their history, that target stays
rankable (excluding it would make the example unanswerable); the other history items are still
removed from the ranking.

Metric names avoid '@' (MLflow rejects it): ``hit_at_5``, ``ndcg_at_10``, ``mrr``, ``count``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gems.tasks import TASKS

PROTOCOLS: tuple[str, ...] = ("full", "sampled")
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
UNIFIED_METRIC = "ndcg_at_10"

#: task -> protocol -> metric name -> value
TaskMetrics = dict[str, dict[str, dict[str, float]]]


def _check_scores(scores: torch.Tensor, targets: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_examples, n_items], got shape {tuple(scores.shape)}")
    if targets.dim() != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(f"targets must be [n_examples]={scores.shape[0]}, got shape "
                         f"{tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= scores.shape[1]):
        raise ValueError(f"target indices must lie in [0, {scores.shape[1]}), got "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: a NaN target would compare as rank 1; fix the model "
                         "or the scorer before evaluating")


def history_exclusion_mask(history_indices: Sequence[Sequence[int]], targets: torch.Tensor,
                           n_items: int) -> torch.Tensor:
    """Bool [n, n_items], True where an item is excluded (in the history and not the target)."""
    n = len(history_indices)
    if targets.shape != (n,):
        raise ValueError(f"need one target per history list: {n} histories, targets "
                         f"{tuple(targets.shape)}")
    rows = [i for i, hist in enumerate(history_indices) for _ in hist]
    cols = [int(j) for hist in history_indices for j in hist]
    mask = torch.zeros(n, n_items, dtype=torch.bool)
    if cols:
        if min(cols) < 0 or max(cols) >= n_items:
            raise ValueError(f"history item indices must lie in [0, {n_items})")
        mask[torch.tensor(rows), torch.tensor(cols)] = True
    mask[torch.arange(n), targets.long()] = False
    return mask


def full_catalog_ranks(scores: torch.Tensor, targets: torch.Tensor,
                       exclude: torch.Tensor | None = None) -> torch.Tensor:
    """1-based pessimistic rank of each target among all non-excluded items. Long [n]."""
    targets = targets.long()
    _check_scores(scores, targets)
    target_scores = scores.gather(1, targets[:, None])
    ahead = scores >= target_scores
    if exclude is not None:
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude mask shape {tuple(exclude.shape)} != scores shape "
                             f"{tuple(scores.shape)}")
        ahead &= ~exclude
    ahead[torch.arange(scores.shape[0]), targets] = False  # the target does not outrank itself
    return 1 + ahead.sum(dim=1)


def _example_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_negatives(n_items: int, targets: torch.Tensor, example_keys: Sequence[str],
                     num_negatives: int = 99, seed: int = 0,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Seeded negatives per example: Long [n, num_negatives], padded with -1 when the catalog
    (minus target and excluded items) has fewer candidates than ``num_negatives``.

    Each example's draw depends only on (seed, its key, its candidate set), so it is the same in
    any batch and any order.
    """
    n = targets.shape[0]
    if len(example_keys) != n:
        raise ValueError(f"need one example key per target: {len(example_keys)} keys, {n} targets")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    allowed = np.ones((n, n_items), dtype=bool)
    if exclude is not None:
        allowed &= ~exclude.cpu().numpy()
    target_np = targets.long().cpu().numpy()
    allowed[np.arange(n), target_np] = False
    out = np.full((n, num_negatives), -1, dtype=np.int64)
    for i in range(n):
        candidates = np.flatnonzero(allowed[i])
        if len(candidates) <= num_negatives:
            out[i, : len(candidates)] = candidates
        else:
            rng = np.random.default_rng(_example_seed(seed, str(example_keys[i])))
            out[i] = rng.choice(candidates, size=num_negatives, replace=False)
    return torch.from_numpy(out)


def sampled_ranks(scores: torch.Tensor, targets: torch.Tensor,
                  negatives: torch.Tensor) -> torch.Tensor:
    """1-based pessimistic rank of each target among itself + its negatives (-1 = padding)."""
    targets = targets.long()
    _check_scores(scores, targets)
    if negatives.dim() != 2 or negatives.shape[0] != scores.shape[0]:
        raise ValueError(f"negatives must be [n_examples, k], got {tuple(negatives.shape)}")
    if (negatives == targets[:, None]).any():
        raise ValueError("a sampled negative equals its target")
    target_scores = scores.gather(1, targets[:, None])
    valid = negatives >= 0
    negative_scores = scores.gather(1, negatives.clamp(min=0))
    return 1 + ((negative_scores >= target_scores) & valid).sum(dim=1)


def ndcg_ks(ks: Sequence[int]) -> list[int]:
    """NDCG cutoffs reported for ``ks`` (NDCG@1 equals Hit@1, so only K >= 5; see EvalConfig.ks)."""
    return [k for k in ks if k >= 5]


def ranking_metrics(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean Hit@K, NDCG@K, MRR over examples from their 1-based ranks, plus ``count``."""
    if ranks.numel() == 0:
        raise ValueError("no ranks to summarise (no examples for this task)")
    if int(ranks.min()) < 1:
        raise ValueError("ranks are 1-based; got a rank < 1")
    r = ranks.double()
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit_at_{k}"] = float((r <= k).double().mean())
    for k in ndcg_ks(ks):
        out[f"ndcg_at_{k}"] = float(torch.where(r <= k, 1.0 / torch.log2(r + 1.0),
                                                torch.zeros_like(r)).mean())
    out["mrr"] = float((1.0 / r).mean())
    out["count"] = float(r.numel())
    return out


def rank_examples(scores: torch.Tensor, targets: torch.Tensor, example_keys: Sequence[str],
                  exclude: torch.Tensor | None = None, num_negatives: int = 99,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Ranks under both protocols for one batch: {"full": Long[n], "sampled": Long[n]}."""
    negatives = sample_negatives(scores.shape[1], targets, example_keys, num_negatives, seed,
                                 exclude)
    return {"full": full_catalog_ranks(scores, targets, exclude),
            "sampled": sampled_ranks(scores, targets, negatives)}


def metrics_by_task(tasks: Sequence[str], ranks: Mapping[str, torch.Tensor],
                    ks: Sequence[int] = DEFAULT_KS) -> TaskMetrics:
    """Group per-example ranks by task: task -> protocol -> metrics. Tasks with no example are
    left out (the caller sees which are present)."""
    task_arr = np.asarray(list(tasks), dtype=object)
    out: TaskMetrics = {}
    for task in dict.fromkeys(tasks):
        idx = torch.from_numpy(np.flatnonzero(task_arr == task))
        out[str(task)] = {proto: ranking_metrics(r[idx], ks) for proto, r in ranks.items()}
    return out


def evaluate_scores(scores: torch.Tensor, targets: torch.Tensor, tasks: Sequence[str], *,
                    history_indices: Sequence[Sequence[int]] | None = None,
                    mask_history_rec: bool = True, example_keys: Sequence[str] | None = None,
                    num_negatives: int = 99, seed: int = 0,
                    ks: Sequence[int] = DEFAULT_KS) -> TaskMetrics:
    """All metrics from one in-memory score matrix [n, n_items] (floors, small evals, tests)."""
    if len(tasks) != scores.shape[0]:
        raise ValueError(f"need one task per example: {len(tasks)} tasks, {scores.shape[0]} rows")
    exclude = None
    if mask_history_rec and history_indices is not None:
        is_rec = [t == "rec" for t in tasks]
        masked = [list(h) if rec else [] for h, rec in zip(history_indices, is_rec, strict=True)]
        exclude = history_exclusion_mask(masked, targets.long(), scores.shape[1])
    keys = list(example_keys) if example_keys is not None else [str(i) for i in range(len(tasks))]
    ranks = rank_examples(scores, targets, keys, exclude, num_negatives, seed)
    return metrics_by_task(tasks, ranks, ks)


def unified_metric(metrics: TaskMetrics) -> float:
    """Model-selection objective: mean of search and rec full-catalog NDCG@10."""
    values = []
    for task in TASKS:
        try:
            values.append(metrics[task]["full"][UNIFIED_METRIC])
        except KeyError as err:
            raise ValueError(f"unified metric needs {task}/full/{UNIFIED_METRIC}; missing "
                             f"{err.args[0]!r} (tasks present: {sorted(metrics)})") from None
    return float(sum(values) / len(values))


def flatten_metrics(metrics: TaskMetrics, prefix: str = "") -> dict[str, float]:
    """``{"search": {"full": {"hit_at_5": x}}}`` -> ``{"<prefix>search/full/hit_at_5": x}``
    (the same keys Ray Tune derives from nested reports; valid MLflow metric names)."""
    return {f"{prefix}{task}/{proto}/{name}": value
            for task, protos in metrics.items()
            for proto, named in protos.items()
            for name, value in named.items()}
