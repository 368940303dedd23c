"""Rank the whole catalog with one forward pass per batch of prompts.

Each item is a single token, so the next-token logits at the prompt end, restricted to the item
tokens, are exact scores for every item: no beam search, no per-item passes (DESIGN.md section 4).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import polars as pl
import torch
from transformers import PreTrainedModel

#: rows of examples -> scores [len(rows), n_items] in catalog order (what gems.evaluate ranks)
ScoreBatch = Callable[[pl.DataFrame], torch.Tensor]


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` can compute the head at chosen positions only (HF ``logits_to_keep``)."""
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@contextlib.contextmanager
def _head_in_fp32(head: torch.nn.Module, device_type: str) -> Iterator[None]:
    """Run ``head`` outside autocast on fp32 inputs while the body runs in bf16.

    bf16 logits carry ~3 significant digits, so many of 2,420 item scores would tie; an fp32 head on
    the bf16 body's last hidden state keeps the ranking resolution at a fraction of the cost. The
    head module itself runs (not its weight), so wrappers such as peft's trainable-token deltas apply.
    """
    own = head.__dict__.get("forward")  # an instance-level forward (e.g. a hook library's) is kept
    forward = head.forward

    def fp32_forward(hidden: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        with torch.autocast(device_type, enabled=False):
            return forward(hidden.float(), *args, **kwargs)

    head.forward = fp32_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own  # type: ignore[method-assign]


@contextlib.contextmanager
def _lowered_body(model: torch.nn.Module, device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """The body under ``dtype`` autocast, the head in fp32."""
    with _head_in_fp32(model.get_output_embeddings(), device_type), torch.autocast(device_type, dtype=dtype):
        yield


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with padding on the left, so position -1 ends every prompt."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def score_catalog(model: PreTrainedModel, encoded_prompts: list[list[int]],
                  item_token_ids: torch.LongTensor, pad_token_id: int,
                  batch_size: int = 16, autocast_dtype: torch.dtype | None = None
                  ) -> torch.FloatTensor:
    """Scores [n_prompts, n_items] (fp32, CPU): next-token logits at each prompt end for the items.

    Prompts are grouped by length to waste little padding; position ids skip the left padding so a
    prompt scores the same alone or in any batch. The LM head runs only at the last position
    (``logits_to_keep=1``), which keeps model-specific head logic (e.g. logit soft-capping) exact.
    The model's train/eval mode is restored afterwards. With ``autocast_dtype`` (bf16) the body runs
    under autocast and the head in fp32 (val during bf16 training, ``eval.val_precision``); None
    scores in the model's own precision (test, serving).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    item_token_ids = torch.as_tensor(item_token_ids, dtype=torch.long).reshape(-1)
    vocab_rows = model.get_output_embeddings().weight.shape[0]
    if item_token_ids.numel():
        low, high = int(item_token_ids.min()), int(item_token_ids.max())
        if low < 0 or high >= vocab_rows:
            raise ValueError(f"item_token_ids must lie in [0, {vocab_rows}) (the model's "
                             f"vocabulary); got min {low}, max {high}")
    empty = [i for i, p in enumerate(encoded_prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"encoded prompts {empty[:5]} are empty; every prompt needs >= 1 token")
    scores = torch.empty(len(encoded_prompts), item_token_ids.numel(), dtype=torch.float32)
    if not encoded_prompts:
        return scores
    device = next(model.parameters()).device
    item_index = item_token_ids.to(device)
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    order = sorted(range(len(encoded_prompts)), key=lambda i: len(encoded_prompts[i]))
    was_training = model.training
    model.eval()
    precision = (contextlib.nullcontext() if autocast_dtype is None
                 else _lowered_body(model, device.type, autocast_dtype))
    try:
        with torch.no_grad(), precision:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                input_ids, attention_mask = left_pad([encoded_prompts[i] for i in rows], pad_token_id)
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               position_ids=position_ids.to(device), use_cache=False, **extra).logits
                scores[rows] = logits[:, -1, :].index_select(-1, item_index).float().cpu()
    finally:
        model.train(was_training)
    return scores
