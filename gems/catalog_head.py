"""The LM head's item rows only, at training targets: ``[N, d] x [d, n_items]`` instead of the vocabulary.

The catalog loss needs the logits of the item tokens only. With one target per example the full
head at that position is cheap, but history targets (``train.history_targets``) put a target at most
positions of a prompt, and a 49k-row text head there costs about a quarter of a SmolLM2 step's
FLOPs for logits the loss throws away. Restricting a plain ``nn.Linear`` head to the item rows gives
the same numbers (the same weight rows, bias entries and autocast). Any other head (peft's
trainable-token wrapper, a head with its own logic) is left to run in full: exactness first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def restrictable_head(model: nn.Module) -> nn.Linear | None:
    """The model's output embeddings when they are a plain ``nn.Linear`` (else None)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if type(head) is nn.Linear else None


@contextlib.contextmanager
def item_rows_head(head: nn.Linear, item_token_ids: Tensor) -> Iterator[None]:
    """Within the block ``head(hidden)`` returns ``[..., n_items]`` logits, column j = item j."""
    if "forward" in head.__dict__:
        raise RuntimeError("item_rows_head: the head's forward is already replaced")

    def forward(hidden: Tensor) -> Tensor:
        ids = item_token_ids.to(head.weight.device)
        bias = None if head.bias is None else head.bias.index_select(0, ids)
        return F.linear(hidden, head.weight.index_select(0, ids), bias)

    head.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del head.forward


@contextlib.contextmanager
def restricted(model: nn.Module, item_token_ids: Tensor | None) -> Iterator[bool]:
    """A context under which the model's head yields item logits only; enters as True when it
    does, False (head untouched) when the head is not a plain linear layer or there is no catalog."""
    head = restrictable_head(model) if item_token_ids is not None else None
    if head is None or item_token_ids is None:
        yield False
        return
    with item_rows_head(head, torch.as_tensor(item_token_ids, dtype=torch.long)):
        yield True
