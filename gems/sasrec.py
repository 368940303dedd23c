"""SASRec (Kang & McAuley 2018): a causal self-attentive next-item model over item ids.

The collaborative floor beside popularity and BM25, and the source of collaborative item vectors
for the LLM's item rows (DESIGN.md section 4, as E4SRec and LLaRA do). Pure torch.

Input layout (right-padded, so no query ever attends to padding and no key-padding mask is
needed): ``[start, h_1, ..., h_k, 0, ..., 0]``. ``start`` is a learned per-task token (or one
shared token): it gives an empty history a representation of its own and lets the model learn
each task's target distribution. Items are 1-based (0 = padding). The hidden state at position
``k`` (after reading the whole history) is dotted with the item embedding table (tied output) to
score the whole catalog.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import polars as pl
import torch
from torch import nn

from gems.sasrec_config import SASRecConfig
from gems.tasks import TASKS


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None = unchanged), then restore."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class SASRec(nn.Module):
    """Item + position embeddings, ``cfg.blocks`` pre-norm causal Transformer blocks, tied output."""

    def __init__(self, item_ids: Sequence[str], cfg: SASRecConfig) -> None:
        super().__init__()
        self.item_ids = [str(i) for i in item_ids]
        if len(set(self.item_ids)) != len(self.item_ids):
            raise ValueError("item_ids contain duplicates")
        self.cfg = cfg
        d = cfg.hidden
        self.item_emb = nn.Embedding(len(self.item_ids) + 1, d, padding_idx=0)
        self.start_emb = nn.Embedding(len(TASKS) if cfg.task_token else 1, d)
        self.pos_emb = nn.Embedding(cfg.max_len + 1, d)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, dim_feedforward=d, dropout=cfg.dropout,
                                           activation="relu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)  # pre-norm blocks leave the last residual stream unnormalised
        nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def hidden_states(self, items: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """items Long [B, L] (1-based, 0 = padding, L <= max_len), starts Long [B] -> [B, L+1, d]."""
        batch, length = items.shape
        if length > self.cfg.max_len:
            raise ValueError(f"sequence length {length} > sasrec.max_len {self.cfg.max_len}")
        scale = math.sqrt(self.cfg.hidden)
        x = torch.cat([self.start_emb(starts)[:, None], self.item_emb(items)], dim=1) * scale
        x = self.dropout(x + self.pos_emb.weight[: length + 1])
        causal = nn.Transformer.generate_square_subsequent_mask(length + 1, dtype=x.dtype)
        return self.norm(self.blocks(x, mask=causal, is_causal=True))

    def catalog_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., n_items] dot products with the (tied) item embeddings, catalog order."""
        return hidden @ self.item_emb.weight[1:].T

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        """Scores [B, n_items] of the item that follows each history."""
        hidden = self.hidden_states(batch.items, batch.starts)
        last = hidden[torch.arange(hidden.shape[0]), batch.lengths]
        return self.catalog_logits(last)


@dataclass
class SequenceBatch:
    """Histories as model input: items Long [B, L] right-padded with 0, their lengths Long [B],
    start-token index Long [B]; targets Long [B] (0-based catalog index) when known, else None."""

    items: torch.Tensor
    lengths: torch.Tensor
    starts: torch.Tensor
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def select(self, index: torch.Tensor) -> SequenceBatch:
        """Rows ``index``, trimmed to their longest history."""
        lengths = self.lengths[index]
        width = max(int(lengths.max()) if len(lengths) else 0, 1)
        return SequenceBatch(self.items[index, :width], lengths, self.starts[index],
                             None if self.targets is None else self.targets[index])


def encode_examples(examples: pl.DataFrame, model: SASRec, with_targets: bool = False) -> SequenceBatch:
    """Shard rows (task, history_item_ids[, target_item_id]) -> a SequenceBatch for ``model``.

    Each history keeps its last ``max_len`` items that are in the catalog (oldest first), exactly
    the items the evaluator sees in the row.
    """
    index = {item: i + 1 for i, item in enumerate(model.item_ids)}
    max_len = model.cfg.max_len
    histories = [[index[h] for h in (hist or []) if h in index][-max_len:]
                 for hist in examples["history_item_ids"].to_list()]
    width = max([len(h) for h in histories] + [1])
    items = torch.zeros(len(histories), width, dtype=torch.long)
    for row, hist in enumerate(histories):
        items[row, : len(hist)] = torch.tensor(hist, dtype=torch.long)
    task_index = {task: i for i, task in enumerate(TASKS)}
    tasks = examples["task"].to_list()
    unknown = sorted(set(tasks) - set(task_index))
    if unknown:
        raise ValueError(f"unknown task values {unknown}; expected {TASKS}")
    starts = torch.tensor([task_index[t] if model.cfg.task_token else 0 for t in tasks],
                          dtype=torch.long)
    targets = None
    if with_targets:
        missing = [t for t in examples["target_item_id"].to_list() if t not in index]
        if missing:
            raise ValueError(f"{len(missing)} target items are not in the SASRec catalog "
                             f"(first: {missing[:5]})")
        targets = torch.tensor([index[t] - 1 for t in examples["target_item_id"].to_list()],
                               dtype=torch.long)
    return SequenceBatch(items, torch.tensor([len(h) for h in histories], dtype=torch.long),
                         starts, targets)


@torch.no_grad()
def score_examples(model: SASRec, examples: pl.DataFrame, batch_size: int = 512) -> torch.Tensor:
    """Full-catalog next-item scores [rows, n_items] (eval mode; restores the previous mode)."""
    was_training = model.training
    model.eval()
    try:
        batch = encode_examples(examples, model)
        with torch_threads(model.cfg.threads):
            parts = [model(batch.select(torch.arange(s, min(s + batch_size, len(batch)))))
                     for s in range(0, len(batch), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, model.n_items)
