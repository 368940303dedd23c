"""Top-N items under semantic ids by beam search constrained to the code trie.

For catalogs too large to score every item (:mod:`gems.code_scoring`), transformers' own beam
search decodes L code tokens per prompt, and ``prefix_allowed_tokens_fn`` lets each beam continue
only with tokens the trie allows after its prefix, so every finished beam is a real item's code.
Scores are the same summed full-vocabulary log-probabilities as full-catalog scoring (length
penalty off), so with a beam at least as wide as the widest trie level both rank alike; a narrower
beam trades recall for speed.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedModel

from gems.code_trie import CodeTrie
from gems.scoring import left_pad

#: transformers offsets placeholder beams (those a step could not fill) by -1e9; a real code's
#: summed log-probability is never near it, so anything below this is not a found item.
_PLACEHOLDER_SCORE = -1e8


def beam_search_items(model: PreTrainedModel, encoded_prompts: list[list[int]], trie: CodeTrie,
                      pad_token_id: int, *, top_n: int = 10, num_beams: int | None = None,
                      batch_size: int = 8) -> list[list[tuple[str, float]]]:
    """Per prompt, up to ``top_n`` (item id, score) pairs, best first, each a distinct catalog item.

    ``num_beams`` (default ``top_n``, at least ``top_n``) sets the search width. Fewer than
    ``top_n`` pairs come back only when the beam could not reach that many items.
    """
    num_beams = top_n if num_beams is None else num_beams
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    if num_beams < top_n:
        raise ValueError(f"num_beams ({num_beams}) must be >= top_n ({top_n}): each beam yields one item")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    empty = [i for i, p in enumerate(encoded_prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"encoded prompts {empty[:5]} are empty; every prompt needs >= 1 token")
    config = GenerationConfig(num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
                              max_new_tokens=trie.code_length, length_penalty=0.0, early_stopping=True,
                              output_scores=True, return_dict_in_generate=True,
                              pad_token_id=pad_token_id, eos_token_id=None, bos_token_id=None)
    device = next(model.parameters()).device
    results: list[list[tuple[str, float]]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded_prompts), batch_size):
            input_ids, attention_mask = left_pad(encoded_prompts[start:start + batch_size], pad_token_id)
            width = input_ids.shape[1]

            def allowed(_: int, sequence: torch.Tensor, width: int = width) -> list[int]:
                # A placeholder beam may hold a dead prefix; it needs some token, and keeps its score.
                return trie.allowed_next(sequence[width:].tolist()) or [pad_token_id]

            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config, prefix_allowed_tokens_fn=allowed)
            codes = out.sequences[:, width:].cpu().view(input_ids.shape[0], num_beams, -1)
            scores = out.sequences_scores.float().cpu().view(input_ids.shape[0], num_beams)
            results.extend(_found_items(trie, c, s, top_n) for c, s in zip(codes, scores, strict=True))
    finally:
        model.train(was_training)
    return results


def _found_items(trie: CodeTrie, codes: torch.Tensor, scores: torch.Tensor,
                 top_n: int) -> list[tuple[str, float]]:
    """The finished beams that spell a catalog item, best first, each item once."""
    found: list[tuple[str, float]] = []
    seen: set[int] = set()
    for code, score in sorted(zip(codes.tolist(), scores.tolist(), strict=True), key=lambda cs: -cs[1]):
        item = trie.item_of(code) if score > _PLACEHOLDER_SCORE else None
        if item is not None and item not in seen:
            seen.add(item)
            found.append((trie.item_ids[item], score))
    return found[:top_n]
