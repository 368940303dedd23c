"""Training SASRec on the TRAIN split: full-catalog cross-entropy, AdamW, early stopping on val.

What the model is trained on, and why it is leak-free: exactly the LLM's training pairs, one per
TRAIN row, (the row's unified history -> the row's target), with the softmax over the whole
catalog at the position after the history. Its input is what the evaluator will give it at test
time (the row's history, at most data.history_len items).

The loss is NOT taken at every position of the history, as plain SASRec does on a user's
sequence: the split is per user AND task, so a row's history can hold the other task's val or
test click (e.g. a search click from the user's last day in the history of a later rec train
row). Predicting that history item from the items before it would train on a held-out target.
Where the next history item is a train click, that pair is already another train row, with its
full history. Reconstructing per-user sequences from train targets alone would drop those held-out
clicks from the inputs and train on gaps the evaluator never shows.

Model selection: val NDCG@10 over the full catalog (mean of search and rec, rec with history
items masked as the evaluator does), patience in epochs, the best epoch's weights restored.
Deterministic given the seed (initialisation, shuffling and dropout draw from it; the caller's
global RNG state is left as it was).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl
import torch
import torch.nn.functional as F

from gems.metrics import full_catalog_ranks, history_exclusion_mask, ranking_metrics
from gems.sasrec import SASRec, SequenceBatch, encode_examples, score_examples, torch_threads
from gems.sasrec_config import SASRecConfig
from gems.tasks import TASKS

log = logging.getLogger(__name__)


@dataclass
class SASRecFit:
    """A trained model (best val epoch restored) and how it got there."""

    model: SASRec
    best_epoch: int  # 1-based; the epoch whose weights the model holds
    epochs: int  # epochs run before stopping
    steps: int  # optimizer steps run
    best_val: float  # val NDCG@10, mean over the tasks present (nan without val rows)
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss, val metrics


@dataclass
class ValSet:
    """Val rows prepared once: targets, tasks and the rec history exclusion mask."""

    rows: pl.DataFrame
    targets: torch.Tensor
    tasks: list[str]
    exclude: torch.Tensor

    @classmethod
    def build(cls, rows: pl.DataFrame, item_ids: Sequence[str], mask_history_rec: bool) -> ValSet:
        index = {str(item): i for i, item in enumerate(item_ids)}
        tasks = rows["task"].to_list()
        targets = torch.tensor([index[t] for t in rows["target_item_id"].to_list()], dtype=torch.long)
        histories = [[index[h] for h in (hist or []) if h in index]
                     if mask_history_rec and task == "rec" else []
                     for hist, task in zip(rows["history_item_ids"].to_list(), tasks, strict=True)]
        return cls(rows, targets, tasks, history_exclusion_mask(histories, targets, len(index)))

    def ndcg_at_10(self, model: SASRec) -> dict[str, float]:
        """{task: full-catalog NDCG@10} for the tasks present in the val rows."""
        ranks = full_catalog_ranks(score_examples(model, self.rows), self.targets, self.exclude)
        out = {}
        for task in TASKS:
            idx = torch.tensor([i for i, t in enumerate(self.tasks) if t == task], dtype=torch.long)
            if len(idx):
                out[task] = ranking_metrics(ranks[idx], ks=(10,))["ndcg_at_10"]
        return out


def _train_epoch(model: SASRec, data: SequenceBatch, optimizer: torch.optim.Optimizer,
                 batch_size: int, generator: torch.Generator) -> tuple[float, int]:
    model.train()
    order = torch.randperm(len(data), generator=generator)
    total, steps = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data.select(order[start:start + batch_size])
        loss = F.cross_entropy(model(batch), batch.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(batch)
        steps += 1
    return total / max(len(data), 1), steps


def fit_sasrec(train: pl.DataFrame, val: pl.DataFrame | None, item_ids: Sequence[str],
               cfg: SASRecConfig, *, seed: int | None = None, mask_history_rec: bool = True
               ) -> SASRecFit:
    """Train on ``train`` rows, select the epoch on ``val`` rows (None or empty: run
    ``cfg.max_epochs`` and keep the last). ``seed`` overrides ``cfg.seed``."""
    if train.height == 0:
        raise ValueError("no training rows for SASRec")
    seed = cfg.seed if seed is None else seed
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch_threads(cfg.threads):
        torch.manual_seed(seed)
        model = SASRec(item_ids, cfg)
        data = encode_examples(train, model, with_targets=True)
        valset = (ValSet.build(val, model.item_ids, mask_history_rec)
                  if val is not None and val.height else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        best_val, best_epoch, best_state, stale, steps = float("-inf"), 0, None, 0, 0
        history: list[dict[str, float]] = []
        epoch = 0
        for epoch in range(1, cfg.max_epochs + 1):
            loss, n = _train_epoch(model, data, optimizer, cfg.batch_size, generator)
            steps += n
            record = {"epoch": float(epoch), "loss": loss}
            if valset is not None:
                per_task = valset.ndcg_at_10(model)
                value = sum(per_task.values()) / len(per_task)
                record |= {f"val/{t}/ndcg_at_10": v for t, v in per_task.items()} | {"val/ndcg_at_10": value}
                if value > best_val:
                    best_val, best_epoch, stale = value, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    stale += 1
            history.append(record)
            log.debug("sasrec epoch %d: %s", epoch, record)
            if valset is not None and stale >= cfg.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        else:
            best_epoch, best_val = epoch, float("nan")
    model.eval()
    return SASRecFit(model, best_epoch, epoch, steps, best_val, time.perf_counter() - started, history)
