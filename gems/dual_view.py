"""DPMoE's two views of one prompt (gems.dpmoe), derived from the task-tagged prompt itself.

The shard's prompt (``[rec] History: <item_3> Stapler; <item_9> Toner. Next item:``) names the
history items; the views keep one signal each:

- semantic:    ``[rec] History: Red Swingline Stapler; Laser Toner. Next item:`` (titles, no item
  tokens: from the catalog when it is given, since a prompt may show tokens only, as
  ``data.title_max_words: 0`` makes it; else the prompt's own title words);
- behavioural: ``[rec] History: <item_3>; <item_9>. Next item:`` (item tokens only).

Each view is tokenised in three pieces (chat-template prefix + head, history body, tail + suffix)
so every token is known to be context (task tag, query, cue) or history: the router pools them
separately. Too long a view drops its oldest history entries, as ``encode_prompt`` does.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
import torch

from gems.dpmoe import VIEWS, DPMoEModel, ViewBatch
from gems.items import ITEM_TOKEN_PREFIX, item_id_from_token
from gems.prompts import (
    EMPTY_HISTORY,
    ENTRY_SPLIT,
    HISTORY_SEP,
    PROMPT_PARTS,
    short_title,
    user_turn_template,
)
from gems.scoring import ScoreBatch, left_pad

_TOKEN = re.compile(re.escape(ITEM_TOKEN_PREFIX) + r"[^>]*>")

#: One view of one prompt: token ids and, per token, 1 if it belongs to the history else 0.
EncodedView = tuple[list[int], list[int]]


def view_entries(body: str, titles: Mapping[str, str] | None = None, title_words: int = 8
                 ) -> dict[str, list[str]]:
    """The history entries of a prompt body as each view shows them (oldest first); ``titles``
    (item id -> title): the semantic view shows each item's first ``title_words`` title words."""
    entries = [] if body == EMPTY_HISTORY else ENTRY_SPLIT.split(body)
    behavioural = [" ".join(_TOKEN.findall(e)) for e in entries]
    if titles is None:
        semantic = [_TOKEN.sub("", e).strip() for e in entries]
    else:
        semantic = [" ".join(short_title(titles.get(item_id_from_token(t), ""), title_words)
                             for t in _TOKEN.findall(e)).strip() for e in entries]
    return {"semantic": semantic, "behavioural": behavioural}


def _pieces(tokenizer: Any, head: str, entries: Sequence[str], tail: str) -> EncodedView:
    turn = user_turn_template(tokenizer)
    prefix, suffix = turn if turn is not None else ("", "")

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    start = ids(prefix + head)
    if turn is None and getattr(tokenizer, "bos_token_id", None) is not None:
        start = [tokenizer.bos_token_id, *start]
    body = ids(HISTORY_SEP.join(e for e in entries if e) if any(entries) else EMPTY_HISTORY)
    end = ids(tail + suffix)
    return [*start, *body, *end], [0] * len(start) + [1] * len(body) + [0] * len(end)


def encode_views(tokenizer: Any, prompt: str, max_len: int, titles: Mapping[str, str] | None = None,
                 title_words: int = 8) -> dict[str, EncodedView]:
    """Both views of ``prompt``, each at most ``max_len`` tokens (oldest history dropped first);
    ``titles``/``title_words``: see :func:`view_entries`."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    parts = PROMPT_PARTS.match(prompt)
    if parts is None:
        raise ValueError(f"not a task-tagged prompt (expected '[task] History: ... cue'): {prompt[:80]!r}")
    out = {}
    for view, entries in view_entries(parts["body"], titles, title_words).items():
        keep = len(entries)
        encoded = _pieces(tokenizer, parts["head"], entries, parts["tail"])
        while len(encoded[0]) > max_len and keep > 0:
            keep -= 1
            encoded = _pieces(tokenizer, parts["head"], entries[len(entries) - keep:], parts["tail"])
        ids, segment = encoded
        out[view] = (ids[-max_len:], segment[-max_len:])
    return out


def collate_view(encoded: Sequence[EncodedView], pad_token_id: int) -> ViewBatch:
    """Left-padded batch of one view (the last position ends every prompt, as in scoring)."""
    input_ids, attention = left_pad([ids for ids, _ in encoded], pad_token_id)
    history, _ = left_pad([segment for _, segment in encoded], 0)
    return ViewBatch(input_ids, attention, attention * (1 - history), history)


def collate_views(encoded: Sequence[dict[str, EncodedView]], pad_token_id: int) -> dict[str, ViewBatch]:
    """Per view, the left-padded batch of ``encoded`` rows."""
    return {view: collate_view([e[view] for e in encoded], pad_token_id) for view in VIEWS}


def dpmoe_scorer(model: DPMoEModel, tokenizer: Any, max_len: int, batch_size: int = 16,
                 autocast_dtype: torch.dtype | None = None) -> ScoreBatch:
    """A ScoreBatch (gems.evaluate.evaluate_scorer) that ranks the catalog with DPMoE: both views of
    each row's ``prompt`` (history titles from ``model.titles``), fused state times the item rows."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("tokenizer has no pad token; load it with gems.model.load_backbone")

    @torch.no_grad()
    def score(rows: pl.DataFrame) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return _scores(rows["prompt"].to_list())
        finally:
            model.train(was_training)

    def _scores(prompts: list[str]) -> torch.Tensor:
        out = []
        device = model.item_token_ids.device
        autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype
                    else contextlib.nullcontext())
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            encoded = [encode_views(tokenizer, p, max_len, model.titles, model.settings.title_words)
                       for p in chunk]
            views = collate_views(encoded, int(pad))
            with autocast:
                out.append(model(views["semantic"], views["behavioural"]).logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, model.item_token_ids.numel())

    return score
