"""Batched evaluation of any scorer (the LLM, or a floor) on prompt-shard examples.

A scorer maps a batch of example rows to a score matrix over the whole catalog; everything after
that (history masking, both protocols, per-task grouping, top-k lists) is shared, so the LLM and
the popularity/BM25 floors are measured by exactly the same code. Only per-example ranks are kept
between batches, so memory stays bounded by one batch's [batch, n_items] scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import torch
from tqdm.auto import tqdm

from gems.config import Config
from gems.dpmoe import DPMoEModel
from gems.dual_view import dpmoe_scorer
from gems.metrics import (
    DEFAULT_KS,
    TaskMetrics,
    history_exclusion_mask,
    metrics_by_task,
    rank_examples,
    unified_metric,
)
from gems.scoring import ScoreBatch
from gems.tasks import TASKS

REQUIRED_COLUMNS = ("task", "history_item_ids", "target_item_id")


@dataclass
class EvalResult:
    """Metrics per task and protocol, and optionally each example's ranked top-k."""

    metrics: TaskMetrics
    #: example_id, task, target_item_id, rank (full catalog), top_item_ids, top_scores; or None
    top_k: pl.DataFrame | None = None

    @property
    def unified(self) -> float:
        """Mean of search and rec full-catalog NDCG@10 (raises when a task is missing)."""
        return unified_metric(self.metrics)


def require_columns(frame: pl.DataFrame, columns: Sequence[str], what: str = "examples") -> None:
    """A clear error naming the columns ``frame`` lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lack columns {missing} (have {frame.columns})")


def _check_examples(examples: pl.DataFrame, item_index: dict[str, int]) -> None:
    require_columns(examples, REQUIRED_COLUMNS)
    bad_tasks = set(examples["task"].unique().to_list()) - set(TASKS)
    if bad_tasks:
        raise ValueError(f"unknown task values {sorted(map(str, bad_tasks))}; expected {TASKS}")
    unknown = [t for t in examples["target_item_id"].to_list() if t not in item_index]
    if unknown:
        raise ValueError(f"{len(unknown)} target items are not in the evaluated catalog "
                         f"(first: {unknown[:5]}); pass the catalog the shards were built with")


def subsample_per_task(examples: pl.DataFrame, max_examples: int | None,
                       seed: int = 0) -> pl.DataFrame:
    """At most ``max_examples`` rows per task, a seeded subset in original order (cfg.eval.max_examples)."""
    if max_examples is None:
        return examples
    parts = []
    for task in TASKS:
        rows = examples.with_row_index("_row").filter(pl.col("task") == task)
        if rows.height > max_examples:
            rows = rows.sample(n=max_examples, seed=seed).sort("_row")
        parts.append(rows)
    return pl.concat(parts).sort("_row").drop("_row")


def evaluate_scorer(score_batch: ScoreBatch, examples: pl.DataFrame, item_ids: Sequence[str], *,
                    batch_size: int = 16, mask_history_rec: bool = True, num_negatives: int = 99,
                    seed: int = 0, ks: Sequence[int] = DEFAULT_KS, top_k: int | None = None,
                    progress: bool = True, desc: str = "evaluate") -> EvalResult:
    """Rank every example's target under both protocols and summarise per task."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    item_index = {str(item): i for i, item in enumerate(item_ids)}
    if len(item_index) != len(item_ids):
        raise ValueError("item_ids contain duplicates")
    _check_examples(examples, item_index)
    n_items = len(item_ids)
    keys_all = (examples["example_id"].cast(pl.Utf8).to_list() if "example_id" in examples.columns
                else [str(i) for i in range(examples.height)])
    ranks: dict[str, list[torch.Tensor]] = {"full": [], "sampled": []}
    top_rows: list[dict[str, object]] = []
    with tqdm(total=examples.height, desc=desc, unit="ex", disable=not progress) as bar:
        for start in range(0, examples.height, batch_size):
            rows = examples.slice(start, batch_size)
            keys = keys_all[start:start + rows.height]
            scores = score_batch(rows).detach().float().cpu()
            if scores.shape != (rows.height, n_items):
                raise ValueError(f"scorer returned shape {tuple(scores.shape)}, expected "
                                 f"({rows.height}, {n_items})")
            targets = torch.tensor([item_index[t] for t in rows["target_item_id"].to_list()])
            histories = [[item_index[h] for h in (hist or []) if h in item_index]
                         if mask_history_rec and task == "rec" else []
                         for hist, task in zip(rows["history_item_ids"].to_list(),
                                               rows["task"].to_list(), strict=True)]
            exclude = history_exclusion_mask(histories, targets, n_items)
            for proto, r in rank_examples(scores, targets, keys, exclude, num_negatives,
                                          seed).items():
                ranks[proto].append(r)
            if top_k:
                top_rows.extend(_top_k_rows(scores, exclude, rows, keys, ranks["full"][-1],
                                            list(item_ids), top_k))
            bar.update(rows.height)
    if examples.height == 0:
        return EvalResult(metrics={}, top_k=None)
    merged = {proto: torch.cat(parts) for proto, parts in ranks.items()}
    metrics = metrics_by_task(examples["task"].to_list(), merged, ks)
    top = pl.DataFrame(top_rows) if top_k else None
    return EvalResult(metrics=metrics, top_k=top)


