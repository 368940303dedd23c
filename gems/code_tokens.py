"""Semantic codes as tokens of the model: ``<c{level}_{index}>`` per codebook entry, ``<d_{index}>``
per disambiguation index, and each item's code as a row of token ids.

A code token's rows start at the mean title row of the items whose code uses it, the start atomic
item tokens get (:mod:`gems.token_rows`) spread over the token's members: the model reads
``<c0_7>`` as "something like these items" from step 0, whatever space the codes were clustered
in (mean-pooled hidden states, collaborative vectors), with no projection to fit. A token no item
uses starts at the mean of the original vocabulary rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gems.semantic_ids import SemanticIds
from gems.token_rows import TITLE_CHUNK, add_tokens_with_rows, encode_titles, title_means


def code_token(level: int, index: int) -> str:
    """The token for centroid ``index`` of codebook ``level`` (both from 0)."""
    return f"<c{level}_{index}>"


def disambiguation_token(index: int) -> str:
    """The token for position ``index`` within a group of items that share their L-level code."""
    return f"<d_{index}>"


def code_vocabulary(ids: SemanticIds) -> list[str]:
    """Every token the codes may use, level by level, then the disambiguation tokens."""
    return ([code_token(level, index) for level in range(ids.levels) for index in range(ids.codebook_size)]
            + [disambiguation_token(index) for index in range(ids.disambiguation_size)])


def code_slots(ids: SemanticIds) -> torch.Tensor:
    """[n_items, code_length]: each code position as an index into :func:`code_vocabulary`."""
    offsets = torch.arange(ids.code_length, dtype=torch.long) * ids.codebook_size
    return ids.codes + offsets  # the disambiguation position starts right after level L-1's block


def add_code_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: SemanticIds,
                    titles: Sequence[str]) -> torch.Tensor:
    """Add the code vocabulary to ``tokenizer`` and ``model``; return :func:`code_token_ids`.

    ``titles`` pairs with ``ids.item_ids``. Tokens already in the vocabulary keep their rows, so a
    second call (or a checkpoint that has them) changes nothing.
    """
    if len(titles) != len(ids.item_ids):
        raise ValueError(f"{len(titles)} titles for {len(ids.item_ids)} items: pass one title per "
                         "item, in the order of ids.item_ids")
    vocabulary = code_vocabulary(ids)
    known = tokenizer.get_vocab()
    new = [slot for slot, token in enumerate(vocabulary) if token not in known]
    if new:
        # Tokenise titles before the new tokens exist, so a title can only use initialised rows.
        title_ids = encode_titles(tokenizer, [t if isinstance(t, str) else "" for t in titles])
        slots, new_slots = code_slots(ids), torch.tensor(new, dtype=torch.long)

        def rows_for(weight: torch.Tensor, original_len: int) -> torch.Tensor:
            rows = _member_title_means(weight, title_ids, slots, len(vocabulary),
                                       weight[:original_len].mean(0))
            return rows[new_slots.to(rows.device)]

        add_tokens_with_rows(model, tokenizer, [vocabulary[s] for s in new], rows_for)
    return code_token_ids(tokenizer, ids)


def code_token_ids(tokenizer: PreTrainedTokenizerBase, ids: SemanticIds) -> torch.Tensor:
    """[n_items, code_length] token ids of each item's code, in the order of ``ids.item_ids``."""
    vocabulary = code_vocabulary(ids)
    token_ids = tokenizer.convert_tokens_to_ids(vocabulary)
    unk = tokenizer.unk_token_id
    missing = [token for token, i in zip(vocabulary, token_ids, strict=True)
               if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(f"{len(missing)} code token(s) are not in the tokenizer (first: {missing[:3]}); "
                         "add them with add_code_tokens")
    return torch.tensor(token_ids, dtype=torch.long)[code_slots(ids)]


def token_ids_by_item(ids: SemanticIds, token_ids: torch.Tensor) -> dict[str, list[int]]:
    """Item id -> its code's token ids: the training target of that item."""
    if token_ids.shape != ids.codes.shape:
        raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}, the codes {tuple(ids.codes.shape)}")
    return dict(zip(ids.item_ids, token_ids.tolist(), strict=True))


def _member_title_means(weight: torch.Tensor, title_ids: list[list[int]], slots: torch.Tensor,
                        n_tokens: int, fallback: torch.Tensor) -> torch.Tensor:
    """[n_tokens, width]: mean title row of the items each token appears in (``fallback`` if none)."""
    sums = torch.zeros(n_tokens, weight.shape[1], dtype=torch.float32, device=weight.device)
    counts = torch.zeros(n_tokens, dtype=torch.float32, device=weight.device)
    for start in range(0, len(title_ids), TITLE_CHUNK):
        means = title_means(weight, title_ids[start:start + TITLE_CHUNK], fallback).float()
        chunk_slots = slots[start:start + means.shape[0]].to(weight.device)
        positions = chunk_slots.shape[1]
        sums.index_add_(0, chunk_slots.reshape(-1), means.repeat_interleave(positions, dim=0))
        counts += torch.bincount(chunk_slots.reshape(-1), minlength=n_tokens).float()
    rows = sums / counts.clamp(min=1).unsqueeze(1)
    rows[counts == 0] = fallback.float()
    return rows.to(weight.dtype)
