"""SASRec as a floor in the comparison: ``sasrec`` (history only) and ``sasrec-bm25`` (search fused
with the query).

SASRec has no way to read a query, so plain ``sasrec`` ranks search examples from the history
alone (what the user's behaviour predicts, whatever they typed). ``sasrec-bm25`` lets the query in
the simplest honest way: per search example, the SASRec scores and the BM25 scores of the query
(``gems.floors.BM25Floor``) are mixed by ``gems.lexical_fusion``,
``(1 - w) * z(SASRec) + w * z(BM25)``, with ``w`` chosen on VAL search rows (or fixed in the
config). Its rec
rankings are plain SASRec's, so both methods have both tasks and a unified metric.

Both are measured by ``gems.evaluate.evaluate_scorer``, the code that measures the LLM and the
other floors (history masking for rec, both protocols, pessimistic ties).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch

from gems.evaluate import EvalResult, ScoreBatch, evaluate_scorer
from gems.floors import BM25Floor
from gems.lexical_fusion import fused_scorer, weight_on_search_rows
from gems.sasrec import SASRec, score_examples
from gems.sasrec_config import SASRecConfig
from gems.sasrec_train import SASRecFit, fit_sasrec

SASREC_METHODS: tuple[str, ...] = ("sasrec", "sasrec-bm25")


def tune_fusion_weight(model: SASRec, bm25: BM25Floor, val: pl.DataFrame,
                       grid: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The weight in ``grid`` with the best val search NDCG@10 (full catalog; the smallest weight
    on ties) and every weight's value. Search rankings are never history-masked."""
    search = val.filter(pl.col("task") == "search")
    if search.height == 0:
        raise ValueError("no val search rows to tune the fusion weight on; set "
                         "sasrec.search_fusion_weight")
    return weight_on_search_rows(lambda rows: score_examples(model, rows), bm25, search, model.item_ids, grid)


def sasrec_scorer(model: SASRec, bm25: BM25Floor | None = None, weight: float = 0.0) -> ScoreBatch:
    """A ScoreBatch: SASRec scores; search rows fused with BM25 when ``bm25`` is given."""

    def score(rows: pl.DataFrame) -> torch.Tensor:
        return score_examples(model, rows)

    return score if bm25 is None else fused_scorer(score, bm25, weight)


@dataclass
class SASRecOutcome:
    """What ``evaluate_sasrec`` measured, and how."""

    results: dict[str, EvalResult]  # method -> metrics
    fit: SASRecFit
    fusion_weight: float | None  # sasrec-bm25's w (None when it was not evaluated)
    eval_seconds: dict[str, float]  # method -> evaluation wall time (tuning w counts for sasrec-bm25)


def evaluate_sasrec(train: pl.DataFrame, val: pl.DataFrame, examples: pl.DataFrame,
                    items: pl.DataFrame, item_ids: Sequence[str], cfg: SASRecConfig, *,
                    train_seed: int | None = None, methods: Sequence[str] = SASREC_METHODS,
                    **eval_kwargs: object) -> SASRecOutcome:
    """Fit on ``train`` (epoch chosen on ``val``), measure ``methods`` on ``examples`` (val or
    test). ``train_seed`` overrides ``cfg.seed``.

    ``eval_kwargs`` go to ``evaluate_scorer`` (mask_history_rec, num_negatives, seed, ks, ...);
    ``mask_history_rec`` also applies to the val metric that picks the epoch.
    """
    unknown = sorted(set(methods) - set(SASREC_METHODS))
    if unknown:
        raise ValueError(f"unknown SASRec methods {unknown}; known: {SASREC_METHODS}")
    catalog = [str(i) for i in item_ids]
    mask = bool(eval_kwargs.get("mask_history_rec", True))
    fit = fit_sasrec(train, val, catalog, cfg, seed=train_seed, mask_history_rec=mask)
    results: dict[str, EvalResult] = {}
    seconds: dict[str, float] = {}
    weight = None
    for method in SASREC_METHODS:
        if method not in methods:
            continue
        started = time.perf_counter()
        bm25 = None
        if method == "sasrec-bm25":
            bm25 = BM25Floor.fit(items, catalog)
            weight = cfg.search_fusion_weight
            if weight is None:
                weight, _ = tune_fusion_weight(fit.model, bm25, val, cfg.fusion_grid)
        results[method] = evaluate_scorer(sasrec_scorer(fit.model, bm25, weight or 0.0), examples,
                                          catalog, desc=method, **eval_kwargs)  # type: ignore[arg-type]
        seconds[method] = time.perf_counter() - started
    return SASRecOutcome(results, fit, weight, seconds)
