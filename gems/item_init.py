"""Item rows that start from collaborative signal (``items.init``), beside the title-mean start.

A title mean tells the model what an item is; it says nothing about who buys it with what, which
is most of what next-item recommendation needs and what an LLM cannot infer from a few steps. As
E4SRec and LLaRA do, an ID-based recommender (SASRec, :mod:`gems.sasrec`) trained on the same
train split supplies one vector per item; a map fitted from those vectors onto the title rows
(a scaled rotation by default, which keeps which items go together) carries them into the
backbone's embedding space and scale, so the model reads them like any other token row from step 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gems.item_rows import item_row_weights
from gems.sasrec_vectors import project_to_width

INIT_MODES: tuple[str, ...] = ("title", "collab", "title+collab")


def aligned_vectors(vectors: torch.Tensor, vector_item_ids: Sequence[str],
                    item_ids: Sequence[str]) -> torch.Tensor:
    """Rows of ``vectors`` reordered to ``item_ids``; a clear error naming items without a vector."""
    index = {str(item): i for i, item in enumerate(vector_item_ids)}
    missing = [str(i) for i in item_ids if str(i) not in index]
    if missing:
        raise ValueError(f"{len(missing)} catalog item(s) have no collaborative vector (first: "
                         f"{missing[:5]}); the vectors were built for another catalog")
    return vectors[torch.tensor([index[str(i)] for i in item_ids], dtype=torch.long)]


def init_item_rows(model: nn.Module, item_token_ids: Sequence[int], vectors: torch.Tensor,
                   mode: str, ridge: float = 1e-3, mapping: str = "orthogonal") -> None:
    """Overwrite the item rows (embedding, and an untied head) per ``mode``; ``vectors`` [n_items, h]
    in the order of ``item_token_ids``. ``title`` leaves the rows as they are."""
    if mode not in INIT_MODES:
        raise ValueError(f"items.init must be one of {INIT_MODES}, got {mode!r}")
    if mode == "title":
        return
    ids = torch.as_tensor(list(item_token_ids), dtype=torch.long)
    if vectors.shape[0] != ids.numel():
        raise ValueError(f"{vectors.shape[0]} collaborative vectors for {ids.numel()} item tokens")
    for weight in item_row_weights(model):
        rows = ids.to(weight.device)
        with torch.no_grad():
            title = weight[rows].float()
            collab = project_to_width(vectors.float().to(weight.device), title, ridge, mapping)
            new = collab if mode == "collab" else 0.5 * (title + collab)
            weight[rows] = new.to(weight.dtype)
