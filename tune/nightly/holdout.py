"""Champion and challenger on the same fresh holdout, ranked over the same (tonight's) catalog.

The champion is scored as it serves: items first seen after it was trained have no token in its
vocabulary, so it cannot rank them (score -inf, a miss whenever one is the target). The challenger
learned their tokens tonight. Both see the same seeded subset of holdout examples and the same
sampled negatives, so the metric difference is a paired comparison. Retention compares the two
directly: perplexity of each on held-out general text, and KL(champion || challenger).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import ray
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gems.config import Config, ModelConfig
from gems.data.shards import read_items, read_split
from gems.evaluate import EvalResult, ScoreBatch, evaluate_scorer, model_scorer, subsample_per_task
from gems.evaluate_fused import choose_weight
from gems.floors import BM25Floor
from gems.items import item_token
from gems.lexical_fusion import fused_scorer
from gems.metrics import flatten_metrics
from gems.model import item_token_ids, load_backbone
from gems.retention import measure_retention
from tune.config import JobConfig
from tune.nightly.decision import ModelScores
from tune.nightly.journal import UNIFIED
from tune.nightly.warm_start import WarmStart
from tune.registry.models import servable_model_dir


@dataclass
class HoldoutResult:
    """One model's ranking quality on the holdout, with what the decision and the record need."""

    result: EvalResult
    known_items: int  # catalog items the model has a token for

    @property
    def unified(self) -> float:
        return self.result.unified

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}unified": self.unified, **flatten_metrics(self.result.metrics, prefix=prefix),
                f"{prefix}known_items": float(self.known_items)}


@dataclass
class RetentionPair:
    champion_ppl: float | None
    challenger_ppl: float | None
    metrics: dict[str, float] = field(default_factory=dict)