def _top_k_rows(scores: torch.Tensor, exclude: torch.Tensor, rows: pl.DataFrame,
                keys: list[str], full_ranks: torch.Tensor, item_ids: list[str],
                k: int) -> list[dict[str, object]]:
    masked = scores.masked_fill(exclude, float("-inf"))
    values, indices = masked.topk(min(k, scores.shape[1]), dim=1)
    return [{"example_id": key, "task": task, "target_item_id": target, "rank": int(rank),
             "top_item_ids": [item_ids[j] for j in idx.tolist()], "top_scores": val.tolist()}
            for key, task, target, rank, idx, val in zip(
                keys, rows["task"].to_list(), rows["target_item_id"].to_list(),
                full_ranks.tolist(), indices, values, strict=True)]


def model_scorer(model: torch.nn.Module, tokenizer: object, item_token_ids: torch.Tensor,
                 max_len: int, batch_size: int = 16, autocast_dtype: torch.dtype | None = None
                 ) -> ScoreBatch:
    """A ScoreBatch that encodes each row's ``prompt`` and scores the catalog's item tokens
    (``autocast_dtype``: see :func:`gems.scoring.score_catalog`). A model that ranks the catalog
    its own way (DPMoE's two views) is scored its way (:func:`gems.dual_view.dpmoe_scorer`)."""
    if isinstance(model, DPMoEModel):
        return dpmoe_scorer(model, tokenizer, max_len, batch_size, autocast_dtype)
    from gems.prompts import encode_prompt
    from gems.scoring import score_catalog

    pad_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    if pad_id is None:
        raise ValueError("tokenizer has no pad token; load it with gems.model.load_backbone")

    def score(rows: pl.DataFrame) -> torch.Tensor:
        encoded = [encode_prompt(tokenizer, p, max_len) for p in rows["prompt"].to_list()]
        return score_catalog(model, encoded, item_token_ids, pad_id, batch_size=batch_size,
                             autocast_dtype=autocast_dtype)

    return score


def evaluate_model(model: torch.nn.Module, tokenizer: object, examples: pl.DataFrame,
                   item_ids: Sequence[str], item_token_ids: torch.Tensor, *, max_len: int,
                   batch_size: int = 16, mask_history_rec: bool = True, num_negatives: int = 99,
                   seed: int = 0, ks: Sequence[int] = DEFAULT_KS, top_k: int | None = None,
                   progress: bool = True, autocast_dtype: torch.dtype | None = None) -> EvalResult:
    """Evaluate the LLM: one forward pass per prompt (batched), next-token logits over items."""
    if "prompt" not in examples.columns:
        raise ValueError(f"examples lack the 'prompt' column (have {examples.columns})")
    if len(item_ids) != len(item_token_ids):
        raise ValueError(f"{len(item_ids)} item ids but {len(item_token_ids)} item token ids")
    scorer = model_scorer(model, tokenizer, item_token_ids, max_len, batch_size, autocast_dtype)
    return evaluate_scorer(scorer, examples, item_ids, batch_size=batch_size,
                           mask_history_rec=mask_history_rec, num_negatives=num_negatives,
                           seed=seed, ks=ks, top_k=top_k, progress=progress, desc="evaluate model")


def evaluate_with_config(model: torch.nn.Module, tokenizer: object, examples: pl.DataFrame,
                         item_ids: Sequence[str], item_token_ids: torch.Tensor, cfg: Config, *,
                         top_k: int | None = None, progress: bool = True,
                         autocast_dtype: torch.dtype | None = None) -> EvalResult:
    """``evaluate_model`` with cfg.eval settings, cfg.train.max_seq_len and the seeded
    cfg.eval.max_examples subset per task."""
    subset = subsample_per_task(examples, cfg.eval.max_examples, cfg.data.seed)
    return evaluate_model(model, tokenizer, subset, item_ids, item_token_ids,
                          max_len=cfg.train.max_seq_len, top_k=top_k, progress=progress,
                          autocast_dtype=autocast_dtype, **eval_settings(cfg))


def eval_settings(cfg: Config) -> dict[str, Any]:
    """The evaluate_scorer keywords cfg.eval sets (batch, masking, negatives, seed, ks)."""
    return {"batch_size": cfg.eval.batch_size, "mask_history_rec": cfg.eval.mask_history_rec,
            "num_negatives": cfg.eval.num_negatives, "seed": cfg.data.seed, "ks": cfg.eval.ks}
