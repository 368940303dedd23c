"""The registered model: an MLflow pyfunc that ranks the catalog for (task, history, query) rows.

It rebuilds each prompt with the same functions preprocessing uses (gems.prompts), scores the
whole catalog with the same scorer evaluation uses (gems.evaluate.model_scorer) and masks the
history for rec exactly as evaluation does, so a served ranking is the evaluated ranking. Loads
with ``mlflow.pyfunc.load_model("models:/<name>@champion")`` in any process that has the pip
requirements; ``gems`` and ``serving`` travel with the model as code_paths. This module must not
import ray.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import polars as pl
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from gems.config import Config
from gems.floors import BM25Floor
from gems.prompts import format_prompt
from serving.requests import RequestError, check_requests, check_top_k, history_ids, is_missing

MODEL_ARTIFACT, ITEMS_ARTIFACT, SETTINGS_ARTIFACT = "model", "items", "settings"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingSettings:
    """How prompts are built and ranked; copied from the training config so they cannot drift."""

    title_max_words: int
    history_len: int
    query_max_chars: int
    max_seq_len: int
    mask_history_rec: bool
    batch_size: int
    top_k: int
    #: search scores (1 - w) z(model) + w z(BM25 of the query) when > 0 (gems.lexical_fusion);
    #: 0 = the model alone (and the value of every version registered before the field existed)
    bm25_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.bm25_weight <= 1:
            raise ValueError(f"bm25_weight must lie in [0, 1], got {self.bm25_weight}")

    @classmethod
    def from_config(cls, cfg: Config, top_k: int, bm25_weight: float | None = None) -> ServingSettings:
        """``top_k``: the default count returned, a registry setting (the job's ``mlflow.top_k``);
        ``bm25_weight``: the search fusion's weight the job chose on val (None = no fusion)."""
        return cls(title_max_words=cfg.data.title_max_words, history_len=cfg.data.history_len,
                   query_max_chars=cfg.data.query_max_chars, max_seq_len=cfg.train.max_seq_len,
                   mask_history_rec=cfg.eval.mask_history_rec, batch_size=cfg.eval.batch_size,
                   top_k=top_k, bm25_weight=bm25_weight or 0.0)


@dataclass
class Catalog:
    """Items sorted by id (the order training and evaluation use, so score ties break alike)."""

    item_ids: list[str]
    titles: dict[str, str]
    path: Path | None = None  # the items table; BM25 reads its text columns only when fusion is on

    @classmethod
    def from_parquet(cls, path: Path) -> Catalog:
        items = pl.read_parquet(path, columns=["item_id", "title"]).with_columns(
            pl.col("item_id").cast(pl.Utf8)).sort("item_id")
        ids = items["item_id"].to_list()
        return cls(item_ids=ids, titles=dict(zip(ids, items["title"].fill_null("").to_list(), strict=True)),
                   path=Path(path))

    def bm25(self) -> BM25Floor:
        """BM25 over this catalog's title, text and category, columns in catalog order."""
        if self.path is None:
            raise ValueError("the catalog was built without its items table; BM25 needs item text")
        items = pl.read_parquet(self.path).with_columns(pl.col("item_id").cast(pl.Utf8))
        return BM25Floor.fit(items, self.item_ids)


def served_queries(requests: pd.DataFrame, settings: ServingSettings) -> list[str | None]:
    """Each search request's query as its prompt shows it (cut to query_max_chars); None for rec."""
    queries = requests["query"] if "query" in requests.columns else [None] * len(requests)
    return [str(q)[:settings.query_max_chars] if task == "search" and not is_missing(q) else None
            for task, q in zip(requests["task"], queries, strict=True)]


def build_prompts(requests: pd.DataFrame, catalog: Catalog, settings: ServingSettings) -> list[str]:
    """The prompt preprocessing would have written for each request (last history_len items).

    Raises RequestError naming the first row that cannot be ranked (serving.requests)."""
    check_requests(requests, catalog.titles)
    prompts = []
    for task, history, query in zip(requests["task"], requests["history_item_ids"],
                                    served_queries(requests, settings), strict=True):
        ids = history_ids(history)[-settings.history_len:]
        prompts.append(format_prompt(task, [(i, catalog.titles[i]) for i in ids], query,
                                     settings.title_max_words))
    return prompts


def exclusion_mask(tasks: Sequence[str], histories: Sequence[Sequence[str]], catalog: Catalog,
                   mask_history_rec: bool) -> torch.Tensor:
    """Bool [n, n_items]: items a rec request must not get back (already in its history)."""
    index = {item: i for i, item in enumerate(catalog.item_ids)}
    mask = torch.zeros(len(tasks), len(catalog.item_ids), dtype=torch.bool)
    if mask_history_rec:
        for row, (task, history) in enumerate(zip(tasks, histories, strict=True)):
            if task == "rec":
                cols = [index[h] for h in history if h in index]
                mask[row, cols] = True
    return mask


def rank_requests(model: torch.nn.Module, tokenizer: Any, item_token_ids: torch.Tensor,
                  requests: pd.DataFrame, catalog: Catalog, settings: ServingSettings,
                  top_k: int | None = None, bm25: BM25Floor | None = None) -> pd.DataFrame:
    """Top-k item ids and scores per request row (what the pyfunc returns). With
    ``settings.bm25_weight`` > 0, search rows are ranked by the fused score evaluation measured
    (``bm25``: the catalog's index, built once by the caller, else here)."""
    from gems.evaluate import model_scorer
    from gems.lexical_fusion import fused_scorer

    k = check_top_k(settings.top_k if top_k is None else top_k, len(catalog.item_ids))
    prompts = build_prompts(requests, catalog, settings)
    histories = [history_ids(h)[-settings.history_len:] for h in requests["history_item_ids"]]
    scorer = model_scorer(model, tokenizer, item_token_ids, settings.max_seq_len, settings.batch_size)
    if settings.bm25_weight > 0:
        scorer = fused_scorer(scorer, bm25 or catalog.bm25(), settings.bm25_weight)
    tasks, queries = list(requests["task"]), served_queries(requests, settings)
    out_ids: list[list[str]] = []
    out_scores: list[list[float]] = []
    for start in range(0, len(prompts), settings.batch_size):
        stop = start + settings.batch_size
        rows = pl.DataFrame({"prompt": prompts[start:stop], "task": tasks[start:stop],
                             "query": queries[start:stop]}, schema={"prompt": pl.String, "task": pl.String,
                                                                     "query": pl.String})
        scores = scorer(rows).detach().float().cpu()
        exclude = exclusion_mask(tasks[start:stop], histories[start:stop], catalog, settings.mask_history_rec)
        values, indices = scores.masked_fill(exclude, float("-inf")).topk(k, dim=1)
        out_ids.extend([[catalog.item_ids[j] for j in row.tolist()] for row in indices])
        out_scores.extend(row.tolist() for row in values)
    return pd.DataFrame({"item_ids": out_ids, "scores": out_scores})


def load_ranker_parts(model_dir: Path, items_path: Path
                      ) -> tuple[torch.nn.Module, Any, Catalog, torch.Tensor]:
    """(model, tokenizer, catalog, item token ids) from an HF model dir and an items table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gems.model import item_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    catalog = Catalog.from_parquet(items_path)
    return model, tokenizer, catalog, item_token_ids(tokenizer, catalog.item_ids)


class GemsRanker(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame(task, history_item_ids, query) -> DataFrame(item_ids, scores)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.settings = ServingSettings(**json.loads(Path(context.artifacts[SETTINGS_ARTIFACT]).read_text()))
        self.model, self.tokenizer, self.catalog, self.item_token_ids = load_ranker_parts(
            Path(context.artifacts[MODEL_ARTIFACT]), Path(context.artifacts[ITEMS_ARTIFACT]))
        self.bm25 = self.catalog.bm25() if self.settings.bm25_weight > 0 else None

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Rank, or raise MlflowException with a message only: a bad request is
        INVALID_PARAMETER_VALUE (HTTP 400), anything else INTERNAL_ERROR (500) with the traceback
        in the server's log, not in the response."""
        try:
            return rank_requests(self.model, self.tokenizer, self.item_token_ids, model_input, self.catalog,
                                 self.settings, top_k=(params or {}).get("top_k"), bm25=self.bm25)
        except RequestError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as err:
            log.exception("ranking failed")
            raise MlflowException(f"ranking failed ({type(err).__name__}); the model server's log has "
                                  "the details", error_code=INTERNAL_ERROR) from err


def write_settings(settings: ServingSettings, path: Path) -> Path:
    path.write_text(json.dumps(asdict(settings), indent=2, sort_keys=True))
    return path