def load_ranking_model(model_dir: Path, cache_root: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved model dir loaded exactly as training loads a backbone (fp32, left padding)."""
    return load_backbone(ModelConfig(name_or_path=str(model_dir)), cache_root)


@dataclass(frozen=True)
class SearchFusion:
    """How a model's served search ranking mixes in BM25: its catalog's text and the weight."""

    items: pl.DataFrame
    weight: float


def catalog_scorer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, item_ids: Sequence[str],
                   max_len: int, batch_size: int,
                   fusion: SearchFusion | None = None) -> tuple[ScoreBatch, int]:
    """A scorer over the whole catalog that gives items without a token -inf; and how many it knows.
    With ``fusion`` the known items' search scores are fused with BM25 over the model's own catalog,
    as its served ranker does."""
    vocab = tokenizer.get_vocab()
    known = [i for i, item in enumerate(item_ids) if item_token(str(item)) in vocab]
    known_ids = [item_ids[i] for i in known]
    inner = model_scorer(model, tokenizer, item_token_ids(tokenizer, known_ids), max_len, batch_size)
    if fusion is not None and fusion.weight > 0 and known:
        inner = fused_scorer(inner, BM25Floor.fit(fusion.items, known_ids), fusion.weight)
    columns = torch.tensor(known, dtype=torch.long)

    def score(rows: pl.DataFrame) -> torch.Tensor:
        out = torch.full((rows.height, len(item_ids)), float("-inf"))
        if len(known):
            out[:, columns] = inner(rows).detach().float().cpu()
        return out

    return score, len(known)


def challenger_fusion(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, val: pl.DataFrame,
                      items: pl.DataFrame, cfg: Config) -> SearchFusion | None:
    """The challenger's fusion (eval.bm25_fusion), its weight chosen on tonight's val search rows
    whose targets it has a token for; None when fusion is off."""
    if not cfg.eval.bm25_fusion:
        return None
    vocab = tokenizer.get_vocab()
    known_ids = [str(i) for i in items["item_id"].to_list() if item_token(str(i)) in vocab]
    score = model_scorer(model, tokenizer, item_token_ids(tokenizer, known_ids), cfg.train.max_seq_len,
                         cfg.eval.batch_size)
    rows = val.filter(pl.col("target_item_id").cast(pl.String).is_in(known_ids))
    model.eval()
    with torch.no_grad():
        weight, _ = choose_weight(score, BM25Floor.fit(items, known_ids), rows, known_ids, cfg)
    return SearchFusion(items=items, weight=weight)


def holdout_examples(test: pl.DataFrame, cfg: Config) -> pl.DataFrame:
    """The seeded subset both models are evaluated on (cfg.eval.max_examples per task)."""
    return subsample_per_task(test, cfg.eval.max_examples, cfg.data.seed)


def evaluate_on_holdout(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: pl.DataFrame,
                        item_ids: Sequence[str], cfg: Config, top_k: int | None = None,
                        fusion: SearchFusion | None = None) -> HoldoutResult:
    scorer, known = catalog_scorer(model, tokenizer, item_ids, cfg.train.max_seq_len, cfg.eval.batch_size,
                                   fusion)
    model.eval()
    with torch.no_grad():
        result = evaluate_scorer(scorer, examples, item_ids, batch_size=cfg.eval.batch_size,
                                 mask_history_rec=cfg.eval.mask_history_rec,
                                 num_negatives=cfg.eval.num_negatives, seed=cfg.data.seed, ks=cfg.eval.ks,
                                 top_k=top_k, progress=False)
    return HoldoutResult(result=result, known_items=known)


def compare_retention(champion: PreTrainedModel, challenger: PreTrainedModel,
                      challenger_tokenizer: PreTrainedTokenizerBase, cfg: Config) -> RetentionPair:
    """Perplexity of both on general text, KL(champion || challenger), MMLU of both."""
    basis = Path(cfg.gems.general_corpus).expanduser() if cfg.gems.general_corpus else None
    r = measure_retention(champion, challenger, challenger_tokenizer,
                          max_tokens=cfg.eval.retention_max_tokens, mmlu_questions=cfg.eval.mmlu_questions,
                          seed=cfg.data.seed, basis_corpus=basis)
    metrics = {f"challenger/retention/{k}": v for k, v in
               (("ppl", r.ppl_tuned), ("kl_vs_champion", r.kl), ("item_mass", r.item_mass),
                ("mmlu", r.mmlu_tuned)) if v is not None}
    metrics.update({f"champion/retention/{k}": v for k, v in (("ppl", r.ppl_base), ("mmlu", r.mmlu_base))
                    if v is not None})
    return RetentionPair(champion_ppl=r.ppl_base, challenger_ppl=r.ppl_tuned, metrics=metrics)


def new_item_stats(top_k: pl.DataFrame | None, examples: pl.DataFrame,
                   new_items: set[str]) -> dict[str, float]:
    """How the challenger treats items the champion never saw: how many holdout targets are new,
    and in what share of holdout rankings a new item reaches the top k."""
    stats = {"holdout/examples": float(examples.height), "holdout/new_items": float(len(new_items)),
             "holdout/new_item_targets": float(examples["target_item_id"].is_in(sorted(new_items)).sum())}
    if top_k is not None and top_k.height and new_items:
        hits = [any(i in new_items for i in row) for row in top_k["top_item_ids"].to_list()]
        stats["challenger/new_item_in_top_k_share"] = sum(hits) / len(hits)
    return stats


def evaluate_night(champion_dir: str, challenger_dir: str, shard_dir: str, champion_items: str,
                   cfg_json: dict[str, Any], champion_bm25_weight: float = 0.0) -> dict[str, float]:
    """Both models on the holdout (+ retention), each ranking as it serves: the champion's search
    fused with BM25 at its registered weight, the challenger's at the weight chosen on tonight's
    val rows (``challenger/bm25_weight``, which its registration serves with); a plain dict so it
    can run as a Ray GPU task."""
    cfg = JobConfig.model_validate(cfg_json)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = cfg.resolve(cfg.model.cache_dir)
    items = read_items(shard_dir).sort("item_id")
    item_ids = items["item_id"].to_list()
    examples = holdout_examples(read_split(shard_dir, "test"), cfg)
    known_before = set(pl.read_parquet(champion_items, columns=["item_id"])["item_id"].cast(pl.String))
    new_items = set(item_ids) - known_before

    champion, champion_tokenizer = load_ranking_model(Path(champion_dir), cache)
    challenger, tokenizer = load_ranking_model(Path(challenger_dir), cache)
    champion.to(device)
    challenger.to(device)
    metrics: dict[str, float] = {}
    champion_fusion = (SearchFusion(pl.read_parquet(champion_items), champion_bm25_weight)
                       if champion_bm25_weight > 0 else None)
    fusion = challenger_fusion(challenger, tokenizer, read_split(shard_dir, "val"), items, cfg)
    champ = evaluate_on_holdout(champion, champion_tokenizer, examples, item_ids, cfg, fusion=champion_fusion)
    chall = evaluate_on_holdout(challenger, tokenizer, examples, item_ids, cfg, top_k=cfg.mlflow.top_k,
                                fusion=fusion)
    metrics.update(champ.metrics("champion/test/"))
    metrics.update(chall.metrics("challenger/test/"))
    metrics.update({"champion/bm25_weight": champion_bm25_weight,
                    "challenger/bm25_weight": fusion.weight if fusion is not None else 0.0})
    metrics.update(new_item_stats(chall.result.top_k, examples, new_items))
    if cfg.eval.retention:
        metrics.update(compare_retention(champion, challenger, tokenizer, cfg).metrics)
    return metrics


def run_evaluation(cfg: JobConfig, warm: WarmStart, checkpoint: Path, shard_dir: Path) -> dict[str, float]:
    """evaluate_night here on CPU clusters; on a GPU worker when training uses GPUs."""
    args = (str(warm.model_dir), str(servable_model_dir(checkpoint)), str(shard_dir), str(warm.items_path),
            cfg.model_dump(mode="json"), warm.bm25_weight)
    if cfg.train.use_gpu:  # two copies of a 3B model: evaluate on a GPU worker, not the head
        task = ray.remote(num_gpus=1, num_cpus=cfg.train.cpus_per_worker)(evaluate_night)
        return ray.get(task.remote(*args))
    return evaluate_night(*args)


def scores_of(metrics: Mapping[str, float], who: str) -> ModelScores:
    return ModelScores(unified=float(metrics.get(f"{who}/{UNIFIED}", math.nan)),
                       perplexity=metrics.get(f"{who}/retention/ppl"),
                       kl_from_champion=metrics.get(f"{who}/retention/kl_vs_champion"),
                       metrics={k: v for k, v in metrics.items() if k.startswith(f"{who}/")})
