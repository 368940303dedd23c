"""One model measured twice on the same test rows: alone, and with its search rows fused with
BM25 of the query (``gems.lexical_fusion``), the fusion weight chosen on val search rows.

One forward pass per test row serves both evaluations, so the fused row costs the val search
scoring and BM25, not a second test pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch

from gems.config import Config
from gems.evaluate import EvalResult, eval_settings, evaluate_scorer, model_scorer, subsample_per_task
from gems.floors import BM25Floor
from gems.lexical_fusion import DEFAULT_GRID, best_weight, bm25_scores, fused_scorer, memoized


@dataclass
class FusedEvaluation:
    plain: EvalResult
    fused: EvalResult
    weight: float  # w in (1 - w) * z(model) + w * z(BM25), chosen on val
    val_ndcg: dict[float, float]  # every weight's val search NDCG@10 (full catalog)


def evaluate_with_bm25_fusion(model: torch.nn.Module, tokenizer: object, test: pl.DataFrame,
                              val: pl.DataFrame, items: pl.DataFrame, item_ids: Sequence[str],
                              item_token_ids: torch.Tensor, cfg: Config, *,
                              grid: Sequence[float] = DEFAULT_GRID, top_k: int | None = None,
                              progress: bool = False) -> FusedEvaluation:
    """``evaluate_with_config``'s result on ``test`` (same rows, same settings) and the fused one.

    The val rows are cfg.eval.max_examples' seeded subset, search rows only.
    """
    for name, frame in (("test", test), ("val", val)):
        if "prompt" not in frame.columns:
            raise ValueError(f"{name} examples lack the 'prompt' column (have {frame.columns})")
    if len(item_ids) != len(item_token_ids):
        raise ValueError(f"{len(item_ids)} item ids but {len(item_token_ids)} item token ids")
    settings = eval_settings(cfg)
    subset = subsample_per_task(test, cfg.eval.max_examples, cfg.data.seed)
    raw = model_scorer(model, tokenizer, item_token_ids, cfg.train.max_seq_len, cfg.eval.batch_size)
    score = memoized(raw)
    plain = evaluate_scorer(score, subset, item_ids, top_k=top_k, progress=progress,
                            desc="evaluate model", **settings)
    bm25 = BM25Floor.fit(items, item_ids)
    search = subsample_per_task(val, cfg.eval.max_examples, cfg.data.seed).filter(
        pl.col("task") == "search")
    index = {str(item): i for i, item in enumerate(item_ids)}
    targets = torch.tensor([index[str(t)] for t in search["target_item_id"].to_list()], dtype=torch.long)
    model_val = raw(search).detach().float().cpu() if search.height else torch.zeros(0, len(item_ids))
    weight, values = best_weight(model_val, bm25_scores(bm25, search), targets, grid)
    fused = evaluate_scorer(fused_scorer(score, bm25, weight), subset, item_ids, top_k=top_k,
                            progress=progress, desc="evaluate model+bm25", **settings)
    return FusedEvaluation(plain, fused, weight, values)
