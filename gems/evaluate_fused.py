"""One model measured twice on the same rows: alone, and with its search rows fused with BM25 of
the query (``gems.lexical_fusion``), the fusion weight chosen on val search rows (or fixed).

One forward pass per row serves both evaluations (and the weight's choice when the evaluated rows
are the val rows themselves, as in training's val evaluations), so the fused result costs BM25 and
at most the val search scoring, not a second pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch

from gems.config import Config
from gems.evaluate import (
    EvalResult,
    ScoreBatch,
    eval_settings,
    evaluate_scorer,
    model_scorer,
    subsample_per_task,
)
from gems.floors import BM25Floor
from gems.lexical_fusion import fused_scorer, memoized, weight_on_search_rows


@dataclass
class FusedEvaluation:
    plain: EvalResult
    fused: EvalResult
    weight: float  # w in (1 - w) * z(model) + w * z(BM25), chosen on val (or fixed)
    val_ndcg: dict[float, float]  # every tried weight's val search NDCG@10 (empty when fixed)


def evaluate_with_bm25_fusion(model: torch.nn.Module, tokenizer: object, examples: pl.DataFrame,
                              val: pl.DataFrame, items: pl.DataFrame, item_ids: Sequence[str],
                              item_token_ids: torch.Tensor, cfg: Config, *, top_k: int | None = None,
                              progress: bool = False,
                              autocast_dtype: torch.dtype | None = None) -> FusedEvaluation:
    """``evaluate_with_config``'s result on ``examples`` (same rows, same settings) and the fused one.

    The weight is chosen on the search rows of ``val``'s cfg.eval.max_examples seeded subset
    (pass ``val`` = ``examples`` to evaluate on val itself: then the chosen weight's value is
    slightly optimistic, as any choice on the rows it is reported on).
    """
    for name, frame in (("evaluated", examples), ("val", val)):
        if "prompt" not in frame.columns:
            raise ValueError(f"{name} examples lack the 'prompt' column (have {frame.columns})")
    if len(item_ids) != len(item_token_ids):
        raise ValueError(f"{len(item_ids)} item ids but {len(item_token_ids)} item token ids")
    settings = eval_settings(cfg)
    subset = subsample_per_task(examples, cfg.eval.max_examples, cfg.data.seed)
    raw = model_scorer(model, tokenizer, item_token_ids, cfg.train.max_seq_len, cfg.eval.batch_size,
                       autocast_dtype)
    score = memoized(raw)
    plain = evaluate_scorer(score, subset, item_ids, top_k=top_k, progress=progress,
                            desc="evaluate model", **settings)
    bm25 = BM25Floor.fit(items, item_ids)
    weight, values = choose_weight(score if val is examples else raw, bm25, val, item_ids, cfg)
    fused = evaluate_scorer(fused_scorer(score, bm25, weight), subset, item_ids, top_k=top_k,
                            progress=progress, desc="evaluate model+bm25", **settings)
    return FusedEvaluation(plain, fused, weight, values)


def choose_weight(score: ScoreBatch, bm25: BM25Floor, val: pl.DataFrame, item_ids: Sequence[str],
                  cfg: Config) -> tuple[float, dict[float, float]]:
    """cfg.eval.bm25_weight when fixed (no values), else the best weight on the search rows of
    ``val``'s cfg.eval.max_examples seeded subset and every tried weight's NDCG@10.

    ``score`` must not be memoized on another split's rows (example ids may repeat across splits)."""
    if cfg.eval.bm25_weight is not None:
        return cfg.eval.bm25_weight, {}
    search = subsample_per_task(val, cfg.eval.max_examples, cfg.data.seed).filter(pl.col("task") == "search")
    return weight_on_search_rows(score, bm25, search, item_ids)
